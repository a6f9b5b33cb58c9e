"""SD-Zero: the model as its own reviser (Self-Distillation Zero, arXiv 2604.12002; METHODS.md §3).

The teacher sees the task, the student's own response y, a cue that carries the verifier's binary verdict and
then y again:

    teacher sequence = context(x) ⊕ y ⊕ cue(r) ⊕ y        (the loss covers only the second copy of y)

The reviser's distribution over re-emitting y token by token, after being told whether y was right, is the dense
target: where y is wrong, the tokens the reviser would not repeat carry the divergence (the paper's
"self-localisation"). Both copies of y are the rollout's exact ids, spliced, never re-tokenised; the first copy
drops its final EOS so that the cue continues the same assistant turn instead of following an end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from selfdistill.sources.base import PrivilegedSource, Rollout, TeacherView

#: Cues after the first copy of y, by verdict (the paper's wording: rephrase when right, correct when wrong).
DEFAULT_CUES: dict[str, str] = {
    "correct": "\n\nThis response is correct. Let me rephrase the above solution.\n\n",
    "wrong": "\n\nWait, this response is wrong. Let me correct it.\n\n",
    # The verifier failed on this rollout (raised, timed out, or could not parse the gold answer).
    "unverified": "\n\nLet me check the above solution again.\n\n",
}


class Reviser(PrivilegedSource):
    """Teacher = the model shown its own response and the verifier's verdict, re-emitting that response.

    Args:
        cues: text after the first copy of y, keyed by ``correct``, ``wrong`` and ``unverified``; missing keys keep
            the defaults (:data:`DEFAULT_CUES`).
        threshold: a rollout whose summed reward is ``>= threshold`` counts as correct.
        strip_eos: drop the first copy's final EOS token (when the rollout ended with one), so the cue continues the
            assistant turn.
    """

    paper = {"name": "SD-Zero", "title": "Self-Distillation Zero", "id": "2604.12002"}

    needs_rewards = True

    def __init__(self, cues: Mapping[str, str] | None = None, threshold: float = 0.5, strip_eos: bool = True):
        unknown = set(cues or {}) - set(DEFAULT_CUES)
        if unknown:
            raise ValueError(
                f"unknown cue key(s) {sorted(unknown)}; the reviser's cues are keyed by "
                f"{', '.join(DEFAULT_CUES)}"
            )
        self.cues = {**DEFAULT_CUES, **dict(cues or {})}
        for key, cue in self.cues.items():
            if not isinstance(cue, str) or not cue.strip():
                raise ValueError(f"cue {key!r} is empty; give the text the reviser reads after its response")
        self.threshold = float(threshold)
        self.strip_eos = strip_eos

    def verdict(self, reward: float | None) -> str:
        """``correct``, ``wrong`` or ``unverified`` (no reward: the verifier failed on this rollout)."""
        if reward is None:
            return "unverified"
        return "correct" if reward >= self.threshold else "wrong"

    def first_copy(self, rollout: Rollout) -> list[int]:
        ids = list(rollout.completion_ids)
        if self.strip_eos and rollout.finished and ids:
            ids = ids[:-1]
        return ids

    def views(self, rollouts: Sequence[Rollout]) -> list[list[TeacherView]]:
        out = []
        for rollout in rollouts:
            verdict = self.verdict(rollout.reward)
            out.append([
                TeacherView(
                    context=rollout.prompt,
                    pi=None,  # the response is the privileged information and is never shortened
                    name=f"reviser_{verdict}",
                    continuation=[self.first_copy(rollout), self.cues[verdict]],
                )
            ])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"cues": self.cues, "threshold": self.threshold}
