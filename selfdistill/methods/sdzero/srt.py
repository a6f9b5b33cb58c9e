"""SD-Zero phase 1, self-revision training (SRT; arXiv 2604.12002, METHODS.md §3).

    1. sample an initial response y_init for each training prompt and verify it (reward r);
    2. sample revisions from the reviser context ``x ⊕ y_init ⊕ cue(r)`` (the same layout the phase-2 teacher sees);
    3. keep the revisions the verifier accepts;
    4. fine-tune on them with TRL's ``SFTTrainer`` (loss on the revision tokens only).

The phase-2 trainer is then built on the fine-tuned model, so its ``initial`` teacher *is* the phase-1 reviser,
and ``teacher_policy: sync`` re-copies the student into it every k steps (the paper's iterative self-evolution).
Token ids are spliced, never re-tokenised: the SFT example is exactly the context the teacher will score after.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from selfdistill.methods.sdzero.source import Reviser
from selfdistill.rollout import eos_ids, sample_completions, sampling_precision, verify_completions
from selfdistill.sequences import continuation_ids, render_context
from selfdistill.sources.base import Rollout


@dataclass
class RevisionConfig:
    """Settings of self-revision training (the paper: SFT at lr 5e-6 for 3 epochs)."""

    enabled: bool = True
    prompts: int = 256  # training prompts that get an initial response
    revisions: int = 2  # revisions sampled per initial response
    temperature: float = 1.0  # for both the initial responses and the revisions
    max_new_tokens: int = 32
    batch_size: int = 64  # generation batch
    epochs: float = 3.0
    learning_rate: float = 5e-6
    train_batch_size: int = 8
    max_per_prompt: int = 1  # accepted revisions kept per prompt (several copies of one easy prompt overfit)
    keep_truncated: bool = False  # keep accepted revisions cut at max_new_tokens (they would teach not to stop)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompts", "revisions", "max_new_tokens", "batch_size", "train_batch_size", "max_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"srt.{name}={getattr(self, name)} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"srt.temperature={self.temperature} must be > 0 (revisions are sampled)")
        if not self.epochs > 0 or not self.learning_rate > 0:
            raise ValueError("srt.epochs and srt.learning_rate must be > 0")


def collect_revisions(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    reviser: Reviser,
    reward_funcs: Sequence[Callable],
    config: RevisionConfig,
    progress: bool = True,
    timeout: float | None = 60.0,
) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Steps 1-3: SFT examples ``{"input_ids", "labels"}`` (labels -100 outside the revision) and statistics."""
    if not reward_funcs:
        raise ValueError("self-revision training needs a verifier: pass reward_funcs=[...]")
    weights = [1.0] * len(reward_funcs)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    stats: Counter = Counter()
    examples: list[dict[str, list[int]]] = []
    kept_per_prompt: Counter = Counter()
    bar = tqdm(total=len(rows) * (1 + config.revisions), desc="self-revision sampling", disable=not progress,
               unit="gen")
    try:
        for start in range(0, len(rows), config.batch_size):
            chunk = list(rows[start : start + config.batch_size])
            prompts = [row["prompt"] for row in chunk]
            contexts = [render_context(tokenizer, p) for p in prompts]
            first = sample_completions(model, contexts, pad_id=pad, eos=eos, max_new_tokens=config.max_new_tokens,
                                       temperature=config.temperature)
            stats["generated_tokens"] += sum(len(ids) for ids in first.completion_ids)
            rewards = _verify(tokenizer, reward_funcs, weights, prompts, first.completion_ids, chunk, stats, timeout)
            bar.update(len(chunk))
            reviser_contexts, owners = [], []
            for i, (ids, truncated, reward) in enumerate(zip(first.completion_ids, first.truncated, rewards)):
                rollout = Rollout(row=chunk[i], prompt=prompts[i], completion="", completion_ids=ids, reward=reward,
                                  finished=not truncated)
                verdict = reviser.verdict(reward)
                stats[f"initial_{verdict}"] += 1
                tail = continuation_ids(tokenizer, [reviser.first_copy(rollout), reviser.cues[verdict]])
                context = contexts[i] + tail
                for _ in range(config.revisions):
                    reviser_contexts.append(context)
                    owners.append((start + i, verdict))
            revised = sample_completions(model, reviser_contexts, pad_id=pad, eos=eos,
                                         max_new_tokens=config.max_new_tokens, temperature=config.temperature)
            stats["generated_tokens"] += sum(len(ids) for ids in revised.completion_ids)
            owner_rows = [rows[index] for index, _ in owners]
            owner_prompts = [row["prompt"] for row in owner_rows]
            verdicts = _verify(tokenizer, reward_funcs, weights, owner_prompts, revised.completion_ids, owner_rows,
                               stats, timeout)
            bar.update(len(reviser_contexts))
            for context, ids, truncated, (index, verdict), reward in zip(
                reviser_contexts, revised.completion_ids, revised.truncated, owners, verdicts
            ):
                accepted = reward is not None and reward >= reviser.threshold and bool(ids)
                accepted = accepted and (config.keep_truncated or not truncated)
                stats[f"revisions_after_{verdict}"] += 1
                if not accepted:
                    continue
                stats[f"accepted_after_{verdict}"] += 1
                if kept_per_prompt[index] >= config.max_per_prompt:
                    continue
                kept_per_prompt[index] += 1
                examples.append({"input_ids": list(context) + list(ids), "labels": [-100] * len(context) + list(ids)})
    finally:
        bar.close()
        model.train(was_training)
    summary: dict[str, Any] = dict(sorted(stats.items()))
    summary["prompts"] = len(rows)
    summary["examples"] = len(examples)
    summary["generations"] = len(rows) * (1 + config.revisions)
    for verdict in ("correct", "wrong", "unverified"):
        n = stats[f"revisions_after_{verdict}"]
        if n:
            summary[f"acceptance_after_{verdict}"] = round(stats[f"accepted_after_{verdict}"] / n, 4)
    return examples, summary


