"""Distillation losses fused with the output head, in token chunks: no ``[tokens, vocab]`` tensor exists in full.

The dense path (:func:`selfdistill.losses.token_losses` on logits) holds the student's and the teacher's
``[N, V]`` logits, their log-softmaxes and the gradient, several ``N x V`` float32 tensors (a 152k vocabulary at
16k tokens is about 10 GB each). Here the inputs are the final hidden states ``[N, H]`` and the head weights
``[V, H]``; for each chunk of ``chunk_size`` tokens the logits are formed, the same :func:`token_losses` runs on
them, and the gradient with respect to that chunk's hidden states and the head weight is taken right away, while
the chunk's logits exist. Peak memory is one chunk's ``c x V`` intermediates instead of ``N x V``.

Exactness: each chunk runs the dense code on the dense inputs, so values and gradients match the dense path up to
float summation order (tests compare both in float64). The per-token loss that comes out is differentiable; its
backward scales the precomputed gradients by the incoming per-token weights when they are all equal (the usual
``sum / normalizer``) and otherwise recomputes chunk by chunk with the given weights. The head weight's gradient is
accumulated in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from selfdistill.losses import LossSpec, TokenLosses, token_losses

#: Config attributes that change logits after the head; the fused path does not reproduce them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: Any) -> torch.nn.Module:
    """The model's output head, refusing heads whose logits the fused path cannot reproduce (bias, scaling)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output head with a weight; use fused_loss=False")
    if getattr(head, "bias", None) is not None:
        raise ValueError("the output head has a bias, which the fused loss does not include; use fused_loss=False")
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"the model's config sets {name}={value}, a transform of the logits after the head that the fused "
                "loss does not apply; use fused_loss=False"
            )
    return head


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _chunk_grads(h, w, th, tw, tokens, old, spec, weights, grad_hidden, grad_weight, sl) -> TokenLosses:
    """Loss of one chunk, and its gradient written into the hidden-state rows and added to the head's buffer.

    The gradient is taken with respect to the chunk's logits (``[c, V]``) and pushed through the head by hand:
    ``dh = g @ W`` and ``dW += g.T @ h`` (``addmm_`` in place), so no ``[V, H]`` temporary is formed per chunk.
    ``weights`` are the per-token weights of the backward (``None``: the plain sum).
    """
    with torch.no_grad():
        logits = h @ w.T
        teacher = th @ tw.T
    with torch.enable_grad():
        leaf = logits.requires_grad_(grad_hidden is not None or grad_weight is not None)
        out = token_losses(leaf, teacher, tokens, spec, old)
        if leaf.requires_grad:
            target = out.loss.sum() if weights is None else (out.loss * weights.to(out.loss.dtype)).sum()
            (g,) = torch.autograd.grad(target, leaf)
    if leaf.requires_grad:
        g = g.to(h.dtype)
        if grad_hidden is not None:
            grad_hidden[sl] = g @ w
        if grad_weight is not None:
            grad_weight.addmm_(g.T.to(grad_weight.dtype), h.to(grad_weight.dtype))
    return out


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, tokens, old_logps, spec, chunk_size):
        n = hidden.shape[0]
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dtype = _accumulation_dtype(hidden)
        outputs = {k: torch.empty(n, dtype=dtype, device=hidden.device)
                   for k in ("loss", "divergence", "clipped", "ratio", "ratio_clipped", "logp_gap")}
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=_accumulation_dtype(weight), device=weight.device) if needs[1] \
            else None
        for sl in _chunks(n, chunk_size):
            old = None if old_logps is None else old_logps[sl]
            out = _chunk_grads(hidden[sl].detach(), weight.detach(), teacher_hidden[sl], teacher_weight, tokens[sl],
                               old, spec, None, grad_hidden, grad_weight, sl)
            for key in outputs:
                outputs[key][sl] = getattr(out, key).detach().to(dtype)
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, tokens,
                              old_logps if old_logps is not None else torch.empty(0))
        ctx.has_old = old_logps is not None
        ctx.spec, ctx.chunk_size = spec, chunk_size
        ctx.grads = (grad_hidden, grad_weight)
        metrics = [outputs[k] for k in ("divergence", "clipped", "ratio", "ratio_clipped", "logp_gap")]
        ctx.mark_non_differentiable(*metrics)
        return (outputs["loss"], *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_loss.numel() and torch.all(grad_loss == grad_loss.reshape(-1)[0]):
            # In place: the [V, H] buffer is the weight's gradient; a scaled copy would hold two at once.
            scale = grad_loss.reshape(-1)[0]
            gh = None if grad_hidden is None else grad_hidden.mul_(scale.to(grad_hidden.dtype))
            gw = None if grad_weight is None else grad_weight.mul_(scale.to(grad_weight.dtype))
            if gw is not None and gw.dtype != ctx.saved_tensors[1].dtype:
                gw = gw.to(ctx.saved_tensors[1].dtype)
            return gh, gw, None, None, None, None, None, None
        # Per-token weights differ: recompute each chunk with its weights (exact, one more pass over the head).
        hidden, weight, teacher_hidden, teacher_weight, tokens, old_logps = ctx.saved_tensors
        gh = torch.zeros_like(hidden) if grad_hidden is not None else None
        gw = torch.zeros(weight.shape, dtype=_accumulation_dtype(weight), device=weight.device) \
            if grad_weight is not None else None
        for sl in _chunks(hidden.shape[0], ctx.chunk_size):
            _chunk_grads(hidden[sl].detach(), weight.detach(), teacher_hidden[sl], teacher_weight, tokens[sl],
                         old_logps[sl] if ctx.has_old else None, ctx.spec, grad_loss[sl], gh, gw, sl)
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None, None, None, None


def fused_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    tokens: torch.Tensor,
    spec: LossSpec,
    old_logps: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> TokenLosses:
    """:func:`selfdistill.losses.token_losses` from hidden states and head weights, ``chunk_size`` tokens at a time.

    Args:
        hidden: ``[N, H]`` the student's final hidden states at the positions predicting ``tokens`` (with grad).
        weight: ``[V, H]`` the student's output-head weight (with grad when it is trained).
        teacher_hidden: ``[N, H]`` the teacher's hidden states at the same positions (stop-gradient).
        teacher_weight: ``[V, H]`` the teacher's head weight (the same tensor as ``weight`` when the head is shared).
        tokens, spec, old_logps: as in :func:`token_losses`.
        chunk_size: tokens per chunk; peak memory grows with ``chunk_size x V``.
    """
    if hidden.shape != teacher_hidden.shape or hidden.dim() != 2:
        raise ValueError(
            f"student hidden states {tuple(hidden.shape)} and teacher hidden states {tuple(teacher_hidden.shape)} "
            "must both be [tokens, hidden] at the same completion positions"
        )
    if weight.shape != teacher_weight.shape or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"head weights {tuple(weight.shape)} / {tuple(teacher_weight.shape)} do not match hidden size "
            f"{hidden.shape[1]}; both must be [vocab, hidden]"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    loss, divergence, clipped, ratio, ratio_clipped, logp_gap = _FusedHeadLoss.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), tokens, old_logps, spec, chunk_size
    )
    return TokenLosses(loss=loss, divergence=divergence, clipped=clipped, ratio=ratio, ratio_clipped=ratio_clipped,
                       logp_gap=logp_gap)
