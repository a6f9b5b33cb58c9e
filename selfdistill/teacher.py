"""Teacher-weights policies (METHODS.md §1): which weights score the rollouts.

- ``live``: the current student weights, used under ``no_grad``.
- ``initial``: the weights at the start. Under LoRA this is the base model with the adapter disabled (free);
  under full fine-tuning a frozen copy of the trainable parameters.
- ``ema``: theta_T <- (1 - alpha) theta_T + alpha theta every k optimizer steps.
- ``sync``: a hard copy theta_T <- theta every k optimizer steps.

The teacher is the *same network*: for the teacher pass the trainable parameters' storage is swapped with the
teacher copy and swapped back afterwards. A swap exchanges tensor handles, so it costs no copy, and frozen
parameters (the base model under LoRA) are never duplicated. The module's train/eval mode is left alone: calling
``.eval()`` on shared weights would switch the student's dropout off.

Under LoRA the trainable parameters are the adapter's: ``ema`` and ``sync`` keep copies of the adapter tensors
only (a few MB), never of the base model.

Under DeepSpeed ZeRO-3 a parameter's local data is its partition ``param.ds_tensor`` (``param.data`` is empty
outside a forward), so the teacher keeps and swaps each rank's partition only: 1/N of the trainable weights per
rank, no gathered copy. DeepSpeed gathers a parameter from the ranks' ``ds_tensor`` when a module needs it and may
keep it gathered for a later use; the scoring context therefore releases every gathered parameter before the swap
(so the teacher's partitions are gathered) and again before swapping back (so the student never computes with
gathered teacher weights). The copy is made on first use, after ``deepspeed.initialize`` has partitioned the
model (``defer=True``); a copy taken earlier, or a full state from a checkpoint, is cut to the local partition.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import TrainerCallback

from selfdistill.distributed import is_zero3_param


def _local(param: torch.Tensor) -> torch.Tensor:
    """The tensor that holds this rank's data of a parameter: its ZeRO-3 partition, or the parameter itself."""
    return param.ds_tensor if is_zero3_param(param) else param


