"""The parts of one optimizer step that `SelfDistillTrainer` wires together, as functions of their inputs.

- :func:`micro_batches`: a generation batch's rollouts split into the micro-batches of its optimizer step(s).
- :func:`set_normalizers`: each micro-batch's loss divisor, the completion-token count of its whole step.
- :func:`teacher_outputs`: the teacher pass over every view of a micro-batch.
- :func:`sampling_logps`: log pi_old of the sampled tokens, for rollouts trained on more than once.
- :func:`policy_gradient_term`: the GRPO term beside the distillation loss.
- :func:`check_finite`: NaN/inf logits named with their side and the fix.
- :func:`scored_counts`, :func:`source_feedback`: each rollout's loss tokens, and its outcome handed back to the
  privileged source.

None of them knows a method: the privileged source has already produced the teacher contexts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from trl.trainer.utils import selective_log_softmax

from selfdistill.distributed import feedback_everywhere
from selfdistill.grpo import policy_gradient_losses
from selfdistill.rollout import NON_FINITE_FIX, NonFiniteLogits
from selfdistill.sequences import completion_logits, score_completions, splice


def micro_batches(fields: dict[str, list[Any] | None], lengths: Sequence[int], n_micro: int,
                  distill_lengths: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Split per-rollout ``fields`` (``None`` stays ``None``) into ``n_micro`` consecutive micro-batches; each
    also counts its loss tokens (``lengths``) under ``"tokens"``, and those of the distillation loss
    (``distill_lengths``: 0 for a rollout no view trains; default ``lengths``) under ``"distill_tokens"``."""
    size = math.ceil(len(lengths) / n_micro)
    distill_lengths = lengths if distill_lengths is None else distill_lengths
    micro = []
    for k in range(n_micro):
        sl = slice(k * size, (k + 1) * size)
        batch = {key: None if values is None else values[sl] for key, values in fields.items()}
        batch["tokens"] = sum(lengths[sl])
        batch["distill_tokens"] = sum(distill_lengths[sl])
        micro.append(batch)
    return micro


