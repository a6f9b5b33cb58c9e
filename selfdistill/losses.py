"""Token-level distillation losses between the student and the teacher (METHODS.md §1).

Everything here is pure tensor math: no trainer, no I/O. The inputs are the logits of the *valid*
completion tokens only, flattened to ``[N, V]`` (N tokens, V vocabulary), so padding never reaches the
math. One call computes, per token t:

    D_t   the divergence over a support S of the vocabulary (full, top-k or the sampled token),
    L_t   the loss after clipping: per-entry ``sum_v min(term_v, tau)``; per-token cap ``min(D_t, tau)`` (no
          gradient above tau); per-token scale ``D_t * min(1, tau / sg(D_t))`` (same value, gradient scaled),
    w_t   an importance weight ``sg(min(exp(log pi_theta(y_t) - log pi_old(y_t)), c))`` when rollouts are stale,

and returns ``sum_t w_t * L_t / normalizer``. The normalizer is the number of valid completion tokens of the
*whole global batch* (all micro-batches of one optimizer step on all ranks), which the trainer passes in:
normalising per micro-batch would make gradient accumulation change the loss scale.

Conventions (pinned by tests):
- ``reverse_kl`` is KL(student || teacher) = sum_v p_S(v) [log p_S(v) - log p_T(v)].
- ``forward_kl`` is KL(teacher || student).
- ``jsd`` with beta: m = beta p_T + (1 - beta) p_S, D = beta KL(p_T || m) + (1 - beta) KL(p_S || m),
  unscaled, for beta strictly inside (0, 1); the two KLs are their own options.
- ``sampled`` is the single-sample estimator on the realised token used as a REINFORCE surrogate: its value is
  ``log p_S(y) - log p_T(y)`` and its gradient ``sg(log p_S(y) - log p_T(y)) * grad log p_S(y)``, the reverse-KL
  gradient in expectation when y was sampled from the student. It is unbiased only on-policy.
- The teacher is always stop-gradient.

The per-token function :func:`token_losses` is the unit a chunked or fused-with-the-head implementation calls
chunk by chunk; :func:`distillation_loss` is the dense reduction over all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
SUPPORTS = ("full", "topk", "sampled")
TOPK_SOURCES = ("student", "teacher", "union")
CLIPS = ("none", "entry", "token", "scale")

# Log-probabilities below this are treated as zero probability: exp(-1000) is 0 in float32 and float64, and it
# keeps 0 * (-inf) = NaN out of the sums when a logit is -inf.
LOGP_FLOOR = -1000.0
# Log-ratios are clamped before exp (METHODS.md §1).
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class LossSpec:
    """What to compute: divergence x support x clipping x importance ratio."""

    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    support: str = "full"
    top_k: int = 64
    topk_from: str = "student"
    tail_bucket: bool = True
    clip: str = "scale"
    clip_tau: float = 1.0
    ratio_clip: float | None = 2.0

    def __post_init__(self) -> None:
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check_choice("support", self.support, SUPPORTS)
        _check_choice("topk_from", self.topk_from, TOPK_SOURCES)
        _check_choice("clip", self.clip, CLIPS)
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(
                f"jsd_beta={self.jsd_beta} is outside (0, 1); use divergence='forward_kl' or 'reverse_kl' for the "
                "end points"
            )
        if self.support == "topk" and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 for support='topk'")
        if self.support == "sampled" and self.divergence != "reverse_kl":
            raise ValueError(
                "support='sampled' is the single-sample reverse-KL estimator; set divergence='reverse_kl' or use "
                "support='full'/'topk' for forward_kl/jsd"
            )
        if self.support == "sampled" and self.clip == "entry":
            raise ValueError(
                "clip='entry' clips each vocabulary entry, and support='sampled' has no entries; use clip='token'"
            )
        if self.clip != "none" and not self.clip_tau > 0:
            raise ValueError(f"clip_tau={self.clip_tau} must be > 0 when clip={self.clip!r}")
        if self.ratio_clip is not None and not self.ratio_clip >= 1.0:
            raise ValueError(f"ratio_clip={self.ratio_clip} must be >= 1 (or None to switch it off)")


@dataclass
class TokenLosses:
    """Per-token outputs of :func:`token_losses`; every tensor is ``[N]``."""

    loss: torch.Tensor  # L_t * w_t, carries the gradient
    divergence: torch.Tensor  # D_t before clipping, detached
    clipped: torch.Tensor  # 1.0 where the clip changed the token's loss, detached
    ratio: torch.Tensor  # w_t (1.0 without an importance ratio), detached
    ratio_clipped: torch.Tensor  # 1.0 where the ratio hit its cap, detached
    logp_gap: torch.Tensor  # log p_T(y_t) - log p_S(y_t) on the sampled token, detached


@dataclass
class LossOutput:
    """The reduced loss and the metrics the trainer logs."""

    loss: torch.Tensor
    tokens: TokenLosses
    metrics: dict[str, float] = field(default_factory=dict)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis as every loss here takes it: float32 at least (half-precision logits are upcast:
    the divergence of two near-equal distributions is a small difference of large numbers) and floored at
    ``LOGP_FLOOR``, so ``exp * log`` terms stay finite where a probability underflows."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(dtype), dim=-1).clamp_min(LOGP_FLOOR)


def _support_ids(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, spec: LossSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabulary ids of the top-k support ``[N, K]`` and which of them are real (not duplicates) ``[N, K]``."""
    k = min(spec.top_k, student_logp.shape[-1])
    if spec.topk_from == "student":
        ids = student_logp.detach().topk(k, dim=-1).indices
    elif spec.topk_from == "teacher":
        ids = teacher_logp.topk(k, dim=-1).indices
    else:
        ids = torch.cat(
            [student_logp.detach().topk(k, dim=-1).indices, teacher_logp.topk(k, dim=-1).indices], dim=-1
        )
        ids = ids.sort(dim=-1).values
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 1:] = ids[:, 1:] != ids[:, :-1]  # after sorting, a repeated id sits right after its twin
    return ids, valid