def _verify(tokenizer, reward_funcs, weights, prompts, completion_ids, rows, stats, timeout) -> list[float | None]:
    verified = verify_completions(tokenizer, reward_funcs, weights, prompts, completion_ids, rows, timeout)
    stats["verifier_failures"] += verified.failures
    return verified.rewards


def self_revision_training(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    reviser: Reviser,
    reward_funcs: Sequence[Callable],
    config: RevisionConfig,
    output_dir: str,
    training_args: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Phase 1 in place on ``model``: collect accepted revisions, then SFT on them. Returns the statistics.

    ``training_args`` (the phase-2 ``SelfDistillConfig``) lends its device and precision settings, so both phases
    share one accelerate state (it cannot change within a process).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    rng = random.Random(config.seed)
    indices = rng.sample(range(len(dataset)), min(config.prompts, len(dataset)))
    rows = dataset.select(indices).to_list()
    # Verifiers get the same time limit as in phase 2 (reward_timeout).
    timeout = getattr(training_args, "reward_timeout", 60.0)
    # Sampled the way phase 2 samples: under bf16 autocast when the recipe trains in bf16 (one region for the whole
    # stage keeps the weight casts; timing in docs/methods/sd-zero.md).
    with sampling_precision(model, training_args):
        examples, stats = collect_revisions(model, tokenizer, rows, reviser, reward_funcs, config, progress, timeout)
    stats["sample_seconds"] = round(time.perf_counter() - start, 1)
    stats["config"] = asdict(config)
    if not examples:
        # Nothing to learn from is a result, not a crash: phase 2 then starts from the untouched model.
        stats["sft_steps"] = 0
        stats["warning"] = "no revision was accepted by the verifier; SFT skipped"
        return stats
    sft_start = time.perf_counter()
    args = SFTConfig(
        output_dir=output_dir,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.train_batch_size,
        lr_scheduler_type="constant",
        logging_steps=max(1, len(examples) // config.train_batch_size),
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        disable_tqdm=not progress,
        max_length=None,
        # TRL's SFTConfig turns activation checkpointing on by default; follow the phase-2 setting instead (it
        # would otherwise stay switched on in the model for phase 2 as well).
        activation_checkpointing=bool(getattr(training_args, "activation_checkpointing", None)
                                      or getattr(training_args, "gradient_checkpointing", False)),
        **({key: getattr(training_args, key) for key in ("use_cpu", "bf16", "fp16")} if training_args is not None
           else {"bf16": False}),  # SFTConfig defaults to bf16
    )
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer)
    result = trainer.train()
    model.train(was_training)
    if use_cache is not None:
        model.config.use_cache = use_cache  # SFT switches the KV cache off; phase 2 samples with it
    stats["sft_steps"] = trainer.state.global_step
    stats["sft_loss"] = round(float(result.training_loss), 4)
    stats["sft_seconds"] = round(time.perf_counter() - sft_start, 1)
    return stats


#: Under ``<output_dir>/srt/``: the reviser a finished stage left, and what it was made from.
STAGE_DIR = "reviser"
STAGE_WEIGHTS = "model.safetensors"
STAGE_RECORD = "stage.json"
#: Bumped when the stage itself changes what it makes (2: sampled under the recipe's autocast, not float32), so a
#: reviser kept by an older version is not reused.
STAGE_VERSION = 2


def stage_fingerprint(recipe: Any, args: Any, model: Any) -> str:
    """What decides the stage's outcome: the starting weights, the rows, the source, the verifiers, the stage's
    settings, the seed and the precision. Phase-2 settings (steps, learning rate, loss) are left out, so a recipe
    that changes only those reuses the stage."""
    import hashlib
    import json

    import torch

    with torch.no_grad():  # a cheap digest of the starting weights: a model retrained into the same folder differs
        weights = [round(float(p.detach().double().sum()), 6) for p in model.parameters()]
    what = {
        "stage": STAGE_VERSION, "model": str(recipe.model), "weights": weights,
        "data": asdict(recipe.data) if hasattr(recipe.data, "__dataclass_fields__") else recipe.data,
        "source": asdict(recipe.source) if hasattr(recipe.source, "__dataclass_fields__") else recipe.source,
        "rewards": [str(r) for r in recipe.rewards], "srt": asdict(recipe.srt),
        "seed": getattr(args, "seed", None), "bf16": bool(getattr(args, "bf16", False)),
        "fp16": bool(getattr(args, "fp16", False)),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def srt_stage(model: Any, tokenizer: Any, dataset: Any, reviser: Reviser, reward_funcs: Sequence[Callable],
              recipe: Any, training_args: Any, output_dir: str, progress: bool = True,
              save: bool = True) -> dict[str, Any]:
    """Phase 1 as ``selfdistill train`` and ``selfdistill diagnose`` run it, done once per recipe and output folder.

    A finished stage leaves the reviser under ``<output_dir>/srt/reviser/`` with a fingerprint of what made it
    (:func:`stage_fingerprint`). When that folder matches, the weights are loaded into ``model`` instead of running
    the stage again: diagnose, then train (or train after an interrupted run) pays for it once. Anything that changes
    the stage's outcome changes the fingerprint and the stage runs again. The record is written after the weights,
    so a save cut short is never reused.
    """
    import json
    import os
    from pathlib import Path

    from safetensors.torch import load_model, save_model

    stage = Path(output_dir) / "srt" / STAGE_DIR
    fingerprint = stage_fingerprint(recipe, training_args, model)
    record = stage / STAGE_RECORD
    if record.is_file() and (stage / STAGE_WEIGHTS).is_file():
        try:
            saved = json.loads(record.read_text())
        except ValueError:
            saved = {}
        if saved.get("fingerprint") == fingerprint:
            load_model(model, str(stage / STAGE_WEIGHTS), device=str(next(model.parameters()).device))
            stats = dict(saved.get("stats", {}))
            stats["reused_from"] = str(stage)
            # Said even without progress bars: a rerun that silently skips a stage the user expects would surprise.
            print(f"self-revision stage: reusing the reviser in {stage} (same model, data, source and srt "
                  "settings); delete that folder to run the stage again")
            return stats
    stats = self_revision_training(model, tokenizer, dataset, reviser, reward_funcs, recipe.srt,
                                   output_dir=str(Path(output_dir) / "srt"), training_args=training_args,
                                   progress=progress)
    if save and stats.get("sft_steps"):
        stage.mkdir(parents=True, exist_ok=True)
        if record.exists():
            record.unlink()  # the old record must not vouch for the new weights
        partial = stage / (STAGE_WEIGHTS + ".partial")
        save_model(model, str(partial))
        os.replace(partial, stage / STAGE_WEIGHTS)
        record.write_text(json.dumps({"fingerprint": fingerprint, "stats": stats}, indent=1, default=str))
    return stats
