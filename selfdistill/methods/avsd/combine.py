"""Several teacher views, one target: consensus plus a gated residual (AVSD, arXiv 2605.20643).

Adaptive-View Self-Distillation scores each student rollout with M teacher "views" (the same teacher with
different privileged information) and combines them per completion token into one target. Pure tensor math, like
:mod:`selfdistill.losses`: inputs are the logits of the valid completion tokens, ``[N, V]`` for the student and
``[M, N, V]`` for the views.

Per token (and, in the full form, per candidate entry), with student log-prob ``s``, view log-probs ``l_v`` and
view weights ``w_v`` (``sum_v w_v = 1``; uniform ``1/M`` or agreement weights):

    log q_g = sum_v w_v l_v                               consensus (weighted geometric mean)
    log q_a = logsumexp_v(log w_v + l_v)                  weighted arithmetic mean
    J       = max(0, log q_a - log q_g)                   Jensen residual (>= 0; the max removes rounding)
    d_v     = l_v - s,   d = sum_v w_v d_v,   A = sum_v w_v |d_v|
    g       = |d| / (A + eps)  *  |d| / (|d| + J + eps)   gate: aligned x proportionate, in [0, 1]
    log q*  = log q_g + g J                               target, stop-gradient

The first gate factor is 1 when every view moves the student the same way and 0 when they cancel; the second is
near 1 when the views' disagreement (J) is small next to the shift they agree on. Because ``0 <= g <= 1``,
``q_g <= q* <= q_a`` entry by entry: the target lies between the consensus and the plain mixture.

Two forms (:class:`ViewSpec` ``form``):

- ``sampled``: on the realised token only, ``l_v = log pi_T^v(y_t)`` and ``s = log pi_theta(y_t)`` (full-vocabulary
  log-probs); the loss is the library's sampled reverse-KL surrogate (:func:`selfdistill.losses.sampled_losses`)
  with the teacher log-prob replaced by ``log q*``: value ``s - log q*``, gradient ``sg(s - log q*) grad s``.
- ``full``: a candidate set per token, ``C = union_v top-k(view v) + {y_t}`` (``top_k = 0``: the whole vocabulary);
  student and every view are renormalised on C (log-softmax restricted to C), combined entry by entry, and the
  target is renormalised on C as well (``log_softmax`` of ``log q*`` over the valid entries of C). The geometric
  consensus is sub-normalised (``sum_C q_g <= 1``, with equality only when the views agree) and ``q*`` lies
  between ``q_g`` and ``q_a``, so its mass ``Z`` on C falls short of 1 by an amount that depends on how much the
  views disagree; renormalising makes the loss a divergence between two distributions (>= 0, zero only at the
  target) instead of one offset by ``-log Z`` (reverse KL) or scaled by ``Z`` (forward KL). The loss is the
  library's divergence and clip over C (:func:`selfdistill.losses.support_losses`); AVSD uses the per-entry clip,
  tau = 0.05.

Agreement weights: ``w_v = softmax_v(-c * mean_{u != v} JSD(v, u))`` per token, with the symmetric JSD (beta 0.5,
natural log, unscaled) between the views renormalised on the candidate set, ``c = agreement_scale`` (5). A view
that disagrees with the others gets less weight; with one view the weight is 1. The sampled form takes them too
(the paper's sampled form is the uniform mean, the default): its JSD is taken on the same candidate set, the only
use of ``top_k`` there.

With one view (M = 1), J = 0 and ``q*`` is the view itself, so both forms reduce exactly to the single-view loss
(:func:`selfdistill.losses.token_losses` with ``support='sampled'``, or ``support='full'`` when ``top_k = 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selfdistill.losses import (
    LossSpec,
    TokenLosses,
    divergence_terms,
    importance_ratio,
    log_probs,
    sampled_losses,
    summarize,
    support_losses,
)

VIEW_FORMS = ("sampled", "full")
VIEW_WEIGHTS = ("uniform", "agreement")

# The JSD between two views used by the agreement weights: symmetric (beta 0.5), the library's convention.
_JSD_HALF = LossSpec(divergence="jsd", jsd_beta=0.5, clip="none")
# Weights are checked to sum to 1 within this; float32 softmax rounding is ~1e-7.
_WEIGHT_SUM_TOL = 1e-4


@dataclass(frozen=True)
class ViewSpec:
    """How several teacher views become one target (see the module docstring)."""

    form: str = "full"  # "sampled": the realised token only; "full": the candidate set
    top_k: int = 64  # candidate top-k per view (full form, and the agreement JSD); 0 = the whole vocabulary
    weights: str = "uniform"  # "uniform": 1/M; "agreement": softmax(-agreement_scale * mean pairwise JSD)
    agreement_scale: float = 5.0
    eps: float = 1e-6  # keeps the gate's ratios finite when every view equals the student (the gate is then 0)

    def __post_init__(self) -> None:
        if self.form not in VIEW_FORMS:
            raise ValueError(f"form={self.form!r} is not one of {', '.join(repr(f) for f in VIEW_FORMS)}")
        if self.weights not in VIEW_WEIGHTS:
            raise ValueError(f"weights={self.weights!r} is not one of {', '.join(repr(w) for w in VIEW_WEIGHTS)}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 1, or 0 for the whole vocabulary")
        if not self.agreement_scale >= 0 or self.agreement_scale == float("inf"):
            raise ValueError(
                f"agreement_scale={self.agreement_scale} must be finite and >= 0 (0 gives uniform weights; a "
                "negative scale would favour the view that disagrees)"
            )
        if not 0 < self.eps < float("inf"):
            raise ValueError(f"eps={self.eps} must be > 0: it keeps the gate finite when the views equal the student")


@dataclass
class Combined:
    """The combination of :func:`combine_views`, detached; ``[N]`` (sampled) or ``[N, K]`` (per entry)."""

    target: torch.Tensor  # log q* (not renormalised)
    consensus: torch.Tensor  # log q_g
    jensen: torch.Tensor  # J
    gate: torch.Tensor  # g
    weights: torch.Tensor  # w, [M, N]


@dataclass
class MultiViewLosses:
    """Per-token outputs of :func:`multiview_token_losses`."""

    tokens: TokenLosses  # as token_losses returns; logp_gap = log q*(y) - s(y), renormalised as used by the loss
    gate: torch.Tensor  # [N] the gate (full form: mean over the valid candidate entries)
    jensen: torch.Tensor  # [N] the Jensen residual (same reduction)
    view_divergence: torch.Tensor  # [M, N] each view's own divergence from the student under the loss spec
    agreement: torch.Tensor  # [N] mean pairwise JSD between the views; 0 when M == 1


def combine_views(
    student_logp: torch.Tensor, view_logp: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6
) -> Combined:
    """Consensus, Jensen residual, gate and target ``log q* = log q_g + g J`` (formulas in the module docstring).

    Args:
        student_logp: ``[N]`` (one token each) or ``[N, K]`` (K entries each) student log-probs; detached here,
            the target is stop-gradient.
        view_logp: ``[M, N]`` or ``[M, N, K]`` log-probs of the M views at the same tokens or entries.
        weights: ``[M, N]`` view weights per token, non-negative and summing to 1 over M.
        eps: the gate's guard against 0 / 0.

    Every entry must be finite: the caller masks entries that are not real (a padded or duplicate candidate) by
    filling them with any finite log-prob and ignoring their outputs. A -inf log-prob would make the consensus
    -inf and J infinite; the library's log-softmax floors log-probs at -1000 for that reason.
    """
    student_logp = student_logp.detach()
    view_logp = view_logp.detach()
    weights = weights.detach()
    if view_logp.dim() not in (2, 3) or view_logp.shape[0] == 0:
        raise ValueError(
            f"view log-probs have shape {tuple(view_logp.shape)}; pass [M, N] (sampled) or [M, N, K] (per entry) "
            "with at least one view (M >= 1)"
        )
    if view_logp.shape[1:] != student_logp.shape:
        raise ValueError(
            f"view log-probs {tuple(view_logp.shape)} do not match the student's {tuple(student_logp.shape)}; every "
            "view must be [N] or [N, K] like the student, stacked along a leading view dimension"
        )
    if weights.shape != view_logp.shape[:2]:
        raise ValueError(
            f"weights {tuple(weights.shape)} must be [M, N] = {tuple(view_logp.shape[:2])}: one weight per view and "
            "token"
        )
    weights = weights.to(view_logp.dtype)
    _check_inputs(student_logp, view_logp, weights)

    w = weights if view_logp.dim() == 2 else weights[..., None]
    consensus = (w * view_logp).sum(0)
    arithmetic = (w.log() + view_logp).logsumexp(0)
    jensen = (arithmetic - consensus).clamp_min(0.0)
    delta = view_logp - student_logp
    mean_delta = (w * delta).sum(0).abs()
    mean_abs = (w * delta.abs()).sum(0)
    aligned = mean_delta / (mean_abs + eps)
    proportionate = mean_delta / (mean_delta + jensen + eps)
    gate = aligned * proportionate
    return Combined(
        target=consensus + gate * jensen, consensus=consensus, jensen=jensen, gate=gate, weights=weights
    )


def _check_inputs(student_logp: torch.Tensor, view_logp: torch.Tensor, weights: torch.Tensor) -> None:
    # One host sync for all checks; the diagnosis below runs only on failure.
    ok = (
        torch.isfinite(student_logp).all()
        & torch.isfinite(view_logp).all()
        & torch.isfinite(weights).all()
        & (weights >= 0).all()
        & ((weights.sum(0) - 1).abs() <= _WEIGHT_SUM_TOL).all()
    )
    if bool(ok):
        return
    if not torch.isfinite(student_logp).all():
        raise ValueError(
            "the student log-probs hold NaN or inf; check the student logits (NaN or +inf logits, a diverged run) "
            "and pass log-probs floored like selfdistill.losses.log_probs does"
        )
    if not torch.isfinite(view_logp).all():
        raise ValueError(
            "the view log-probs hold NaN or inf; check the teacher logits, and fill masked entries with a finite "
            "log-prob (e.g. -1000) instead of -inf, ignoring their outputs"
        )
    raise ValueError(
        "the view weights must be finite, non-negative and sum to 1 over the views for every token; normalise them "
        "(e.g. a softmax over the view dimension) in float32 or float64"
    )


def _renormalise(logp: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``log_softmax`` restricted to the valid entries of the last dimension; invalid entries stay finite."""
    masked = logp if valid is None else logp.masked_fill(~valid, float("-inf"))
    return logp - masked.logsumexp(-1, keepdim=True)


