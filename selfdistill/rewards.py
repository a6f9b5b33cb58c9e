"""Verifiers in TRL's reward-function convention: ``f(prompts, completions, **columns) -> list[float]``."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as chat messages (the last assistant message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role") == "assistant":
                return str(message.get("content") or "")
    return ""


def math_reward(
    prompts: list[Any], completions: list[Any], solution: list[str] | None = None, answer: list[str] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when ``math-verify`` finds the completion's answer equivalent to the gold answer, else 0.0.

    The gold is the ``answer`` column when present, else the ``solution`` column (its boxed answer is used).
    Equivalent forms count (``\\frac{1}{2}`` and ``0.5``). A gold that cannot be parsed gives ``None`` (left
    out of the reward mean, not scored as wrong); parsing and verification run with math-verify's timeouts.
    """
    from math_verify import parse, verify

    golds = answer if answer is not None else solution
    if golds is None:
        raise KeyError("math_reward needs an 'answer' or 'solution' column; map one in the recipe's data.columns")
    rewards: list[float | None] = []
    for completion, gold_text in zip(completions, golds):
        gold_src = str(gold_text)
        if answer is not None and "\\boxed" not in gold_src and "$" not in gold_src:
            gold_src = f"${gold_src}$"
        gold = parse(gold_src)
        if not gold:
            rewards.append(None)
            continue
        predicted = parse(completion_text(completion))
        rewards.append(1.0 if predicted and verify(gold, predicted) else 0.0)
    return rewards
