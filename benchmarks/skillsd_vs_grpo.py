"""Skill-SD against GRPO alone on a built-in multi-turn environment, at equal training episodes.

Each configuration is `recipes/skillsd_<env>.yaml` plus overrides, run by the `selfdistill` command one after the
other (same seed, same episodes per step, same optimizer steps):

- ``skillsd``: importance-weighted reverse KL to the skill-conditioned teacher beside the GRPO term (the recipe);
- ``grpo``: the GRPO term alone (distillation weight 0, no skills written, no teacher pass);
- ``skillsd_no_grpo``: the distillation term alone.

Prints a table, writes benchmarks/results/skillsd_<env>.json and docs/img/skillsd_<env>.png (held-out greedy
success rate against training episodes).

    python benchmarks/skillsd_vs_grpo.py                        # guess_number, all three, seed 0
    python benchmarks/skillsd_vs_grpo.py skillsd grpo --seeds 1 2   # more seeds (results are merged)
    python benchmarks/skillsd_vs_grpo.py --env sokoban skillsd grpo
    python benchmarks/skillsd_vs_grpo.py --plot-only
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
from pathlib import Path

from recipe_runs import ROOT, mean_sd, plot, run_all, seed_summary, table

CONFIGS: dict[str, list[str]] = {
    "skillsd": [],
    "grpo": ["training.distill_weight=0", "source.summaries_per_step=0"],
    "skillsd_no_grpo": ["training.grpo_weight=0"],
}


def training_success(log: Path) -> list[float]:
    """``env/success`` of each logging window (sampled training episodes) from a run's log."""
    values = []
    for match in re.finditer(r"\{'loss'[^}]*\}", log.read_text(errors="replace")):
        logs = ast.literal_eval(match.group())
        if "env/success" in logs:
            values.append(float(logs["env/success"]))
    return values


def plot_training(results: dict[str, dict], out_root: Path, path: Path, every: int = 5) -> str:
    """Sampled success of the training episodes per logging window, one line per run; returns a text table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lines = [f"{'run':20} training success per window of {every} steps (sampled episodes)"]
    for name in results:
        log = out_root / f"{name}.log"
        if log.exists():
            results[name]["training_success"] = training_success(log)
        values = results[name].get("training_success")
        if not values:
            continue
        ax.plot([every * (i + 1) for i in range(len(values))], [100 * v for v in values], marker="o", label=name)
        mean = sum(values) / max(len(values), 1)
        lines.append(f"{name:20} " + " ".join(f"{v:5.1%}" for v in values) + f"   mean {mean:.1%}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("success of the training episodes (%, sampled)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return "\n".join(lines)


def summary(results: dict[str, dict]) -> str:
    """Held-out success after training and sampled training success, mean ± sd over each configuration's seeds."""
    after = seed_summary(results)
    sampled = seed_summary(results, key=lambda r: statistics.mean(r.get("training_success") or [float("nan")]))
    lines = [f"{'configuration':16} {'seeds':>5} {'held-out success after':>24} {'training success (sampled)':>28}"]
    for name, runs in after.items():
        values = [v for _, v in runs]
        lines.append(f"{name:16} {len(runs):>5} {mean_sd(values):>24} {mean_sd([v for _, v in sampled[name]]):>28}"
                     f"   per seed: {' '.join(f's{s} {v:.1%}' for s, v in runs)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"configurations to run: {', '.join(CONFIGS)}")
    parser.add_argument("--env", default="guess_number", choices=["guess_number", "sokoban"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (runs named NAME@sSEED)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    args = parser.parse_args()
    recipe = f"recipes/skillsd_{args.env}.yaml"
    results_path = ROOT / "benchmarks" / "results" / f"skillsd_{args.env}.json"
    for name in args.names:
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; choose from: {', '.join(CONFIGS)}")
    configs = {f"{name}@s{seed}": (recipe, [*overrides, *args.override, f"training.seed={seed}"])
               for seed in args.seeds for name, overrides in CONFIGS.items()}
    runs = [f"{name}@s{seed}" for seed in args.seeds for name in args.names or CONFIGS]
    if args.plot_only:
        results = json.loads(results_path.read_text())
        print(table(results))
    else:
        results = run_all(configs, runs, results_path, ROOT / "outputs" / f"skillsd_{args.env}")
    path = ROOT / "docs" / "img" / f"skillsd_{args.env}.png"
    plot(results, path, f"Skill-SD vs GRPO on {args.env} (SmolLM2-135M-Instruct, CPU)",
         ylabel="held-out greedy success rate (%)", xlabel="training episodes")
    train_path = ROOT / "docs" / "img" / f"skillsd_{args.env}_training.png"
    print(plot_training(results, ROOT / "outputs" / f"skillsd_{args.env}", train_path))
    print(summary(results))
    results_path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {results_path}, {path} and {train_path}")


if __name__ == "__main__":
    main()