def _masked_sum(terms: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is not None:
        terms = torch.where(valid, terms, torch.zeros_like(terms))
    return terms.sum(-1)


def _mean_pairwise_jsd(view_logp: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``[M, N]``: for each view, the mean over the other views u of JSD(v, u) (beta 0.5) on the entries."""
    m = view_logp.shape[0]
    per_view = torch.zeros(view_logp.shape[:2], dtype=view_logp.dtype, device=view_logp.device)
    # A loop over pairs, not an [M, M, N, K] broadcast: with top_k = 0 the entries are the whole vocabulary.
    for v in range(m):
        for u in range(v + 1, m):
            jsd = _masked_sum(divergence_terms(view_logp[v], view_logp[u], _JSD_HALF), valid).clamp_min(0.0)
            per_view[v] += jsd
            per_view[u] += jsd
    return per_view / max(m - 1, 1)


def view_weights(view_logp: torch.Tensor, valid: torch.Tensor | None, spec: ViewSpec) -> torch.Tensor:
    """``[M, N]`` view weights: ``1/M``, or ``softmax_v(-agreement_scale * mean_{u != v} JSD(v, u))``.

    Args:
        view_logp: ``[M, N, K]`` each view's log-probs on the same K entries, normalised over the valid ones
            (the agreement weights need distributions); ``[M, N]`` is accepted for uniform weights.
        valid: ``[N, K]`` which entries are real (``None``: all).
        spec: ``weights`` and ``agreement_scale``.
    """
    if view_logp.dim() not in (2, 3) or view_logp.shape[0] == 0:
        raise ValueError(
            f"view log-probs have shape {tuple(view_logp.shape)}; pass [M, N, K] with at least one view (M >= 1)"
        )
    m, n = view_logp.shape[:2]
    if spec.weights == "uniform" or m == 1:
        return torch.full((m, n), 1.0 / m, dtype=view_logp.dtype, device=view_logp.device)
    if view_logp.dim() != 3:
        raise ValueError(
            "agreement weights compare the views' distributions and need [M, N, K] log-probs, got "
            f"{tuple(view_logp.shape)}; pass each view renormalised on a candidate set, or use weights='uniform'"
        )
    return _agreement_weights(_mean_pairwise_jsd(view_logp.detach(), valid), spec)


def _agreement_weights(per_view_jsd: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    return torch.softmax(-spec.agreement_scale * per_view_jsd, dim=0)


def candidate_support(view_logits: torch.Tensor, tokens: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate ids ``[N, K]`` (sorted) and which of them are real ``[N, K]``: each view's top-k plus ``y_t``.

    ``K = M * min(top_k, V) + 1``; an id in several views' top-k (or also the sampled token) appears several times,
    and only its first occurrence is valid. ``top_k = 0`` means the whole vocabulary: ids ``0..V-1``, all valid.
    """
    if view_logits.dim() != 3 or view_logits.shape[0] == 0:
        raise ValueError(f"view logits have shape {tuple(view_logits.shape)}; pass [M, N, V] with M >= 1")
    m, n, vocab = view_logits.shape
    if tokens.shape != (n,):
        raise ValueError(f"tokens {tuple(tokens.shape)} must be [N] = ({n},), one sampled id per position")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 1, or 0 for the whole vocabulary")
    if top_k == 0:
        ids = torch.arange(vocab, device=view_logits.device).expand(n, vocab)
        return ids, torch.ones_like(ids, dtype=torch.bool)
    k = min(top_k, vocab)
    top = view_logits.detach().topk(k, dim=-1).indices  # [M, N, k]
    ids = torch.cat([top.permute(1, 0, 2).reshape(n, m * k), tokens[:, None].to(top.dtype)], dim=-1)
    ids = ids.sort(dim=-1).values
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 1:] = ids[:, 1:] != ids[:, :-1]  # after sorting, a repeated id sits right after its twin
    return ids, valid


def _view_logps(
    view_logits: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor | None, dtype: torch.dtype, support: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each view's log-probs at the sampled tokens ``[M, N]`` and, when ``support``, at the candidate ids
    ``[M, N, K]`` (not yet renormalised; all V entries when ``ids`` is None)."""
    at_token, on_support = [], []
    # One view at a time: the float32 upcast of one [N, V] view is the peak, not of all M.
    for v in range(view_logits.shape[0]):
        logp = log_probs(view_logits[v].detach()).to(dtype)
        at_token.append(logp.gather(-1, tokens[:, None]).squeeze(-1))
        if support:
            on_support.append(logp if ids is None else logp.gather(-1, ids))
    return torch.stack(at_token), (torch.stack(on_support) if support else None)


def multiview_token_losses(
    student_logits: torch.Tensor,
    view_logits: torch.Tensor,
    tokens: torch.Tensor,
    spec: LossSpec,
    view: ViewSpec,
    old_logps: torch.Tensor | None = None,
) -> MultiViewLosses:
    """Per-token loss against the combination of M teacher views, for ``N`` valid completion tokens.

    Args:
        student_logits: ``[N, V]`` student logits at the positions that predict ``tokens`` (with grad).
        view_logits: ``[M, N, V]`` the M views' teacher logits at the same positions (stop-gradient here).
        tokens: ``[N]`` the sampled completion token ids.
        spec: divergence, clip and importance-ratio cap. ``view.form`` decides the support, so ``spec.support``,
            ``top_k``, ``topk_from`` and ``tail_bucket`` are not used here.
        view: the combination (form, candidate top-k, weights).
        old_logps: ``[N]`` log-probs of ``tokens`` under the sampling policy, for the importance ratio.

    The sampled form caps its REINFORCE coefficient at tau for ``clip`` token and scale, exactly as the single-view
    sampled loss does; it has no entries to clip, so ``clip='entry'`` is an error.
    """
    if view_logits.dim() != 3 or view_logits.shape[0] == 0:
        raise ValueError(
            f"view logits have shape {tuple(view_logits.shape)}; pass [M, N, V], the M >= 1 teacher views stacked "
            "along the first dimension"
        )
    if view_logits.shape[1:] != student_logits.shape:
        raise ValueError(
            f"view logits {tuple(view_logits.shape)} do not match the student logits {tuple(student_logits.shape)}; "
            "each view must be [tokens, vocab] at the student's completion positions (same tokenizer, same tokens)"
        )
    n = student_logits.shape[0]
    if tokens.shape != (n,):
        raise ValueError(f"tokens {tuple(tokens.shape)} must be [N] = ({n},), one sampled id per position")
    if old_logps is not None and old_logps.shape != (n,):
        raise ValueError(f"old_logps {tuple(old_logps.shape)} must be [N] = ({n},), one log-prob per token")
    if view.form == "sampled":
        if spec.clip == "entry":
            raise ValueError(
                "clip='entry' clips each vocabulary entry, and form='sampled' has no entries; use clip='token' or "
                "'scale', or form='full'"
            )
        if spec.divergence != "reverse_kl":
            raise ValueError(
                "form='sampled' is the single-sample reverse-KL estimator; set divergence='reverse_kl' or use "
                f"form='full' for {spec.divergence}"
            )

    m = view_logits.shape[0]
    s_all = log_probs(student_logits)
    s_y = s_all.gather(-1, tokens[:, None]).squeeze(-1)
    ratio, ratio_clipped = importance_ratio(s_y, old_logps, spec.ratio_clip)
    # The candidate set: needed by the full form, and by the agreement JSD (weights or metric) when M > 1.
    needs_support = view.form == "full" or m > 1
    if view.top_k == 0 or not needs_support:
        ids = valid = None
    else:
        ids, valid = candidate_support(view_logits, tokens, view.top_k)
    views_y, views = _view_logps(view_logits, tokens, ids, s_all.dtype, needs_support)
    if ids is not None:
        views = _renormalise(views, valid)

    if m == 1:
        per_view_jsd = torch.zeros_like(views_y)
        weights = torch.ones_like(views_y)
    else:
        per_view_jsd = _mean_pairwise_jsd(views, valid)
        weights = _agreement_weights(per_view_jsd, view) if view.weights == "agreement" else torch.full_like(
            views_y, 1.0 / m
        )
    agreement = per_view_jsd.mean(0)

    if view.form == "sampled":
        combined = combine_views(s_y, views_y, weights, view.eps)
        loss, divergence, clipped = sampled_losses(s_y, combined.target, spec)
        gate, jensen = combined.gate, combined.jensen
        view_divergence = s_y.detach() - views_y
        logp_gap = combined.target - s_y.detach()
    else:
        s = s_all if ids is None else _renormalise(s_all.gather(-1, ids), valid)
        combined = combine_views(s, views, weights, view.eps)
        # With one view the target is the view itself, already normalised on C: skipping the no-op keeps M = 1
        # bit-identical to the single-view loss.
        target = combined.target if m == 1 else _renormalise(combined.target, valid)
        loss, divergence, clipped = support_losses(s, target, valid, spec)
        count = s.shape[-1] if valid is None else valid.sum(-1)
        gate = _masked_sum(combined.gate, valid) / count
        jensen = _masked_sum(combined.jensen, valid) / count
        with torch.no_grad():
            view_divergence = _masked_sum(divergence_terms(s.detach(), views, spec), valid)
        if ids is None:
            pos = tokens[:, None]
        else:
            pos = torch.searchsorted(ids, tokens[:, None].to(ids.dtype))  # the first (valid) occurrence of y_t
        logp_gap = (target.gather(-1, pos) - s.detach().gather(-1, pos)).squeeze(-1)

    return MultiViewLosses(
        tokens=TokenLosses(
            loss=loss * ratio,
            divergence=divergence,
            clipped=clipped,
            ratio=ratio,
            ratio_clipped=ratio_clipped,
            logp_gap=logp_gap.detach(),
        ),
        gate=gate.detach(),
        jensen=jensen.detach(),
        view_divergence=view_divergence.detach(),
        agreement=agreement.detach(),
    )


def multiview_summary(out: MultiViewLosses, names: Sequence[str]) -> dict[str, float]:
    """Token means of the detached quantities: :func:`selfdistill.losses.summarize` plus ``views/gate``,
    ``views/jensen``, ``views/agreement`` and ``views/divergence/<name>`` for each view, in view order."""
    names = list(names)
    m = out.view_divergence.shape[0]
    if len(names) != m:
        raise ValueError(f"got {len(names)} view names for {m} views; pass one name per view, in view order")
    if len(set(names)) != len(names):
        raise ValueError(f"view names {names} repeat; give each view a distinct name so its metric is not overwritten")
    if out.gate.numel() == 0:
        return {}
    metrics = summarize(out.tokens)
    metrics["views/gate"] = out.gate.mean().item()
    metrics["views/jensen"] = out.jensen.mean().item()
    metrics["views/agreement"] = out.agreement.mean().item()
    for name, divergence in zip(names, out.view_divergence.mean(-1).tolist()):
        metrics[f"views/divergence/{name}"] = divergence
    return metrics
