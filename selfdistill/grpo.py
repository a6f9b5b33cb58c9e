"""The GRPO term that Skill-SD trains beside its distillation loss (METHODS.md §5), as pure functions.

Follows TRL's ``GRPOTrainer`` conventions: rewards are compared within the G rollouts of one prompt, advantages
are ``(r_i - mean_group r) / (std_group r + 1e-4)`` with the unbiased standard deviation (``scale="group"``; TRL's
``scale_rewards``), and the per-token loss is PPO's clipped surrogate

    L_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A),   rho_t = pi_theta(y_t) / pi_old(y_t),

reduced like every other loss here: summed over the model's tokens and divided by the optimizer step's global
token count (TRL's ``loss_type="dapo"`` normalisation). With fresh rollouts ``pi_old = sg(pi_theta)``: rho is 1 and
the gradient is ``-A * grad log pi_theta(y_t)``. There is no KL-to-reference term (TRL's default ``beta=0``).
"""

from __future__ import annotations

import torch

ADVANTAGE_EPS = 1e-4
SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """``[n]`` advantages of ``n`` rollouts laid out as consecutive groups of ``group_size`` siblings."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; choose one of {SCALES}")
    if group_size < 2:
        raise ValueError(
            f"GRPO compares the rollouts of one prompt with each other; num_generations={group_size} leaves nothing "
            "to compare: set num_generations >= 2"
        )
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("a rollout has no finite reward; GRPO needs every rollout scored (check reward_failures)")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        return centred / (grouped.std(1).repeat_interleave(group_size) + ADVANTAGE_EPS)
    if scale == "batch":
        return centred / (rewards.std() + ADVANTAGE_EPS)
    return centred


def policy_gradient_losses(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate ``(loss, clipped)``, each ``[N]``.

    Args:
        logp: ``[N]`` log pi_theta of the sampled tokens (with grad).
        advantages: ``[N]`` each token's rollout advantage.
        old_logp: ``[N]`` log-probs under the sampling policy; ``None`` for fresh rollouts (ratio 1).
        epsilon_low, epsilon_high: the clip range ``[1 - eps_low, 1 + eps_high]`` (``eps_high`` defaults to low).
    """
    high = epsilon_low if epsilon_high is None else epsilon_high
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).to(logp.dtype).detach()


def rollout_advantages(rewards: list[float | None], group_size: int, scale: str = "group") -> list[float] | None:
    """Advantages of a generation batch as the trainer uses them (GRPO's term and the sources' feedback).

    A rollout without a reward (its verifier failed) gets its group's mean reward, so advantage 0; a group without
    any reward gets 0. With ``group_size`` 1 the whole batch is the group (centred, not scaled). ``None`` when no
    rollout has a reward.
    """
    if all(r is None for r in rewards):
        return None
    if group_size >= 2 and len(rewards) % group_size:
        raise ValueError(
            f"{len(rewards)} rollouts do not split into groups of num_generations={group_size}; make the batch size "
            "(per_device_eval_batch_size for evaluation) a multiple of num_generations"
        )
    values = torch.tensor([float("nan") if r is None else float(r) for r in rewards], dtype=torch.float64)
    if group_size < 2:
        values = values.nan_to_num(float(values.nanmean()))
        return (values - values.mean()).tolist()
    grouped = values.view(-1, group_size)
    fill = torch.nanmean(grouped, 1, keepdim=True).nan_to_num(0.0).expand_as(grouped)
    values = torch.where(torch.isnan(grouped), fill, grouped).reshape(-1)
    return group_advantages(values, group_size, scale).tolist()
