"""Checks of the training data that need no model: run by the trainer and, before the model loads, by
``selfdistill train``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from datasets import DatasetDict, IterableDataset, IterableDatasetDict

if TYPE_CHECKING:
    from selfdistill.config import SelfDistillConfig
    from selfdistill.sources.base import PrivilegedSource


def check_datasets(privileged: PrivilegedSource, args: SelfDistillConfig, train_dataset: Any,
                   eval_dataset: Any = None) -> None:
    """The columns the trainer and the source read, and enough prompts for one generation batch; raised before any
    model work (``selfdistill train`` calls it before the model loads)."""
    for split, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
            raise TypeError(f"{split} is a {type(dataset).__name__} (splits: {', '.join(dataset)}); pass one split, "
                            f"e.g. {split}=dataset[{next(iter(dataset), 'train')!r}]")
        if isinstance(dataset, (list, tuple, dict)):
            raise TypeError(f"{split} is a {type(dataset).__name__}; pass a datasets.Dataset (or IterableDataset), "
                            "e.g. datasets.Dataset.from_list(rows) for a list of row dicts")
        columns = getattr(dataset, "column_names", None)
        if columns is None and isinstance(dataset, IterableDataset):
            # A stream built from a generator declares no columns: read them off its first row (a fresh iterator,
            # so training still starts from the first row).
            first = next(iter(dataset), None)
            columns = list(first) if isinstance(first, dict) else None
        if isinstance(columns, list):
            if "prompt" not in columns:
                raise KeyError(
                    f"{split} has no 'prompt' column (columns: {', '.join(columns)}); rename the task column "
                    "with dataset.rename_column(old, 'prompt')"
                )
            privileged.check_dataset(columns)
            if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and len(dataset):
                check_rows(privileged, dataset, split)
    if train_dataset is not None and hasattr(train_dataset, "__len__"):
        per_batch = args.per_device_train_batch_size * args.steps_per_generation * args.world_size
        prompts = per_batch // args.num_generations
        if len(train_dataset) < prompts:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} prompts; one generation batch takes {prompts} distinct "
                f"prompts ({per_batch} rollouts / num_generations={args.num_generations}), so not one step could run. "
                "Add rows, or lower per_device_train_batch_size or steps_per_generation"
            )


def _which(rows: Sequence[int], total: int | str) -> str:
    shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
    return f"{len(rows)} of {total} rows (row{'s' if len(rows) > 1 else ''} {shown})"


def _empty_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(m["content"].strip() for m in prompt)


def check_rows(privileged: PrivilegedSource, dataset: Any, split: str) -> None:
    """Every row of an in-memory dataset: a prompt of a known type with some text in it, and a value in every column
    the source shows the teacher. One error per problem, with the count, the first row indices and the fix."""
    prompts = dataset["prompt"]
    columns = {column: dataset[column] for column in privileged.required_columns}
    check_row_values(privileged, prompts, columns, split, range(len(prompts)), len(prompts))


def check_stream_rows(privileged: PrivilegedSource, rows: list[dict[str, Any]], split: str, first: int,
                      render: Callable[[Any], list[int]], limit: int | None) -> None:
    """The checks of :func:`check_rows`, then :func:`check_prompt_lengths` (``render``: a prompt's token ids), on rows
    of a streamed dataset as they are first read; ``first`` is the number of rows read before ``rows[0]``, so an
    index counts rows in the order the trainer read them."""
    prompts = [row.get("prompt") for row in rows]
    columns = {column: [row.get(column) for row in rows] for column in privileged.required_columns}
    indices, total = range(first, first + len(rows)), f"the {len(rows)} streamed"
    try:
        check_row_values(privileged, prompts, columns, split, indices, total)
        if limit is not None:
            check_prompt_lengths(split, indices, [len(render(p)) for p in prompts], limit, total)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} {STREAM_ORDER}") from None


STREAM_ORDER = ("(A stream's rows are numbered in the order the trainer read them, after its shuffle buffer: row 0 is "
                "the first row read.)")


def check_row_values(privileged: PrivilegedSource, prompts: Sequence[Any], columns: dict[str, Sequence[Any]],
                     split: str, indices: Sequence[int], total: int | str) -> None:
    bad_type, empty = [], []
    for i, prompt in zip(indices, prompts):
        try:
            check_prompt(prompt, f"{split} row {i}")
        except TypeError as err:
            if not bad_type:
                first = err
            bad_type.append(i)
            continue
        if _empty_prompt(prompt):
            empty.append(i)
    if bad_type:
        raise TypeError(f"{split}: {_which(bad_type, total)} have a prompt of an unknown type; {first}")
    if empty:
        raise ValueError(
            f"{split}: {_which(empty, total)} have an empty prompt (no text in any message); every rollout needs a "
            "task. Drop them first, e.g. dataset.filter(lambda row: bool(row['prompt']))"
        )
    for column, values in columns.items():
        missing = [i for i, v in zip(indices, values) if v is None or (isinstance(v, str) and not v.strip())]
        if missing:
            raise ValueError(
                f"{split}: column {column!r}, which {type(privileged).__name__} shows the teacher, is empty or None in "
                f"{_which(missing, total)}. Fill it in, or drop those rows: dataset.filter(lambda row: "
                f"row[{column!r}] is not None and str(row[{column!r}]).strip() != '')"
            )


def check_prompt_lengths(split: str, indices: Sequence[int], lengths: Sequence[int], limit: int | None,
                         total: int | str) -> None:
    """Every rendered prompt fits ``max_prompt_length``: one error naming how many do not, which, and the fix."""
    if limit is None:
        return
    long = [(i, n) for i, n in zip(indices, lengths) if n > limit]
    if long:
        row, longest = max(long, key=lambda item: item[1])
        raise ValueError(
            f"{split}: {_which([i for i, _ in long], total)} have a prompt longer than max_prompt_length={limit} "
            f"tokens (the longest: {longest} tokens, row {row}; counted after the chat template). Raise "
            f"max_prompt_length to {longest}, or drop the long rows first, e.g. dataset.filter(lambda row: "
            f"len(tokenizer.apply_chat_template(row['prompt'], add_generation_prompt=True)) <= {limit})"
        )


def check_dataset_prompt_lengths(tokenizer: Any, dataset: Any, limit: int | None, split: str) -> None:
    """:func:`check_prompt_lengths` over every row of an in-memory dataset, once the tokenizer is known (before the
    first step); streamed rows are checked as they are read."""
    if limit is None or dataset is None or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return
    from selfdistill.sequences import render_context

    prompts = dataset["prompt"]
    if not len(prompts):
        return
    lengths = [len(render_context(tokenizer, prompt)) for prompt in prompts]
    check_prompt_lengths(split, range(len(prompts)), lengths, limit, len(prompts))


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` is a folder this process can write (made when missing), checked before any model work."""
    import os
    import tempfile

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir={output_dir!r} is a file, not a folder; give a folder for checkpoints and "
                         "results")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"output_dir={output_dir!r} cannot be written ({type(err).__name__}: {err.strerror or err}); "
                         "give a folder you can write to, or fix its permissions") from err


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


