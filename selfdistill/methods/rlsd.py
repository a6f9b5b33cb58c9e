"""RLSD: RLVR with self-distillation (Self-Distilled RLVR, arXiv 2604.03128; docs/losses.md, "RLSD").

The verifier sets each token's update *direction*, the privileged teacher only its *magnitude*. With A the rollout's
GRPO advantage and both log-probabilities taken without gradient on the sampled token y_t,

    w_t = clip(exp(sign(A) * (log pi_T(y_t) - log pi_S(y_t))), 1 - eps_w, 1 + eps_w)
    A_t = A * ((1 - lambda) + lambda * w_t)

and A_t replaces A in GRPO's clipped surrogate. Where the teacher (who has seen the reference) finds the sampled token
more likely than the student does, a correct rollout's token is pushed up harder; where it finds it less likely, a
wrong rollout's token is pushed down harder. w_t is never negative, so no token's direction differs from A's: the
teacher cannot pull the student towards text the verifier did not reward (the "information leakage" the paper
measures in plain OPSD). lambda = 0 is GRPO; lambda = 1 weights every token by w_t alone.

It composes with any single-view source (OPSD's reference by default): ``SelfDistillConfig(rlsd_lambda=..,
rlsd_epsilon=.., grpo_weight=1, distill_weight=0)``; ``recipes/rlsd_arithmetic.yaml``.
"""

from __future__ import annotations

import torch


def rlsd_weights(advantages: torch.Tensor, teacher_logp: torch.Tensor, student_logp: torch.Tensor,
                 epsilon: float) -> torch.Tensor:
    """``[N]`` per-token magnitudes ``w_t`` in ``[1 - epsilon, 1 + epsilon]``; no gradient flows through them."""
    gap = teacher_logp.detach() - student_logp.detach()
    gap = gap.to(torch.promote_types(gap.dtype, torch.float32))
    # the exponent is clamped only so that exp cannot overflow; the clip to [1 - eps, 1 + eps] bounds w
    weights = torch.exp((torch.sign(advantages).to(gap.dtype) * gap).clamp(-20.0, 20.0))
    return weights.clamp(1.0 - epsilon, 1.0 + epsilon)


def rlsd_lambda_at(lam: float, step: int, decay_steps: int | None) -> float:
    """lambda at optimizer step ``step`` (0-based): constant, or falling linearly to 0 over ``decay_steps``."""
    if decay_steps is None:
        return lam
    return lam * max(0.0, 1.0 - step / decay_steps)


def rlsd_advantages(advantages: torch.Tensor, teacher_logp: torch.Tensor, student_logp: torch.Tensor,
                    lam: float, epsilon: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token advantages ``A_t = A * ((1 - lam) + lam * w_t)`` (``[N]``, each token's rollout advantage ``A``
    repeated over its tokens) and metrics over the tokens with ``A != 0``: the mean weight, its mean distance from
    1, and the share at either clip bound (none when every advantage is 0)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"rlsd_lambda={lam} must be in [0, 1]")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"rlsd_epsilon={epsilon} must be in (0, 1): the weights lie in [1 - eps, 1 + eps]")
    weights = rlsd_weights(advantages, teacher_logp, student_logp, epsilon)
    shaped = advantages * ((1.0 - lam) + lam * weights.to(advantages.dtype))
    metrics = {}
    directed = advantages != 0  # a token with A = 0 has weight 1 and no update: left out of the statistics
    if directed.any():
        w = weights[directed]
        at_bound = (w <= 1.0 - epsilon) | (w >= 1.0 + epsilon)
        metrics = {"rlsd/weight_mean": w.mean().item(), "rlsd/clipped_fraction": at_bound.float().mean().item(),
                   "rlsd/weight_abs_dev": (w - 1.0).abs().mean().item()}
    return shaped, metrics
