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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the core importable without it
        return False
    return isinstance(model, PeftModel)


class TeacherWeights:
    """Owns the teacher's copy of the trainable parameters and swaps it in for the teacher pass."""

    def __init__(self, model: torch.nn.Module, policy: str = "initial", ema_rate: float = 0.05, update_every: int = 1):
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
        self.params: dict[str, torch.Tensor] = {}
        if copies:
            named = dict(model.named_parameters())
            self.params = {n: named[n].detach().clone() for n in self.names}

    @contextmanager
    def scoring(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Context in which ``model`` computes with the teacher's weights (no grad)."""
        with torch.no_grad():
            if self.policy == "live":
                yield model
                return
            if self.use_disabled_adapter:
                with model.disable_adapter():
                    yield model
                return
            named = dict(model.named_parameters())
            swapped = []
            try:
                for name, teacher_tensor in self.params.items():
                    param = named[name]
                    student_data = param.data
                    param.data = teacher_tensor
                    self.params[name] = student_data
                    swapped.append(name)
                yield model
            finally:
                for name in swapped:
                    param = named[name]
                    teacher_tensor = param.data
                    param.data = self.params[name]
                    self.params[name] = teacher_tensor

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> bool:
        """Apply the EMA or sync rule after optimizer step ``step`` (1-based); returns whether it changed."""
        if self.policy not in ("ema", "sync") or step % self.update_every:
            return False
        named = dict(model.named_parameters())
        for name, teacher_tensor in self.params.items():
            student = named[name].detach().to(teacher_tensor.dtype)
            if self.policy == "sync":
                teacher_tensor.copy_(student)
            else:
                teacher_tensor.lerp_(student, self.ema_rate)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu() for name, t in self.params.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(
                f"the checkpoint's teacher state lacks {len(missing)} parameters (e.g. {sorted(missing)[0]!r}); was it "
                "saved with another model or teacher_policy?"
            )
        for name, tensor in self.params.items():
            tensor.copy_(state[name].to(tensor.device, tensor.dtype))
