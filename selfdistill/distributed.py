"""Multi-process helpers: metrics reduced over ranks, one privileged-source state, ZeRO-3 gathering, rank checks.

The trainer runs unchanged under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3). What one process cannot get
right by itself lives here:

- metrics: every rank accumulates ``(weighted sum, weight)`` per key; at log time the pairs are summed over ranks,
  so a logged mean is the mean over the global batch, a count is the global count, and a ``time/`` figure is the
  slowest rank's (the one the others wait for);
- the privileged source: each rank samples different prompts, but a stateful source (a skill bank) must see every
  rank's rollouts and hold one state. :func:`observe_everywhere` gathers the rollouts of all ranks, lets every rank
  observe the same list, then hands rank 0's state to every rank, so the states cannot drift apart even when
  ``observe`` is not deterministic (it may sample from the model);
- ZeRO-3: a parameter's local data is its partition; :func:`gathered` assembles full weights for code that reads
  them (greedy evaluation, checksums), on every rank at once, since gathering is a collective;
- :func:`rank_report`: a checksum of the weights on every rank, written to ``results.json`` so a run proves that its
  ranks trained one model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch


def leave_process_group(accelerator: Any) -> None:
    """End a multi-process run cleanly: every rank waits for the others, then the default process group is destroyed.
    Left to interpreter exit, its teardown can race a peer that already left and abort the process
    ("terminate called without an active exception", exit code -6) after a run that completed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by DeepSpeed ZeRO-3 (its local data is ``param.ds_tensor``)."""
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_numel")


def is_zero3_model(model: torch.nn.Module) -> bool:
    return any(is_zero3_param(p) for p in model.parameters())


def zero_stage(accelerator: Any) -> int:
    """The DeepSpeed ZeRO stage the accelerator runs with (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Full weights inside the block under ZeRO-3 (read-only: changes are dropped); a no-op otherwise.

    Every rank must enter it: gathering is a collective.
    """
    if not is_zero3_model(model):
        with nullcontext():
            yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield model


# --------------------------------------------------------------------------------------------------- metrics
def reduce_metrics(accelerator: Any, metrics: dict[str, list[float]]) -> dict[str, list[float]]:
    """Sum the per-rank ``[total, weight]`` accumulators over ranks; ``time/...|sum`` keys take the slowest rank,
    ``...|min`` / ``...|max`` keys the extreme over the ranks that recorded them.

    Keys may differ between ranks (a verifier that scored nothing on one rank); the union is reduced, a missing key
    counting as ``[0, 0]``. Every rank must call this at the same point (``log`` runs on every rank).
    """
    if accelerator.num_processes <= 1:
        return metrics
    from accelerate.utils import gather_object

    keys = sorted(set(gather_object(sorted(metrics))))
    if not keys:
        return {}
    local = torch.tensor([metrics.get(k, [0.0, 0.0]) for k in keys], dtype=torch.float64,
                         device=accelerator.device)
    every = accelerator.gather(local[None]).reshape(accelerator.num_processes, len(keys), 2)
    summed, slowest = every.sum(0), every.max(0).values
    out = {}
    for i, key in enumerate(keys):
        if key.endswith(("|min", "|max")):  # over the ranks that recorded it (weight 1); none: weight 0
            present = every[:, i, 0][every[:, i, 1] > 0]
            value = (present.min() if key.endswith("|min") else present.max()) if present.numel() else 0.0
            out[key] = [float(value), float(present.numel() > 0)]
            continue
        row = slowest[i] if key.startswith("time/") and key.endswith("|sum") else summed[i]
        out[key] = [float(row[0]), float(row[1])]
    return out


# ------------------------------------------------------------------------------------------ privileged source
def feedback_everywhere(source: Any, tags: Sequence[Any], signals: Sequence[dict], accelerator: Any) -> None:
    """``source.feedback`` with every rank's view tags and outcomes, in rank order, on every rank: a stateful source
    (Skill-SD's skill credits) then learns from all ranks' rollouts and keeps one state. Every rank must call it the
    same number of times (once per micro-batch), also when its own micro-batch carries no tags."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        per_rank = gather_object([(list(tags), list(signals))])
        tags = [t for part_tags, _ in per_rank for t in part_tags]
        signals = [s for _, part_signals in per_rank for s in part_signals]
    if any(tag for tag in tags):
        source.feedback(tags, signals)


def observe_everywhere(source: Any, rollouts: Sequence[Any], accelerator: Any) -> None:
    """``source.observe`` with every rank's rollouts, then rank 0's state on every rank.

    Group indices are renumbered so that prompt groups of different ranks stay apart. One process: a plain
    ``observe``.
    """
    if accelerator.num_processes <= 1:
        source.observe(rollouts)
        return
    from accelerate.utils import broadcast_object_list, gather_object

    per_rank = gather_object([list(rollouts)])
    everything, offset = [], 0
    for part in per_rank:
        everything += [dataclasses.replace(r, group=r.group + offset) for r in part]
        offset += max((r.group for r in part), default=-1) + 1
    source.observe(everything)
    if is_stateful(source):
        state = [source.state_dict() if accelerator.is_main_process else None]
        broadcast_object_list(state, from_process=0)
        if not accelerator.is_main_process:
            source.load_state_dict(state[0])


def is_stateful(source: Any) -> bool:
    """Whether the source overrides ``observe`` (it learns from rollouts and has a state to keep in step)."""
    from selfdistill.sources.base import PrivilegedSource

    return type(source).observe is not PrivilegedSource.observe


def broadcast_source_state(source: Any, accelerator: Any) -> None:
    """Rank 0's source state on every rank (after a resume, or before a checkpoint)."""
    if accelerator.num_processes <= 1 or not is_stateful(source):
        return
    from accelerate.utils import broadcast_object_list

    state = [source.state_dict() if accelerator.is_main_process else None]
    broadcast_object_list(state, from_process=0)
    if not accelerator.is_main_process:
        source.load_state_dict(state[0])


# ------------------------------------------------------------------------------------------------ rank checks
@torch.no_grad()
def weights_checksum(model: torch.nn.Module) -> list[float]:
    """Order-sensitive float64 fingerprint of the full weights: ``[sum, sum of squares, position-weighted sum]``.

    Two ranks holding the same weights get bit-identical numbers (same tensors, same reduction order). Under ZeRO-3
    the parameters are gathered one at a time, so every rank must call this.
    """
    total = torch.zeros(3, dtype=torch.float64)
    for i, (_, param) in enumerate(sorted(model.named_parameters())):
        with gathered_param(param):
            flat = param.detach().double().reshape(-1).cpu()
            total += torch.stack([flat.sum(), flat.square().sum(), (i + 1) * flat.sum()])
    return total.tolist()


@contextmanager
def gathered_param(param: torch.Tensor) -> Iterator[None]:
    if not is_zero3_param(param):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield


def rank_report(model: torch.nn.Module, accelerator: Any) -> dict[str, Any]:
    """Each rank's weight checksum and whether they agree (they must: ranks train one model)."""
    from accelerate.utils import gather_object

    checksums = gather_object([weights_checksum(model)])
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "zero_stage": zero_stage(accelerator),
        "weight_checksums": checksums,
        "ranks_agree": all(c == checksums[0] for c in checksums),
    }


def release_zero3(engine: Any) -> Any:
    """A callable that frees every ZeRO-3-gathered parameter of ``engine`` (None when it is no ZeRO-3 engine).

    Waits for in-flight prefetches first (DeepSpeed's own release of all parameters), so no gather started from
    one set of partitions lands after they were swapped.
    """
    optimizer = getattr(engine, "optimizer", None)
    if hasattr(optimizer, "empty_partition_cache"):
        return optimizer.empty_partition_cache
    if hasattr(engine, "empty_partition_cache") and is_zero3_model(engine):
        return engine.empty_partition_cache
    return None
