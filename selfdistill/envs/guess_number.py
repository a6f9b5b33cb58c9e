"""Guess the number: the model guesses an integer, the environment answers "higher" or "lower".

The simpler of the two built-in multi-turn tasks, one a 135M model can make progress on: with feedback, a
binary search wins within ``ceil(log2(high - low + 1))`` guesses. Reward 1.0 when the number is found within
``max_turns`` guesses, else 0.0. The first integer in a reply is the guess; a reply without one is answered with
a reminder of the rules (the turn is spent).
"""

from __future__ import annotations

import random
import re
from typing import Any

from selfdistill.envs.base import Environment, StepResult, split_seed

PROMPT = (
    "Guess my secret whole number from {low} to {high}. After each guess I say higher or lower. You have {turns} "
    "guesses. Reply with one number only."
)
_INT = re.compile(r"-?\d+")


class GuessNumber(Environment):
    """Args: low, high: the range of the secret (inclusive); max_turns: guesses allowed; secrets: the values the
    rows' secrets are drawn from, uniformly (repeat a value to make it more likely; default every integer from
    ``low`` to ``high``). A skewed list makes a task whose structure can be learned across episodes: what a skill
    ("the number is often 6") can tell a teacher and the student has to find out."""

    name = "guess_number"

    def __init__(self, low: int = 1, high: int = 16, max_turns: int = 6, secrets: list[int] | None = None):
        if not low < high:
            raise ValueError(f"guess_number needs low < high, got low={low}, high={high}")
        if max_turns < 1:
            raise ValueError(f"max_turns={max_turns} must be >= 1")
        _check_secrets(secrets, low, high)
        self.low, self.high, self.max_turns = low, high, max_turns
        self.secret: int | None = None
        self.turns = 0
        self.solved = False
        self.history: list[int] = []

    def reset(self, secret: int | None = None, seed: int | None = None, **_: Any) -> str:
        if secret is None:
            secret = random.Random(seed).randint(self.low, self.high)
        if not self.low <= int(secret) <= self.high:
            raise ValueError(f"secret {secret} is outside [{self.low}, {self.high}]")
        self.secret, self.turns, self.solved, self.history = int(secret), 0, False, []
        return "Your first guess?"

    def step(self, action: str) -> StepResult:
        if self.secret is None:
            raise RuntimeError("call reset() before step()")
        if self.solved or self.turns >= self.max_turns:
            raise RuntimeError("the episode is over; call reset() to start a new one")
        self.turns += 1
        left = self.max_turns - self.turns
        match = _INT.search(action)
        if match is None:
            text = f"No number found. Reply with one whole number from {self.low} to {self.high}."
            return self._answer(text, valid=False, left=left)
        guess = int(match.group())
        self.history.append(guess)
        if guess == self.secret:
            self.solved = True
            return StepResult(f"Correct! The number was {self.secret}.", 1.0, True)
        if not self.low <= guess <= self.high:
            return self._answer(f"{guess} is not from {self.low} to {self.high}.", valid=True, left=left)
        direction = "Higher" if self.secret > guess else "Lower"
        return self._answer(f"{direction} than {guess}.", valid=True, left=left)

    def _answer(self, text: str, valid: bool, left: int) -> StepResult:
        if left <= 0:
            return StepResult(f"{text} No guesses left. The number was {self.secret}.", 0.0, True, valid)
        return StepResult(f"{text} {left} left.", 0.0, False, valid)

    @classmethod
    def make_rows(cls, n: int, seed: int, split: str, low: int = 1, high: int = 16, max_turns: int = 6,
                  secrets: list[int] | None = None, **_: Any) -> list[dict[str, Any]]:
        _check_secrets(secrets, low, high)
        rng = random.Random(split_seed(seed, split))
        text = PROMPT.format(low=low, high=high, turns=max_turns)
        draw = (lambda: rng.choice(secrets)) if secrets else (lambda: rng.randint(low, high))
        return [{"prompt": [{"role": "user", "content": text}], "secret": int(draw()),
                 "task": f"guess_number_{low}_{high}"} for _ in range(n)]


def _check_secrets(secrets: list[int] | None, low: int, high: int) -> None:
    if secrets is None:
        return
    if isinstance(secrets, (str, bytes)) or not hasattr(secrets, "__iter__") or not list(secrets):
        raise ValueError(f"env.secrets must be a non-empty list of integers from {low} to {high}, got {secrets!r}")
    bad = [v for v in secrets if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high]
    if bad:
        raise ValueError(f"env.secrets holds {bad!r}: every secret must be an integer from {low} to {high} "
                         "(env.low to env.high); fix the list or widen the range")
