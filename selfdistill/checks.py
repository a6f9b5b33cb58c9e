"""Checks of the training data that need no model: run by the trainer and, before the model loads, by
``selfdistill train``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from selfdistill.config import SelfDistillConfig
    from selfdistill.sources.base import PrivilegedSource


def check_datasets(privileged: PrivilegedSource, args: SelfDistillConfig, train_dataset: Any,
                   eval_dataset: Any = None) -> None:
    """The columns the trainer and the source read, and enough prompts for one generation batch; raised before any
    model work (``selfdistill train`` calls it before the model loads)."""
    for split, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        columns = getattr(dataset, "column_names", None)
        if isinstance(columns, list):
            if "prompt" not in columns:
                raise KeyError(
                    f"{split} has no 'prompt' column (columns: {', '.join(columns)}); rename the task column "
                    "with dataset.rename_column(old, 'prompt')"
                )
            privileged.check_dataset(columns)
            if hasattr(dataset, "__len__") and len(dataset):
                for i, prompt in enumerate(dataset.select(range(min(len(dataset), 64)))["prompt"]):
                    check_prompt(prompt, f"{split} row {i}")
    if train_dataset is not None and hasattr(train_dataset, "__len__"):
        per_batch = args.per_device_train_batch_size * args.steps_per_generation * args.world_size
        prompts = per_batch // args.num_generations
        if len(train_dataset) < prompts:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} prompts; one generation batch takes {prompts} distinct "
                f"prompts ({per_batch} rollouts / num_generations={args.num_generations}), so not one step could run. "
                "Add rows, or lower per_device_train_batch_size or steps_per_generation"
            )


def check_prompt(prompt: Any, where: str) -> None:
    """A prompt is plain text or a conversation: a list of {"role": ..., "content": ...} messages."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return
    raise TypeError(
        f"{where}: the prompt is {type(prompt).__name__} {repr(prompt)[:80]}; a prompt is a string (plain text) or a "
        'list of messages like [{"role": "user", "content": "..."}] (conversational, rendered with the chat template)'
    )
