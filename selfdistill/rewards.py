"""Verifiers in TRL's reward-function convention: ``f(prompts, completions, **columns) -> list[float]``."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last assistant message of a conversation ("" when none).

    Content given as a list of parts (multimodal style) is joined from its text parts.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, (list, tuple)) or not completion:
        return ""
    messages = [m for m in completion if isinstance(m, dict)]
    assistant = [m for m in messages if m.get("role") == "assistant"] or messages
    if not assistant:
        return ""
    content = assistant[-1].get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def as_completions(prompts: list[Any], texts: list[str]) -> list[Any]:
    """Completions in TRL's convention: chat messages when the prompts are chats, else plain strings."""
    conversational = bool(prompts) and not isinstance(prompts[0], str)
    return [[{"role": "assistant", "content": t}] if conversational else t for t in texts]


def math_reward(
    prompts: list[Any], completions: list[Any], solution: list[str] | None = None, answer: list[str] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when ``math-verify`` finds the completion's answer equivalent to the gold answer, else 0.0.

    The gold is the ``answer`` column when present, else the ``solution`` column (its boxed answer is used).
    Equivalent forms count (``\\frac{1}{2}`` and ``0.5``). A gold that cannot be parsed gives ``None`` (left
    out of the reward mean, not scored as wrong); parsing and verification run with math-verify's timeouts.
    """
    import threading

    from math_verify import parse, verify

    # math-verify's own timeouts use signal.alarm, which only works in the main thread; elsewhere (the trainer's
    # reward_timeout runs verifiers in a thread) the caller's timeout is the guard.
    timeouts = {} if threading.current_thread() is threading.main_thread() else {"parsing_timeout": None}
    verify_timeouts = {} if not timeouts else {"timeout_seconds": None}
    golds = answer if answer is not None else solution
    if golds is None:
        raise KeyError("math_reward needs an 'answer' or 'solution' column; map one in the recipe's data.columns")
    rewards: list[float | None] = []
    for completion, gold_text in zip(completions, golds):
        gold_src = str(gold_text)
        if answer is not None and "\\boxed" not in gold_src and "$" not in gold_src:
            gold_src = f"${gold_src}$"
        gold = parse(gold_src, **timeouts)
        if not gold:
            rewards.append(None)
            continue
        predicted = parse(completion_text(completion), **timeouts)
        rewards.append(1.0 if predicted and verify(gold, predicted, **verify_timeouts) else 0.0)
    return rewards
