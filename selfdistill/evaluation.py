"""Held-out evaluation: greedy accuracy and pass@k with a verifier, and a learning-curve callback."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from selfdistill.rollout import eos_ids, sample_completions, take_rows, verify_completions
from selfdistill.sequences import render_context


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    reward_fn: Callable,
    *,
    n: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    pass_k: int = 0,
    temperature: float = 1.0,
    desc: str = "eval",
    progress: bool = True,
    reward_timeout: float | None = 60.0,
) -> dict[str, Any]:
    """Greedy accuracy (and pass@k from k samples per problem) of ``model`` on ``dataset``.

    ``reward_fn`` is a verifier in TRL's convention, called with the time limit ``reward_timeout`` (seconds per
    batch); a reward >= 0.5 counts as correct. pass@k is the fraction of
    problems with at least one correct sample among k (the unbiased estimator with n = k samples).
    """
    rows = take_rows(dataset, n)
    was_training = model.training
    model.eval()
    eos = eos_ids(model, tokenizer)
    start = time.perf_counter()
    correct, samples, tokens = [], [], 0
    passes: list[bool] = []
    bar = tqdm(total=len(rows) * (1 + pass_k), desc=desc, disable=not progress, unit="gen")
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            prompts = [r["prompt"] for r in chunk]
            ids = [render_context(tokenizer, p) for p in prompts]
            out = sample_completions(model, ids, pad_id=tokenizer.pad_token_id, eos=eos,
                                     max_new_tokens=max_new_tokens, do_sample=False)
            tokens += sum(len(c) for c in out.completion_ids)
            ok = _score(reward_fn, tokenizer, prompts, out.completion_ids, chunk, reward_timeout)
            correct.extend(ok)
            if len(samples) < 5:
                texts = tokenizer.batch_decode(out.completion_ids[:5], skip_special_tokens=True)
                samples.extend({"prompt": p, "completion": t, "correct": c} for p, t, c in zip(prompts, texts, ok))
            bar.update(len(chunk))
            if pass_k:
                step = max(batch_size // pass_k, 1)
                for j in range(0, len(chunk), step):
                    sub = chunk[j : j + step]
                    rep_rows = [r for r in sub for _ in range(pass_k)]
                    rep_ids = [x for x in ids[j : j + step] for _ in range(pass_k)]
                    sampled = sample_completions(model, rep_ids, pad_id=tokenizer.pad_token_id, eos=eos,
                                                 max_new_tokens=max_new_tokens, temperature=temperature)
                    hits = _score(reward_fn, tokenizer, [r["prompt"] for r in rep_rows], sampled.completion_ids,
                                  rep_rows, reward_timeout)
                    passes.extend(any(hits[q * pass_k : (q + 1) * pass_k]) for q in range(len(sub)))
                    bar.update(len(sub) * pass_k)
    finally:
        bar.close()
        model.train(was_training)
    result = {
        "n": len(rows),
        "greedy_accuracy": sum(correct) / max(len(rows), 1),
        "mean_completion_tokens": tokens / max(len(rows), 1),
        "seconds": time.perf_counter() - start,
        "samples": samples[:5],
    }
    if pass_k:
        result[f"pass@{pass_k}"] = sum(passes) / max(len(passes), 1)
    return result


def _score(reward_fn, tokenizer, prompts, completion_ids, rows, timeout: float | None = 60.0) -> list[bool]:
    # The trainer's scoring path: a verifier that raises on one completion costs that completion only (counted as
    # wrong), never the evaluation.
    verified = verify_completions(tokenizer, [reward_fn], [1.0], prompts, completion_ids, rows, timeout)
    return [r is not None and r >= 0.5 for r in verified.rewards]


def plain_settings(eval_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's keyword settings that a record can hold (numbers, strings, flags), sorted."""
    return {k: v for k, v in sorted(eval_kwargs.items()) if isinstance(v, (int, float, str, bool, type(None)))}


def write_record(path: Path, settings: dict[str, Any], **fields: Any) -> None:
    """``{"settings": settings, **fields}`` as JSON at ``path``, never half written (a resumed run reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"settings": settings, **fields}, indent=1, default=str))
    os.replace(partial, path)


def read_record(path: Path | None, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record :func:`write_record` left at ``path`` when it was written with the same settings; else None
    (no file, an unreadable one, or one measured otherwise)."""
    if path is None or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = json.loads(json.dumps(settings, default=str))  # as the file holds them (tuples as lists, ...)
    return saved if isinstance(saved, dict) and saved.get("settings") == same else None


class LearningCurve(TrainerCallback):
    """Greedy accuracy on a fixed slice of the test split every ``every`` optimizer steps (and at step 0).

    ``path``: a JSON file the points are written to as they come (the main process's). A run resumed from a
    checkpoint at step k reads back the points up to step k from it, so its curve starts at step 0 like an
    uninterrupted run's (a resumed run's weights are the uninterrupted run's: tests/test_reliability.py)."""

    def __init__(self, trainer: Any, dataset: Any, reward_fn: Callable, every: int, n: int,
                 evaluate_fn: Callable = evaluate, path: str | os.PathLike | None = None, **eval_kwargs: Any):
        self.trainer = trainer
        self.path = Path(path) if path is not None else None
        self.evaluate_fn = evaluate_fn  # evaluate, or selfdistill.agent.evaluate_env with an environment factory
        self.dataset = dataset
        self.reward_fn = reward_fn
        self.every = every
        self.n = n
        self.eval_kwargs = eval_kwargs
        self.points: list[dict[str, float]] = []
        self.seconds = 0.0

    def measure(self, step: int) -> None:
        from selfdistill.distributed import is_zero3_model
        from selfdistill.sampling import generation_model

        accelerator = self.trainer.accelerator
        # Under ZeRO-3 every rank gathers the weights and generates in step; otherwise the main process alone.
        with generation_model(self.trainer.model_wrapped, accelerator) as model:
            if not (accelerator.is_main_process or is_zero3_model(model)):
                return
            result = self.evaluate_fn(model, self.trainer.processing_class, self.dataset, self.reward_fn, n=self.n,
                                      progress=False, **self.eval_kwargs)
        if not accelerator.is_main_process:
            return
        self.seconds += result["seconds"]
        self.points.append({
            "step": step,
            "rollouts": self.trainer.rollouts_generated,
            "generated_tokens": self.trainer.tokens_generated,
            "greedy_accuracy": result["greedy_accuracy"],
        })
        print(f"[curve] step {step}: held-out greedy accuracy {result['greedy_accuracy']:.1%} "
              f"({self.trainer.rollouts_generated} rollouts)", flush=True)
        if self.path is not None:
            write_record(self.path, self.settings(), points=self.points)

    def settings(self) -> dict[str, Any]:
        """What a point's value depends on besides the weights: points measured otherwise are not mixed in."""
        return {"n": self.n, "rows": len(self.dataset), "eval": plain_settings(self.eval_kwargs)}

    def earlier_points(self, step: int) -> list[dict[str, Any]]:
        """The points an interrupted run measured up to ``step`` (where it resumes), read from ``path``; none when
        that run measured them with other settings (``curve_n``, the test split's size, the evaluation's limits)."""
        saved = read_record(self.path, self.settings()) if step else None
        return [p for p in (saved or {}).get("points", [])
                if isinstance(p, dict) and isinstance(p.get("step"), int) and p["step"] <= step]

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.points:
            self.points = self.earlier_points(state.global_step)
        if not any(p["step"] == state.global_step for p in self.points):
            self.measure(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(state.global_step)