def set_normalizers(micro: list[dict[str, Any]], window: int, accelerator: Any) -> None:
    """Each micro-batch's loss is divided by the completion-token count of its whole optimizer step (``window``
    micro-batches), summed over ranks; DDP averages gradients over ranks, so each rank divides by its share. The
    distillation term has its own count (``distill_normalizer``): the tokens of the rollouts a view trains, the same
    count unless a source marks views ``trains=False``."""
    counts = [[sum(m.get(key, m["tokens"]) for m in micro[start : start + window])
               for start in range(0, len(micro), window)] for key in ("tokens", "distill_tokens")]
    global_counts = torch.tensor(counts, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        global_counts = accelerator.gather(global_counts[None]).sum(0)
    for i, m in enumerate(micro):
        total, distill = float(global_counts[0, i // window]), float(global_counts[1, i // window])
        if total == 0:
            raise ValueError(
                "every rollout of this optimizer step has zero completion tokens; check max_completion_length "
                "and that the EOS token is not forced at the first position"
            )
        m["normalizer"] = total / accelerator.num_processes
        # no rollout of the step has a training view: its distillation term is zero (any positive divisor)
        m["distill_normalizer"] = (distill or 1.0) / accelerator.num_processes


def check_finite(logits: torch.Tensor, side: str) -> None:
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(-1).sum())
        raise NonFiniteLogits(
            f"the {side} pass produced NaN/inf logits at {bad} completion tokens; {NON_FINITE_FIX}"
        )


def teacher_outputs(
    teacher_model: torch.nn.Module, inputs: dict[str, Any], head: torch.nn.Module | None, pad_id: int,
    device: torch.device, share_prefix: bool, batch_views: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher outputs at the valid completion positions: ``[M, N, V]`` logits (``[M, N, H]`` hidden states and
    the teacher's head weight under the fused loss), for the M views of every rollout of the micro-batch.

    Call it with the teacher's weights in place (``TeacherWeights.scoring``). Rollout r's view v is sequence
    v * B + r: all views of a micro-batch go through the teacher together (one forward over M x B sequences)
    unless ``batch_views`` is off.
    """
    n_views = len(inputs["teacher_ids"][0])
    contexts = [ids[v] for v in range(n_views) for ids in inputs["teacher_ids"]]
    scored = [comp[v] for v in range(n_views) for comp in inputs["teacher_completion_ids"]]
    group = len(contexts) if batch_views else len(inputs["teacher_ids"])
    pieces = []
    for i in range(0, len(contexts), group):
        batch = splice(contexts[i : i + group], scored[i : i + group], pad_id).to(device)
        out = score_completions(teacher_model, batch, contexts[i : i + group], share_prefix, head)
        pieces.append(out[batch.completion_mask.bool()])
    # While the teacher's weights are in place the head holds them; detach() keeps that storage, no copy.
    teacher_head = None if head is None else head.weight.detach()
    teacher_out = torch.cat(pieces).view(n_views, -1, pieces[0].shape[-1])
    check_finite(teacher_out, "teacher")
    return teacher_out, teacher_head


def digit_tokens(tokenizer: Any) -> torch.Tensor:
    """``[len(tokenizer)]`` bools: which token ids spell a digit (for the digit share of the per-token divergence)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([any(c.isdigit() for c in (p or "")) for p in pieces], dtype=torch.bool)


def digit_share(values: torch.Tensor, tokens: torch.Tensor, is_digit: torch.Tensor) -> dict[str, float]:
    """The share of ``values`` (a per-token divergence, ``[N]``, >= 0) carried by the tokens that spell digits, and
    the share of such tokens: does the signal sit on the answer's digits or on the wording around them (the style
    drift arXiv 2606.11709 describes)? Empty when there are no tokens or no divergence."""
    if tokens.numel() == 0:
        return {}
    fraction, share = mask_share(values, spells_digit(tokens, is_digit))
    out = {"divergence/digit_token_fraction": fraction}
    if share is not None:
        out["divergence/digit_share"] = share
    return out


def spells_digit(tokens: torch.Tensor, is_digit: torch.Tensor) -> torch.Tensor:
    """``[N]`` bools: which of ``tokens`` spell a digit (ids beyond the tokenizer, e.g. a padded vocabulary, do not)."""
    return is_digit.to(tokens.device)[tokens.clamp(0, is_digit.numel() - 1)] & (tokens < is_digit.numel())


def mask_share(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float | None]:
    """The share of positions in ``mask``, and the share of ``values`` (>= 0) they carry (None when all are 0)."""
    values = values.detach().float()
    total = values.sum()
    return mask.float().mean().item(), (values[mask].sum() / total).item() if total > 0 else None


@torch.no_grad()
def sampling_logps(model: torch.nn.Module, prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int,
                   device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """log pi_old(y_t) of each rollout under the weights that sampled it (for the importance ratio)."""
    out = []
    step = max(batch_size, 1)
    for i in range(0, len(prompt_ids), step):
        batch = splice(prompt_ids[i : i + step], completions[i : i + step], pad_id).to(device)
        logits = completion_logits(model, batch).float()
        logps = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None])[..., 0]
        for row, comp in zip(logps, completions[i : i + step]):
            out.append(row[: len(comp)].cpu())
    return out


def repeat_per_token(values: Sequence[Any], counts: Sequence[int], device: torch.device,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-rollout ``values`` (numbers, bools, or equal-length rows) repeated over each rollout's ``counts`` tokens:
    ``[N]``, or ``[N, M]`` for rows."""
    repeats = torch.tensor(counts, device=device)
    return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(repeats, dim=0)


def policy_gradient_term(student_logits: torch.Tensor, tokens: torch.Tensor, advantages: list[float] | None,
                         counts: list[int], old_logps: torch.Tensor | None, epsilon: float,
                         epsilon_high: float | None, shape: Callable | None = None
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token GRPO losses of the scored tokens (each rollout's advantage repeated over its ``counts`` tokens).
    ``shape(advantages [N], student_logp [N]) -> (advantages [N], metrics)`` reshapes the per-token advantages
    first (RLSD: selfdistill.methods.rlsd; a source's ``shape_advantages``, RLCSD)."""
    device = student_logits.device
    logp = selective_log_softmax(student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)), tokens)
    # No rollout of the batch was scored (every verifier failed): no policy-gradient signal.
    adv = repeat_per_token(advantages or [0.0] * len(counts), counts, device, logp.dtype)
    shaped_metrics: dict[str, float] = {}
    if shape is not None:
        adv, shaped_metrics = shape(adv, logp)
    pg, clipped = policy_gradient_losses(logp, adv, old_logps, epsilon, epsilon_high)
    metrics = {}
    if pg.numel():
        metrics = {"grpo/loss": pg.detach().mean().item(), "grpo/clip_fraction": clipped.mean().item(),
                   "grpo/advantage_abs": adv.abs().mean().item(), **shaped_metrics}
    return pg, metrics


def scored_counts(inputs: dict[str, Any]) -> list[int]:
    """Tokens the loss covers in each rollout of the micro-batch."""
    if inputs.get("loss_masks") is not None:
        return [sum(m) for m in inputs["loss_masks"]]
    return [len(c) for c in inputs["completion_ids"]]


def source_feedback(source: Any, inputs: dict[str, Any], logp_gap: torch.Tensor, counts: list[int],
                    accelerator: Any) -> None:
    """Hand each view's tag back to the source with its rollout's outcome (e.g. to credit skills); every rank
    calls this in step, so the source's state stays the same everywhere."""
    tags = inputs.get("view_tags") or []
    if accelerator.num_processes == 1 and not any(tags):
        return
    advantages = inputs.get("advantages") or [None] * len(counts)
    signals = []
    for gap, reward, advantage in zip(torch.split(logp_gap.detach().float(), counts), inputs["rewards"], advantages):
        signals.append({"reward": reward, "advantage": advantage,
                        "logp_gap": gap.mean().item() if gap.numel() else 0.0})
    feedback_everywhere(source, tags, signals, accelerator)
