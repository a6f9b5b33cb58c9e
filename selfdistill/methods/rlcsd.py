"""RLCSD: GRPO with a contrastive self-distillation signal (Reinforcement Learning with Contrastive On-Policy
Self-Distillation, arXiv 2606.11709; docs/losses.md, "RLCSD").

Any hint shifts the teacher's style (shorter, more direct replies), correct or not; only a correct hint shifts it
towards the task's content. So the teacher scores the student's rollout twice over: under the correct hint c (the
dataset's reference solution) and under K wrong hints w_1..w_K (the model's own *incorrect* rollouts of the same
prompt, never the rollout itself, in the same template), and the signal is their contrast on the sampled token:

    e_t = log pi_T(y_t | x, c, y_<t) - log( (1/K) sum_k pi_T(y_t | x, w_k, y_<t) )     (the student cancels)
    r_t = lambda * tanh(e_t / tau),      selected tokens S = {t : |r_t| > delta}
    A~_t = max(0, A + r_t) if A > 0;  min(0, A + r_t) if A < 0;  0 if A = 0           (on S; A elsewhere)

with A the rollout's GRPO advantage (the verifier sets the direction: r_t can shrink a token's update to zero but
never flip it). The loss is the two-path GRPO surrogate of the micro-batch,

    L = mean_{t not in S} PPO_t(A) + eta * mean_{t in S} PPO_t(A~_t),

each mean over its own tokens (the authors' code averages over the micro-batch). Everything from the teacher is
without gradient. A rollout with no wrong sibling has no contrast (r_t = 0: plain GRPO); its placeholder views are
marked ``trains=False``. Defaults are the paper's: tau 0.02, lambda 0.5, delta 0.02, eta 1, K 4 (here at most
num_generations - 1); the teacher is a snapshot re-synced every 10 steps (``teacher_policy: sync``,
``teacher_update_every: 10``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from selfdistill.sources.base import PrivilegedSource, Rollout, TeacherView, user_text, with_user_text

DEFAULT_TEMPLATE = (
    "{problem}\n\nHere is a reference solution:\n{solution}\n\nUnderstand it, then answer in your own words."
)


@dataclass
class Contrast:
    """What :func:`contrastive_advantages` returns: per-token advantages, the loss scale of each token (the
    two-path reduction), and metrics."""

    advantages: torch.Tensor
    scale: torch.Tensor
    metrics: dict[str, float]


def contrastive_signal(view_logp: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``e_t`` (``[N]``) from the teacher's log-probs of the sampled tokens ``view_logp`` ``[1 + K, N]`` (view 0 the
    correct hint, views 1..K the wrong ones) and ``real`` ``[K, N]`` (which wrong views exist for the token's
    rollout). 0 where a rollout has no wrong hint."""
    correct, wrong = view_logp[0], view_logp[1:]
    count = real.sum(0)
    masked = wrong.masked_fill(~real, float("-inf"))
    mean_log = torch.logsumexp(masked, 0) - torch.log(count.clamp(min=1).to(wrong.dtype))
    return torch.where(count > 0, correct - mean_log, torch.zeros_like(correct))


def contrastive_advantages(advantages: torch.Tensor, view_logp: torch.Tensor, real: torch.Tensor, lam: float = 0.5,
                           tau: float = 0.02, delta: float = 0.02, eta: float = 1.0) -> Contrast:
    """RLCSD's per-token advantages ``A~_t`` on the selected tokens (``A`` elsewhere) and each token's loss scale
    such that ``sum_t scale_t * L_t / N = mean_unselected L + eta * mean_selected L`` over the ``N`` tokens given."""
    view_logp, advantages = view_logp.detach(), advantages.detach()
    e = contrastive_signal(view_logp, real)
    r = lam * torch.tanh(e / tau)
    selected = r.abs() > delta
    shifted = advantages + r.to(advantages.dtype)
    tilde = torch.where(advantages > 0, shifted.clamp(min=0.0),
                        torch.where(advantages < 0, shifted.clamp(max=0.0), torch.zeros_like(shifted)))
    shaped = torch.where(selected, tilde, advantages)
    n, n_sel = selected.numel(), int(selected.sum())
    scale = torch.where(selected, torch.full_like(shaped, eta * n / max(n_sel, 1)),
                        torch.full_like(shaped, n / max(n - n_sel, 1)))
    metrics = {}
    if n:
        has = real.any(0)
        metrics = {"rlcsd/selected_fraction": n_sel / n, "rlcsd/contrast_fraction": has.float().mean().item(),
                   "rlcsd/signal_abs": e[has].abs().mean().item() if has.any() else 0.0}
    return Contrast(shaped, scale, metrics)