def _restrict_to_support(
    logp: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, tail_bucket: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities on the support entries, either renormalised or plus one tail bucket."""
    picked = logp.gather(-1, ids)
    captured = picked.masked_fill(~valid, float("-inf")).logsumexp(dim=-1, keepdim=True)
    if tail_bucket:
        # log(1 - captured mass); the floor keeps the log finite when the support holds all the mass.
        tail = torch.log((-torch.expm1(captured)).clamp_min(torch.finfo(logp.dtype).tiny))
        return torch.cat([picked, tail], dim=-1), torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)
    return picked - captured, valid


def divergence_terms(s: torch.Tensor, t: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-entry terms whose sum over the support is ``spec.divergence`` between student log-probabilities ``s``
    and teacher log-probabilities ``t`` (any matching shapes; reduce over the last axis). Building block of
    combine-style losses (selfdistill.methods.avsd.combine)."""
    if spec.divergence == "reverse_kl":
        return s.exp() * (s - t)
    if spec.divergence == "forward_kl":
        return t.exp() * (t - s)
    beta = spec.jsd_beta
    log_m = torch.logaddexp(t + torch.log(torch.tensor(beta, dtype=s.dtype)), s + torch.log1p(
        torch.tensor(-beta, dtype=s.dtype)))
    return beta * t.exp() * (t - log_m) + (1.0 - beta) * s.exp() * (s - log_m)


def sampled_losses(
    s_y: torch.Tensor, t_y: torch.Tensor, spec: LossSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The single-sample reverse-KL surrogate on the realised token: ``(loss, divergence, clipped)``, each ``[N]``.

    ``s_y`` carries the student's gradient, ``t_y`` is the (stop-gradient) target log-prob of the same token. The
    value is ``coef = s_y - t_y`` (capped at tau by the token/scale clip) and the gradient ``coef * grad s_y``.
    """
    divergence = (s_y - t_y).detach()
    coef = divergence.clamp(max=spec.clip_tau) if spec.clip in ("token", "scale") else divergence
    clipped = (divergence > coef).to(divergence.dtype)
    return coef + coef * (s_y - s_y.detach()), divergence, clipped


def support_losses(
    s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor | None, spec: LossSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Divergence and clip over a support: ``(loss, divergence, clipped)``, each ``[N]``.

    ``s`` and ``t`` are ``[N, K]`` student and (stop-gradient) target log-probabilities on the same K support
    entries; ``valid`` masks entries that are not real (duplicates), ``None`` when all are.
    """
    terms = divergence_terms(s, t, spec)
    if valid is not None:
        terms = torch.where(valid, terms, torch.zeros_like(terms))
    divergence = terms.sum(-1).detach()
    if spec.clip == "entry":
        loss = terms.clamp(max=spec.clip_tau).sum(-1)
        clipped = (terms.detach() > spec.clip_tau).any(-1).to(divergence.dtype)
    elif spec.clip == "token":
        loss = terms.sum(-1).clamp(max=spec.clip_tau)
        clipped = (divergence > spec.clip_tau).to(divergence.dtype)
    elif spec.clip == "scale":
        # value min(D, tau) like the cap, but the gradient is scaled by tau / D instead of zeroed: a token far
        # from the teacher still moves towards it, with at most tau's worth of weight.
        scale = (spec.clip_tau / divergence.clamp_min(torch.finfo(divergence.dtype).tiny)).clamp(max=1.0)
        loss = terms.sum(-1) * scale
        clipped = (divergence > spec.clip_tau).to(divergence.dtype)
    else:
        loss = terms.sum(-1)
        clipped = torch.zeros_like(divergence)
    return loss, divergence, clipped


def importance_ratio(
    student_token_logp: torch.Tensor, old_token_logp: torch.Tensor | None, cap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sg(min(exp(log pi_theta(y) - log pi_old(y)), cap))`` and where the cap bit; ones without old log-probs."""
    if old_token_logp is None or cap is None:
        ones = torch.ones_like(student_token_logp.detach())
        return ones, torch.zeros_like(ones)
    log_ratio = (student_token_logp.detach() - old_token_logp.to(student_token_logp.dtype)).clamp(
        -_MAX_LOG_RATIO, _MAX_LOG_RATIO
    )
    ratio = log_ratio.exp()
    return ratio.clamp(max=cap), (ratio > cap).to(ratio.dtype)


def token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    spec: LossSpec,
    old_logps: torch.Tensor | None = None,
) -> TokenLosses:
    """Per-token loss for ``N`` valid completion tokens.

    Args:
        student_logits: ``[N, V]`` student logits at the positions that predict ``tokens`` (with grad).
        teacher_logits: ``[N, V]`` teacher logits at the same positions (stop-gradient is applied here).
        tokens: ``[N]`` the sampled completion token ids ``y_t``.
        spec: divergence, support and clipping.
        old_logps: ``[N]`` log-probs of ``tokens`` under the policy that sampled them, for the importance ratio;
            ``None`` when the rollout is fresh (ratio 1).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "both must be [tokens, vocab] at the same completion positions (do the models share a tokenizer?)"
        )
    s_all = log_probs(student_logits)
    t_all = log_probs(teacher_logits.detach())
    s_y = s_all.gather(-1, tokens[:, None]).squeeze(-1)
    t_y = t_all.gather(-1, tokens[:, None]).squeeze(-1)
    ratio, ratio_clipped = importance_ratio(s_y, old_logps, spec.ratio_clip)

    if spec.support == "sampled":
        loss, divergence, clipped = sampled_losses(s_y, t_y, spec)
    else:
        if spec.support == "full":
            s, t, valid = s_all, t_all, None
        else:
            ids, valid = _support_ids(s_all, t_all, spec)
            s, valid_s = _restrict_to_support(s_all, ids, valid, spec.tail_bucket)
            t, _ = _restrict_to_support(t_all, ids, valid, spec.tail_bucket)
            valid = valid_s
        loss, divergence, clipped = support_losses(s, t, valid, spec)
    return TokenLosses(
        loss=loss * ratio,
        divergence=divergence,
        clipped=clipped,
        ratio=ratio,
        ratio_clipped=ratio_clipped,
        logp_gap=(t_y - s_y).detach(),
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    spec: LossSpec,
    old_logps: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> LossOutput:
    """``sum_t w_t L_t / normalizer`` over ``N`` valid tokens; normalizer defaults to ``N``.

    See :func:`token_losses` for the arguments. Pass the global token count of the optimizer step as
    ``normalizer`` when the batch is one of several micro-batches or ranks.
    """
    out = token_losses(student_logits, teacher_logits, tokens, spec, old_logps)
    n = tokens.numel()
    denom = float(n) if normalizer is None else normalizer
    if isinstance(denom, torch.Tensor):
        denom = denom.to(out.loss.dtype)
    elif denom <= 0:
        raise ValueError(f"normalizer={denom} must be > 0 (the number of valid completion tokens)")
    loss = out.loss.sum() / denom
    return LossOutput(loss=loss, tokens=out, metrics=summarize(out))


def summarize(out: TokenLosses) -> dict[str, float]:
    """Token means of the detached per-token quantities (the trainer weights them by token count across batches)."""
    if out.divergence.numel() == 0:
        return {}
    return {
        "divergence": out.divergence.mean().item(),
        "clip_fraction": out.clipped.mean().item(),
        "ratio_clip_fraction": out.ratio_clipped.mean().item(),
        "teacher_student_logp_gap": out.logp_gap.mean().item(),
    }
