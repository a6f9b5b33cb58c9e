"""Shared by the benchmark scripts that run whole recipes: one subprocess per run, a table and a plot.

Runs go one after the other, never two at once: two processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def use_launch_heap() -> str:
    """Set, for this process and the runs it starts, the allocator setting scripts/main_job.sh starts the main job
    with (a GLIBC_TUNABLES of your own is kept): the job is timed as a user launches it. Returns the value in use."""
    import re

    script = (ROOT / "scripts" / "main_job.sh").read_text()
    default = re.search(r"GLIBC_TUNABLES:-([^}]+)\}", script)
    if default is None:
        raise RuntimeError("scripts/main_job.sh no longer sets GLIBC_TUNABLES; update use_launch_heap")
    return os.environ.setdefault("GLIBC_TUNABLES", default.group(1))


def run_recipe(name: str, recipe: str, overrides: list[str], out_root: Path) -> dict:
    """``selfdistill train recipe overrides`` with its output under ``out_root/name``; its results.json, timed."""
    out = out_root / name
    cmd = [sys.executable, "-m", "selfdistill", "train", str(ROOT / recipe), f"training.output_dir={out}", *overrides]
    start = time.perf_counter()
    log = out.parent / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        return {"name": name, "recipe": recipe, "overrides": overrides, "error": f"exit {code}, see {log}"}
    result = json.loads((out / "results.json").read_text())
    result.update(name=name, recipe=recipe, overrides=overrides, process_seconds=round(time.perf_counter() - start, 1))
    return result


def diagnose_recipe(recipe: str | Path, overrides: list[str], out: Path, prompts: int | None = None) -> dict:
    """``selfdistill diagnose recipe overrides`` in its own process, timed: the whole command's wall seconds, and
    the top-level figures and verdicts of its diagnosis.json (or the error it ended with)."""
    cmd = [sys.executable, "-m", "selfdistill", "diagnose", str(recipe), f"training.output_dir={out}", *overrides,
           "--no-progress", *(["--prompts", str(prompts)] if prompts else [])]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    entry: dict = {"wall_seconds": round(time.perf_counter() - start, 1), "overrides": list(overrides),
                   **({"prompts": prompts} if prompts else {})}
    if done.returncode:
        entry["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return entry
    report = json.loads((out / "diagnosis.json").read_text())
    entry.update({k: report.get(k) for k in ("method", "student_reward", "student_reward_greedy", "teacher_reward",
                                             "teacher_reward_greedy", "teacher_view", "student_shows_work",
                                             "revision", "skills", "srt", "blind_rule")})
    view = report["teacher"].get(report.get("teacher_view")) or {}
    entry["teacher_shows_work"] = view.get("shows_work")
    entry["student_in_teacher_form"] = {k: v for k, v in (view.get("in_form") or {}).items() if k != "examples"} or None
    entry.update({k: report["signal"].get(k) for k in ("reverse_kl", "digit_share", "digit_token_fraction",
                                                       "digit_pull_share", "digit_pull_fraction",
                                                       "student_p_stop", "teacher_p_stop")})
    entry["verdicts"] = {v["premise"]: v["verdict"] for v in report["verdicts"]}
    if report.get("srt") is not None:  # SD-Zero: whether the stage was a kept one (srt_stage says so when it reuses)
        entry["stage_reused"] = "reusing the reviser" in done.stdout
    entry["table"] = done.stdout.strip().split("wrote")[0]
    return entry


def split_name(run: str) -> tuple[str, int]:
    """``"grpo@s2"`` -> ``("grpo", 2)``: a configuration's name and the seed of one run of it (0 when unnamed)."""
    name, _, seed = run.partition("@s")
    return name, int(seed or 0)


def seed_summary(results: dict[str, dict], key=lambda r: r["eval_after"]["greedy_accuracy"]) -> dict[str, list]:
    """The runs of each configuration (``NAME@sS`` grouped by NAME, failed runs left out), in first-seen order,
    as ``{name: [(seed, key(result)), ...]}``."""
    by_config: dict[str, list] = {}
    for run, r in results.items():
        if "error" not in r:
            name, seed = split_name(run)
            by_config.setdefault(name, []).append((seed, key(r)))
    return by_config