def check_sharding(args: SelfDistillConfig, zero3: bool, fsdp: bool, teacher_keeps_copy: bool) -> None:
    """What DeepSpeed ZeRO-3 and FSDP cannot do with the fused loss and a copied teacher."""
    if zero3 and args.fused_loss:
        raise ValueError(
            "fused_loss=True reads the output head's weight outside its forward, which DeepSpeed ZeRO-3 keeps "
            "partitioned; set fused_loss=False or use ZeRO-2"
        )
    if fsdp and teacher_keeps_copy:
        # FSDP gathers from its own flat shard storage, so a swapped-in copy would silently not be used.
        raise ValueError(
            f"teacher_policy={args.teacher_policy!r} keeps a copy of the trainable weights, which cannot be "
            "swapped into FSDP's sharded storage; use DeepSpeed ZeRO-3 (recipes/accelerate/deepspeed_zero3.yaml), "
            "or teacher_policy='live', or LoRA with teacher_policy='initial' (the adapter disabled)"
        )


def check_trainer_inputs(args: SelfDistillConfig, privileged: PrivilegedSource | None, reward_funcs: Any,
                         reward_weights: Sequence[float] | None, train_dataset: Any, eval_dataset: Any,
                         environment_factory: Callable[[], Any] | None) -> tuple[list[Callable], list[float]]:
    """SelfDistillTrainer's arguments that need no model, checked before it loads one; returns the reward functions
    as a list and their weights."""
    from selfdistill.config import SelfDistillConfig

    if not isinstance(args, SelfDistillConfig):
        hint = ("SelfDistillConfig(**args)" if isinstance(args, dict) else
                "SelfDistillConfig(...), which takes the TrainingArguments fields as well")
        raise TypeError(f"args must be a SelfDistillConfig, got {type(args).__name__}; build one with {hint}")
    if privileged is None:
        raise ValueError(
            "privileged= is required: the source of the teacher's privileged information, e.g. "
            "selfdistill.sources.ReferenceSolution(column='solution')"
        )
    if isinstance(privileged, str) or not hasattr(privileged, "views"):
        from selfdistill.sources.base import BUILTIN_SOURCES

        names = "; ".join(f"{name!r}: {path}" for name, path in BUILTIN_SOURCES.items())
        raise TypeError(
            f"privileged= takes a privileged-information source object, got {type(privileged).__name__} "
            f"{privileged!r:.80}; e.g. selfdistill.sources.ReferenceSolution(column='solution'). The names a recipe's "
            f"source.type takes are these classes: {names}"
        )
    funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs or [])
    for func in funcs:
        if not callable(func):
            raise TypeError(f"reward function {func!r} is not callable; pass functions in TRL's convention")
    weights = reward_weights if reward_weights is not None else args.reward_weights or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward_weights for {len(funcs)} reward_funcs")
    if privileged.needs_rewards and not funcs:
        raise ValueError(f"{type(privileged).__name__} needs rewards; pass reward_funcs=[...] (a verifier)")
    check_datasets(privileged, args, train_dataset, eval_dataset)
    if args.should_save:
        check_output_dir(args.output_dir)
    if args.grpo_weight > 0 and not (funcs or environment_factory):
        raise ValueError("grpo_weight > 0 needs rewards: pass reward_funcs=[...] or an environment_factory")
    if args.fused_loss and privileged.combine != "identity":
        raise ValueError(
            f"fused_loss=True is not available with a multi-view source ({type(privileged).__name__}); the view "
            "combiner needs every view's logits. Set fused_loss=False"
        )
    if privileged.shapes_advantages and args.grpo_weight == 0:
        raise ValueError(
            f"{type(privileged).__name__} reshapes the GRPO term's per-token advantages, but grpo_weight=0; set "
            "grpo_weight=1 (and distill_weight=0, as published)"
        )
    if args.rlsd_lambda > 0 and privileged.combine != "identity":
        raise ValueError(
            f"rlsd_lambda={args.rlsd_lambda} weights each token by one teacher view, but {type(privileged).__name__} "
            f"gives several per rollout (combine={privileged.combine!r}); use a single-view source such as "
            "ReferenceSolution"
        )
    return funcs, [float(w) for w in weights]
