"""The four methods and GRPO side by side on the built-in task with the embedded model, at equal training rollouts.

Each run is a shipped recipe (plus overrides), run by the `selfdistill` command one after the other; ``--seeds``
repeats every configuration with ``training.seed=S`` (runs are named ``NAME@sS``). Prints one table (mean ± sd
over the seeds run), writes benchmarks/results/all_methods.json and docs/img/all_methods.png
(held-out accuracy against generated tokens; SD-Zero's curve starts after the tokens its self-revision phase
generated).

    python benchmarks/compare_methods.py                         # every configuration, seed 0
    python benchmarks/compare_methods.py opsd grpo --seeds 0 1 2 # only these (results are merged)
    python benchmarks/compare_methods.py --reuse opsd@s0=outputs/main_job_seeds/shipped/seed0/results.json
        # record an earlier run of the same configuration instead of running it again (marked "reused_from")
    python benchmarks/compare_methods.py --reuse-main-job 1 2    # OPSD's seeds 1 and 2 from main_job_seeds.py
    python benchmarks/compare_methods.py --plot-only             # table and plot from the recorded results
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from recipe_runs import ROOT, mean_sd, record_result, run_recipe, save_percent_plot, split_name

RESULTS = ROOT / "benchmarks" / "results" / "all_methods.json"
PLOT = ROOT / "docs" / "img" / "all_methods.png"
MAIN_JOB = ROOT / "benchmarks" / "results" / "main_job_seeds.json"

# Every run: the main job's settings: 120 optimizer steps x 8 rollouts = 960 training rollouts of at most 16 tokens,
# temperature 0.6, lr 3e-5 decaying linearly, bf16 autocast, full fine-tuning, the same 2000 training and 200
# held-out problems (the OPSD recipe itself now takes 12 problems a step for 150 steps; here it is held at 8 x 120
# like the others). The distillation runs differ in their source
# (and, for Skill-SD, in the loss METHODS.md §5 gives it); GRPO has no teacher at all.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "opsd": ("recipes/opsd_arithmetic.yaml", ["training.per_device_train_batch_size=8", "training.max_steps=120"]),
    "sdzero": ("recipes/sdzero_arithmetic.yaml", []),
    "avsd": ("recipes/avsd_arithmetic.yaml", []),
    "skillsd": ("recipes/skillsd_arithmetic.yaml", []),
    # GRPO alone: the verifier's reward, 2 prompts x 4 rollouts per step, no teacher pass.
    "grpo": ("recipes/opsd_arithmetic.yaml", ["training.per_device_train_batch_size=8", "training.max_steps=120",
                                              "training.distill_weight=0", "training.grpo_weight=1",
                                              "training.num_generations=4", "eval.every_steps=20"]),
    # Variants kept from earlier comparisons.
    "sdzero_no_srt": ("recipes/sdzero_arithmetic.yaml", ["srt.enabled=false"]),
    "avsd_agreement": ("recipes/avsd_arithmetic.yaml", ["source.weights=agreement"]),
    "sdzero_sync10": ("recipes/sdzero_arithmetic.yaml", ["training.teacher_policy=sync",
                                                         "training.teacher_update_every=10"]),
}
MAIN = ("opsd", "sdzero", "avsd", "skillsd", "grpo")


def srt_tokens(result: dict) -> int:
    return int((result.get("srt") or {}).get("generated_tokens", 0))


def from_main_job(seed: int) -> dict:
    """OPSD's run of one seed as benchmarks/main_job_seeds.py recorded it, in this script's result shape."""
    runs = json.loads(MAIN_JOB.read_text())["shipped"]["runs"]
    if str(seed) not in runs:
        raise SystemExit(f"--reuse-main-job {seed}: {MAIN_JOB} has no seed {seed} (seeds: {', '.join(runs)})")
    run = runs[str(seed)]
    recipe, overrides = CONFIGS["opsd"]
    return {"name": "opsd", "recipe": recipe, "overrides": overrides, "reused_from": f"{MAIN_JOB.name} seed {seed}",
            "eval_before": {"greedy_accuracy": run["before"]}, "eval_after": {"greedy_accuracy": run["after"]},
            **{k: run[k] for k in ("steps", "rollouts", "generated_tokens", "train_seconds", "wall_seconds",
                                   "learning_curve")}}


def table(results: dict[str, dict]) -> str:
    by_config: dict[str, list[dict]] = {}
    for run, r in results.items():
        if "error" not in r:
            by_config.setdefault(split_name(run)[0], []).append(r)
    head = (f"{'method':16} {'seeds':>5} {'rollouts':>8} {'gen. tokens':>11} {'train s':>8} {'before':>7} "
            f"{'after (mean ± sd)':>18} {'per seed':>20}")
    lines = [head, "-" * len(head)]
    for name in [n for n in CONFIGS if n in by_config]:
        runs = by_config[name]
        after = [r["eval_after"]["greedy_accuracy"] for r in runs]
        tokens = statistics.mean(r["generated_tokens"] + srt_tokens(r) for r in runs)
        lines.append(
            f"{name:16} {len(runs):>5} {runs[0]['rollouts']:>8} {tokens:>11.0f} "
            f"{statistics.mean(r['train_seconds'] for r in runs):>8.0f} "
            f"{runs[0]['eval_before']['greedy_accuracy']:>7.1%} {mean_sd(after):>18} "
            f"{' '.join(f'{a:.1%}' for a in after):>20}"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colors = {}
    for run, r in sorted(results.items()):
        if "error" in r or not r.get("learning_curve"):
            continue
        name, seed = split_name(run)
        offset = srt_tokens(r)
        pts = r["learning_curve"]
        line = ax.plot([offset + p["generated_tokens"] for p in pts], [100 * p["greedy_accuracy"] for p in pts],
                       marker="o", ms=3, color=colors.get(name), label=None if name in colors else name,
                       alpha=0.9 if seed == 0 else 0.5)
        colors.setdefault(name, line[0].get_color())
    ax.set_xlabel("generated tokens (training rollouts; SD-Zero includes its self-revision phase)")
    ax.set_ylabel("held-out greedy accuracy (%, 100 problems)")
    ax.grid(alpha=0.3)
    save_percent_plot(fig, ax, path, "Methods on SmolLM2-135M-Instruct, two-digit addition (CPU), 960 rollouts each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"configurations to run (default: {', '.join(MAIN)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME@sSEED=RESULTS_JSON")
    parser.add_argument("--reuse-main-job", type=int, nargs="+", default=[], metavar="SEED",
                        help="record opsd@sSEED from benchmarks/results/main_job_seeds.json (the same recipe, run "
                             "alone)")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    for name in args.names:
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; choose from: {', '.join(CONFIGS)}")

    def load() -> dict:
        return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}

    for item in args.reuse:
        run, _, path = item.partition("=")
        name, seed = split_name(run)
        if name not in CONFIGS:
            raise SystemExit(f"--reuse {item}: unknown configuration {name!r}")
        recipe, overrides = CONFIGS[name]
        record_result(RESULTS, f"{name}@s{seed}", {**json.loads(Path(path).read_text()), "name": name, "recipe": recipe,
                                 "overrides": overrides, "reused_from": path})
    for seed in args.reuse_main_job:
        record_result(RESULTS, f"opsd@s{seed}", from_main_job(seed))
    if not args.plot_only and not ((args.reuse or args.reuse_main_job) and not args.names):
        for seed in args.seeds:
            for name in args.names or MAIN:
                recipe, overrides = CONFIGS[name]
                run = f"{name}@s{seed}"
                print(f"running {run} ...", flush=True)
                result = run_recipe(run, recipe, [*overrides, f"training.seed={seed}"], ROOT / "outputs" / "methods")
                record_result(RESULTS, run, result)
                print(table({run: result}), flush=True)
    results = load()
    print(table(results))
    plot(results, PLOT)
    print(f"wrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