class ContrastiveHints(PrivilegedSource):
    """RLCSD's teacher views: the correct hint (``column``, the dataset's reference solution) and up to ``wrong_hints``
    incorrect sibling rollouts of the same prompt (never the rollout itself), all in one template.

    Trains the GRPO term only (``grpo_weight > 0``; ``distill_weight: 0`` as published): the trainer hands the
    teacher's log-probs to :meth:`shape_advantages`.

    Args:
        column: the dataset column of the correct hint.
        template: format string with ``{problem}`` and ``{solution}``, the same for the correct and the wrong hints.
        wrong_hints: K, the wrong hints per rollout (the paper's 4; fewer when the group has fewer wrong siblings).
        threshold: a rollout whose reward is below it is wrong.
        lam, tau, delta, eta: ``r_t = lam * tanh(e_t / tau)``, selection ``|r_t| > delta``, the selected path's weight.
    """

    paper = {"name": "RLCSD", "title": "Reinforcement Learning with Contrastive On-Policy Self-Distillation",
             "id": "2606.11709"}
    needs_rewards = True
    combine = "contrastive"
    shapes_advantages = True
    diagnosed_views = 1  # diagnose measures the teacher generating under the correct hint only

    def __init__(self, column: str = "solution", template: str = DEFAULT_TEMPLATE, wrong_hints: int = 4,
                 threshold: float = 0.5, lam: float = 0.5, tau: float = 0.02, delta: float = 0.02, eta: float = 1.0):
        for key in ("{problem}", "{solution}"):
            if key not in template:
                raise ValueError(
                    f"the RLCSD template lacks the {key} placeholder; it needs {{problem}} and {{solution}}"
                )
        if wrong_hints < 1:
            raise ValueError(f"wrong_hints={wrong_hints} must be >= 1: the contrast needs a wrong hint")
        for name, value in (("lam", lam), ("tau", tau), ("eta", eta)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be a finite number > 0")
        if not (math.isfinite(delta) and 0 <= delta < lam):
            raise ValueError(f"delta={delta} must be in [0, lam={lam}): |r_t| is at most lam, so no token would be "
                             "selected")
        self.column, self.template, self.wrong_hints, self.threshold = column, template, wrong_hints, threshold
        self.lam, self.tau, self.delta, self.eta = lam, tau, delta, eta
        self.required_columns = (column,)
        self.counts = [0, 0]  # rollouts with at least one wrong hint, all rollouts

    def _view(self, rollout: Rollout, hint: str, name: str, trains: bool = True) -> TeacherView:
        text = self.template.format(problem=user_text(rollout.prompt), solution=hint)
        return TeacherView(context=with_user_text(rollout.prompt, text), pi=hint, name=name, trains=trains)

    def views(self, rollouts: Sequence[Rollout]) -> list[list[TeacherView]]:
        wrong: dict[int, list[int]] = {}
        for i, r in enumerate(rollouts):
            if r.reward is not None and r.reward < self.threshold and r.completion.strip():
                wrong.setdefault(r.group, []).append(i)
        group_size = max(sum(1 for r in rollouts if r.group == rollouts[0].group), 1)
        k = min(self.wrong_hints, max(group_size - 1, 1))  # the same number of views for every rollout
        out = []
        for i, rollout in enumerate(rollouts):
            solution = rollout.row.get(self.column)
            if solution is None or not str(solution).strip():
                raise ValueError(f"row {rollout.row!r:.200} has an empty {self.column!r}: RLCSD's correct hint is the "
                                 "reference solution; filter such rows out of the dataset")
            views = [self._view(rollout, str(solution), "correct_hint")]
            pool = [j for j in wrong.get(rollout.group, []) if j != i][:k]
            self.counts[1] += 1
            self.counts[0] += bool(pool)
            for slot in range(k):
                if slot < len(pool):
                    views.append(self._view(rollout, rollouts[pool[slot]].completion, f"wrong_hint_{slot + 1}"))
                else:  # a placeholder (same shape for the batched teacher pass), left out of the contrast
                    views.append(self._view(rollout, str(solution), f"wrong_hint_{slot + 1}", trains=False))
            out.append(views)
        return out

    def shape_advantages(self, advantages: torch.Tensor, view_logp: torch.Tensor,
                         view_trains: torch.Tensor) -> Contrast:
        """``advantages`` ``[N]`` (each token's rollout advantage), ``view_logp`` ``[M, N]`` the teacher's log-probs of
        the sampled tokens per view, ``view_trains`` ``[M, N]`` which views are real for each token's rollout."""
        return contrastive_advantages(advantages, view_logp, view_trains[1:], self.lam, self.tau, self.delta, self.eta)

    def token_losses(self, *args: Any, **kwargs: Any) -> Any:
        """A distillation loss beside the GRPO term (``distill_weight > 0``) uses the correct hint's view alone."""
        student_logits, view_logits, *rest = args
        return super().token_losses(student_logits, view_logits[:1], *rest, **kwargs)

    def metrics(self) -> dict[str, float]:
        with_hint, total = self.counts
        self.counts = [0, 0]
        return {"rlcsd/wrong_hint_fraction": with_hint / total} if total else {}