def _partition_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full tensor: the flattened tensor, padded, cut into equal slices."""
    import torch.distributed as dist

    size = param.ds_tensor.numel()
    group = getattr(param, "ds_process_group", None)
    rank = dist.get_rank(group=group)
    flat = full.reshape(-1)
    out = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    piece = flat[rank * size : (rank + 1) * size]
    out[: piece.numel()] = piece
    return out


def _gather_full(part: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The full tensor from every rank's ZeRO-3 partition (a collective: every rank calls it)."""
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    pieces = [torch.empty_like(part) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(pieces, part.contiguous(), group=group)
    return torch.cat(pieces)[: param.ds_numel].view(param.ds_shape)


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the core importable without it
        return False
    return isinstance(model, PeftModel)


class TeacherWeights:
    """Owns the teacher's copy of the trainable parameters and swaps it in for the teacher pass."""

    def __init__(self, model: torch.nn.Module, policy: str = "initial", ema_rate: float = 0.05, update_every: int = 1,
                 defer: bool = False):
        self.policy = policy
        self.ema_rate = ema_rate
        self.update_every = update_every
        self.use_disabled_adapter = policy == "initial" and _is_peft(model)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        copies = policy in ("ema", "sync") or (policy == "initial" and not self.use_disabled_adapter)
        if copies and not self.names:
            raise ValueError(
                f"teacher_policy={policy!r} copies the trainable parameters, but the model has none; unfreeze "
                "parameters or use teacher_policy='live'"
            )
        self.keeps_copy = copies
        self.params: dict[str, torch.Tensor] = {}
        # Under ZeRO-3 the copy waits until the model is partitioned (defer): a full copy would defeat the sharding.
        self._pending = copies and defer
        if copies and not defer:
            named = dict(model.named_parameters())
            self.params = {n: _local(named[n]).detach().clone() for n in self.names}

    def _localize(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Make each teacher tensor match its parameter's local data (partition, device, dtype); the named params."""
        named = dict(model.named_parameters())
        if self._pending:
            self.params = {n: _local(named[n]).detach().clone() for n in self.names}
            self._pending = False
        for name, tensor in self.params.items():
            param = named[name]
            local = _local(param)
            if is_zero3_param(param) and tensor.numel() != local.numel():
                if tensor.numel() != param.ds_numel:
                    raise ValueError(
                        f"teacher copy of {name!r} has {tensor.numel()} elements; the parameter has {param.ds_numel} "
                        f"(local partition {local.numel()}): the teacher state belongs to another model"
                    )
                tensor = _partition_of(tensor, param)
            if tensor.device != local.device or tensor.dtype != local.dtype:
                tensor = tensor.to(local.device, local.dtype)
            self.params[name] = tensor
        return named

    @contextmanager
    def scoring(self, model: torch.nn.Module, release: Any = None) -> Iterator[torch.nn.Module]:
        """Context in which ``model`` computes with the teacher's weights (no grad).

        ``release``: under ZeRO-3, a callable that frees every gathered parameter (``release_zero3``); called
        before and after the swap so no gathered tensor outlives the weights it was gathered from.
        """
        with torch.no_grad():
            if self.policy == "live":
                yield model
                return
            if self.use_disabled_adapter:
                with model.disable_adapter():
                    yield model
                return
            named = self._localize(model)
            zero3 = any(is_zero3_param(named[n]) for n in self.params)
            if zero3 and release is None:
                raise ValueError(
                    "the model is partitioned by DeepSpeed ZeRO-3; TeacherWeights.scoring needs release= (e.g. "
                    "selfdistill.distributed.release_zero3(engine)) to free gathered weights around the swap"
                )
            swapped = []
            try:
                if zero3:
                    release()
                for name, teacher_tensor in self.params.items():
                    local = _local(named[name])
                    student_data = local.data
                    local.data = teacher_tensor
                    self.params[name] = student_data
                    swapped.append(name)
                yield model
            finally:
                if zero3:
                    release()
                for name in swapped:
                    local = _local(named[name])
                    teacher_tensor = local.data
                    local.data = self.params[name]
                    self.params[name] = teacher_tensor

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> bool:
        """Apply the EMA or sync rule after optimizer step ``step`` (1-based); returns whether it changed."""
        if self.policy not in ("ema", "sync") or step % self.update_every:
            return False
        named = self._localize(model)
        for name, teacher_tensor in self.params.items():
            student = _local(named[name]).detach().to(teacher_tensor.dtype)
            if self.policy == "sync":
                teacher_tensor.copy_(student)
            else:
                teacher_tensor.lerp_(student, self.ema_rate)
        return True

    def state_dict(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Full teacher tensors on the CPU, independent of the number of ranks.

        Under ZeRO-3 pass the model: the partitions are gathered from every rank (a collective: every rank calls it).
        """
        if model is None:
            if self._pending:
                raise ValueError("the teacher copy is made on first use; pass the model to state_dict")
            return {name: t.detach().cpu() for name, t in self.params.items()}
        named = self._localize(model)
        out = {}
        for name, tensor in self.params.items():
            param = named[name]
            full = _gather_full(tensor, param) if is_zero3_param(param) else tensor
            out[name] = full.detach().cpu()
        return out

    def load_state_dict(self, state: dict[str, Any], model: torch.nn.Module | None = None) -> None:
        """Restore full tensors saved by :meth:`state_dict`; under ZeRO-3 pass the model (each rank keeps its
        partition), so a state saved on N ranks loads on M."""
        if self._pending:
            if model is None:
                raise ValueError("the teacher copy is made on first use; pass the model to load_state_dict")
            self._localize(model)
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(
                f"the checkpoint's teacher state lacks {len(missing)} parameters (e.g. {sorted(missing)[0]!r}); was it "
                "saved with another model or teacher_policy?"
            )
        named = dict(model.named_parameters()) if model is not None else {}
        for name, tensor in self.params.items():
            full = state[name]
            param = named.get(name)
            if param is not None and is_zero3_param(param) and full.numel() != tensor.numel():
                full = _partition_of(full, param)
            tensor.copy_(full.reshape(tensor.shape).to(tensor.device, tensor.dtype))


class TeacherUpdate(TrainerCallback):
    """Applies the teacher policy's update (``ema``, ``sync``) after each optimizer step."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if self.trainer.teacher.update(model, state.global_step):
            self.trainer.recorder.record("train", "teacher/updates", 1.0, 1.0, reduce="sum")
