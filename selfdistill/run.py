"""Run a recipe: set up, evaluate, train, evaluate, and write ``<output_dir>/results.json``."""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import set_seed

from selfdistill.data import load_splits
from selfdistill.evaluation import LearningCurve, evaluate
from selfdistill.modeling import load_model, load_tokenizer
from selfdistill.recipes import Recipe, RecipeError, build_source
from selfdistill.revision import self_revision_training

BUILTIN_REWARDS = {
    "arithmetic": "selfdistill.tasks.arithmetic:arithmetic_reward",
    "math": "selfdistill.rewards:math_reward",
}


def resolve_reward(name: str) -> Callable:
    """A built-in verifier by name, or a function by dotted path (``pkg.module.func`` or ``pkg.module:func``)."""
    target = BUILTIN_REWARDS.get(name, name)
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    if not module_name or not attr:
        raise RecipeError(
            f"reward {name!r} is neither built in ({', '.join(BUILTIN_REWARDS)}) nor a dotted path like "
            "'my_package.rewards.exact_match'"
        )
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({err})") from err
    if not callable(func):
        raise RecipeError(f"reward {name!r} resolved to a non-callable {type(func).__name__}")
    return func


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_train(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """The whole job of ``selfdistill train``; returns the results written to results.json."""
    args = recipe.config()
    set_seed(args.seed)
    main = _is_main()
    out_dir = Path(args.output_dir)
    start = time.perf_counter()
    train, test = load_splits(recipe.data)
    rewards = [resolve_reward(r) for r in recipe.rewards]
    verifier = rewards[0] if rewards else None
    source = build_source(recipe.source)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, args.model_init_kwargs)
    setup_seconds = time.perf_counter() - start
    ev = recipe.eval
    eval_kwargs = dict(batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature)
    can_eval = verifier is not None and test is not None

    before = None
    if main and ev.before and can_eval:
        before = evaluate(model, tokenizer, test, verifier, n=ev.n, pass_k=ev.pass_k, desc="eval before",
                          progress=progress, **eval_kwargs)
        print(f"before training: greedy accuracy {before['greedy_accuracy']:.1%} on {before['n']} held-out problems")

    srt, after_srt = None, None
    if recipe.srt is not None and recipe.srt.enabled:
        # SD-Zero phase 1: the trainer below is built on the fine-tuned model, so its initial teacher is the reviser.
        srt = self_revision_training(model, tokenizer, train, source, rewards, recipe.srt,
                                     output_dir=str(out_dir / "srt"), training_args=args, progress=progress)
        print(f"self-revision training: {srt['examples']} accepted revisions from {srt['prompts']} prompts, "
              f"{srt['sft_steps']} SFT steps")
        if main and ev.after and can_eval:
            after_srt = evaluate(model, tokenizer, test, verifier, n=ev.n, pass_k=ev.pass_k, desc="eval after srt",
                                 progress=progress, **eval_kwargs)
            print(f"after self-revision training: greedy accuracy {after_srt['greedy_accuracy']:.1%}")

    peft_config = None
    if recipe.peft:
        from peft import LoraConfig

        peft_config = LoraConfig(**{"task_type": "CAUSAL_LM", **recipe.peft})
    from selfdistill.trainer import SelfDistillTrainer

    trainer = SelfDistillTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                 privileged=source, reward_funcs=rewards, peft_config=peft_config)
    curve = None
    if ev.every_steps and can_eval:
        curve = LearningCurve(trainer, test, verifier, every=ev.every_steps, n=ev.curve_n, **eval_kwargs)
        trainer.add_callback(curve)
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start - (curve.seconds if curve else 0.0)

    after = None
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if main and ev.after and can_eval:
        after = evaluate(unwrapped, tokenizer, test, verifier, n=ev.n, pass_k=ev.pass_k, desc="eval after",
                         progress=progress, **eval_kwargs)
    trainer.save_model(str(out_dir / "final"))
    trainer.accelerator.wait_for_everyone()

    results = {
        "method": recipe.method,
        "recipe": recipe.path,
        "model": recipe.model,
        "peft": recipe.peft,
        "steps": trainer.state.global_step,
        "rollouts": trainer.rollouts_generated * trainer.accelerator.num_processes,
        "generated_tokens": trainer.tokens_generated * trainer.accelerator.num_processes,
        "train_seconds": round(train_seconds, 1),
        "setup_seconds": round(setup_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "config": {k: recipe.training[k] for k in sorted(recipe.training)},
        "eval_before": before,
        "srt": srt,
        "eval_after_srt": after_srt,
        "eval_after": after,
        "learning_curve": curve.points if curve else [],
        "final_train_metrics": _last_train_logs(trainer.state.log_history),
    }
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        if curve and len(curve.points) > 1:
            plot_curve(curve.points, out_dir / "learning_curve.png", title=f"{recipe.method} on {recipe.model}")
        print(summary_table(results))
        print(f"wrote {out_dir / 'results.json'}")
    return results


def _last_train_logs(history: list[dict[str, Any]]) -> dict[str, Any]:
    logs = [h for h in history if "loss" in h and "eval_loss" not in h]
    return logs[-1] if logs else {}


def run_eval(recipe: Recipe, model_path: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate the recipe's model (or ``model_path``) on its held-out split."""
    _, test = load_splits(recipe.data)
    if test is None:
        raise RecipeError("the recipe's data has no test split; set data.test_files, data.test_split or test_size")
    rewards = [resolve_reward(r) for r in recipe.rewards]
    if not rewards:
        raise RecipeError("evaluation needs a verifier: add one under rewards (e.g. rewards: [arithmetic])")
    name = model_path or recipe.model
    ev = recipe.eval
    result = evaluate(load_model(name), load_tokenizer(name), test, rewards[0], n=ev.n, batch_size=ev.batch_size,
                      max_new_tokens=ev.max_new_tokens, pass_k=ev.pass_k, temperature=ev.temperature,
                      desc=f"eval {name}", progress=progress)
    result["model"] = name
    return result


def summary_table(results: dict[str, Any]) -> str:
    def acc(section: dict | None, key: str) -> str:
        return f"{section[key]:.1%}" if section and key in section else "-"

    before, after = results.get("eval_before"), results.get("eval_after")
    rows = [
        ("method", results["method"]),
        ("model", results["model"]),
        ("steps / rollouts", f"{results['steps']} / {results['rollouts']}"),
        ("generated tokens", str(results["generated_tokens"])),
        ("training seconds", f"{results['train_seconds']:.0f}"),
        ("greedy accuracy", f"{acc(before, 'greedy_accuracy')} -> {acc(after, 'greedy_accuracy')}"),
    ]
    if results.get("srt"):
        srt = results["srt"]
        rows.insert(3, ("self-revision", f"{srt['examples']} examples from {srt['generations']} generations, "
                                         f"{srt['sft_steps']} SFT steps"))
        rows.append(("after self-revision", acc(results.get("eval_after_srt"), "greedy_accuracy")))
    for key in (after or {}):
        if key.startswith("pass@"):
            rows.append((key, f"{acc(before, key)} -> {acc(after, key)}"))
    width = max(len(k) for k, _ in rows)
    lines = ["", "=" * (width + 30)] + [f"{k.ljust(width)}  {v}" for k, v in rows] + ["=" * (width + 30)]
    return "\n".join(lines)


def plot_curve(points: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Held-out greedy accuracy against rollouts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([p["rollouts"] for p in points], [100 * p["greedy_accuracy"] for p in points], marker="o")
    ax.set_xlabel("training rollouts")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