def mean_sd(values: list[float]) -> str:
    """``"35.9% ± 4.1%"`` (sample standard deviation; the mean alone for one value; NaN values left out)."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    return f"{mean:.1%} ± {statistics.stdev(values):.1%}" if len(values) > 1 else f"{mean:.1%}"


def table(results: dict[str, dict]) -> str:
    head = (f"{'run':40} {'steps':>5} {'rollouts':>8} {'train s':>8} {'s/step':>6} {'before':>7} {'after':>7} "
            f"{'best curve':>10}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:40} {r['error']}")
            continue
        curve = max((p["greedy_accuracy"] for p in r["learning_curve"]), default=float("nan"))
        lines.append(
            f"{name:40} {r['steps']:>5} {r['rollouts']:>8} {r['train_seconds']:>8.0f} "
            f"{r['train_seconds'] / max(r['steps'], 1):>6.1f} {r['eval_before']['greedy_accuracy']:>7.1%} "
            f"{r['eval_after']['greedy_accuracy']:>7.1%} {curve:>10.1%}"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str, target: float | None = None,
         ylabel: str = "held-out greedy accuracy (%, 100 problems)", xlabel: str = "training rollouts",
         x: str = "rollouts") -> None:
    """Held-out accuracy against training rollouts (or another learning-curve key, e.g. ``generated_tokens``),
    one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors: dict[str, str] = {}   # runs of one configuration (NAME@sS) share a colour and a legend entry
    for run, r in results.items():
        if r.get("learning_curve"):
            name, _ = split_name(run)
            pts = r["learning_curve"]
            line = ax.plot([p[x] for p in pts], [100 * p["greedy_accuracy"] for p in pts], marker="o", ms=3,
                           color=colors.get(name), label=None if name in colors else name, alpha=0.8)
            colors.setdefault(name, line[0].get_color())
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    save_percent_plot(fig, ax, path, title, legend_size=7)


def save_percent_plot(fig, ax, path: Path, title: str, legend_size: int = 8) -> None:
    """Finish a plot whose y axis is a percentage, and write it (folders made as needed)."""
    ax.set_ylim(0, 100)
    ax.legend(fontsize=legend_size)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def record_result(path: Path, key: str, value: dict) -> dict:
    """Set ``key`` in the JSON results file and return all of it; merged into what is on disk now, since another
    benchmark process may have written its own runs meanwhile."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    return results


def run_all(configs: dict[str, tuple[str, list[str]]], names: list[str], results_path: Path, out_root: Path) -> dict:
    """Run the named configurations (all when none), merging into ``results_path`` after each one."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in names or list(configs):
        if name not in configs:
            raise SystemExit(f"unknown configuration {name!r}; choose from: {', '.join(configs)}")
        recipe, overrides = configs[name]
        print(f"running {name} ...", flush=True)
        results = record_result(results_path, name, run_recipe(name, recipe, overrides, out_root))
        print(table({name: results[name]}), flush=True)
    print(table(results))
    return results


def machine() -> dict:
    """The CPU this run is on: its model name and which bf16 instructions it has (bf16 autocast's speed)."""
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}
    flags = set(fields.get("flags", "").split())
    info["cpu"] = fields.get("model name", "")
    info["bf16"] = sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f", "avx2"})
    return info


def greedy_texts(path: str, rows: list[dict], max_new_tokens: int, batch_size: int) -> tuple[list[str], list[bool]]:
    """A saved model's greedy completions of ``rows`` as the held-out evaluation decodes them (its chat template,
    ``max_new_tokens``), and whether each was cut there instead of ending."""
    import torch

    sys.path.insert(0, str(ROOT))
    from selfdistill.modeling import load_model, load_tokenizer
    from selfdistill.rollout import eos_ids, sample_completions
    from selfdistill.sequences import render_context

    torch.manual_seed(0)
    model, tokenizer = load_model(path), load_tokenizer(path)
    model.eval()
    eos = eos_ids(model, tokenizer)
    texts, cut = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            out = sample_completions(model, [render_context(tokenizer, r["prompt"]) for r in chunk],
                                     pad_id=tokenizer.pad_token_id, eos=eos, max_new_tokens=max_new_tokens,
                                     do_sample=False)
            texts += tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
            cut += list(out.truncated)
    return texts, cut


def saved_model_args(doc: str, results: Path, example: str,
                     recipe: str) -> tuple[Any, list[str], Any, list[dict], dict]:
    """The command line of the scripts that replay a recipe's held-out evaluation on saved models: the parsed
    arguments, the model paths to measure (the embedded base model first with ``--base``), the recipe, its held-out
    rows and the results recorded so far in ``--results``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("models", nargs="*", help="saved model folders (each a training run's final/)")
    parser.add_argument("--base", action="store_true", help="also measure the embedded base model")
    parser.add_argument("--results", type=Path, default=results)
    args = parser.parse_args()
    if not args.models and not args.base:
        raise SystemExit(f"name saved model folders (e.g. {example}), or --base")
    paths = (["smollm2-135m-instruct"] if args.base else []) + args.models
    for path in args.models:
        if not Path(path).is_dir():
            raise SystemExit(f"{path}: no such model folder (a training run writes one under output_dir/final)")
    sys.path.insert(0, str(ROOT))
    from selfdistill.data import load_splits
    from selfdistill.recipes import load_recipe

    loaded = load_recipe(str(ROOT / recipe))
    _, test = load_splits(loaded.data)
    recorded = json.loads(args.results.read_text()) if args.results.exists() else {}
    return args, paths, loaded, test.to_list(), recorded

