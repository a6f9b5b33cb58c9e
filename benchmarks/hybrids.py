"""The 2026 hybrids of RL and self-distillation against their baselines on the main job's task and budget.

RLSD (recipes/rlsd_arithmetic.yaml) and RLCSD (recipes/rlcsd_arithmetic.yaml) against GRPO and OPSD, at the budget
of the main job's recorded OPSD seeds: 150 optimizer steps x 12 rollouts = 1800 training rollouts of at most 16
tokens, lr 3e-5 decaying linearly, temperature 0.6, bf16, the same 2000 training and 200 held-out problems. GRPO is
the RLSD recipe with ``training.rlsd_lambda=0`` (the same 3 prompts x 4 rollouts a step, the same verifier, no teacher
pass). OPSD is the main job's recipe at 150 steps (``recipes/opsd_arithmetic.yaml training.max_steps=150``, 12
prompts x 1 rollout; the shipped recipe now runs 100); its recorded seeds in benchmarks/results/main_job_seeds.json
are reused (``--reuse-main-job``).

Every finished run is merged into benchmarks/results/hybrids.json as ``{"method", "seed", "accuracy",
"generated_tokens", "learning_curve", ...}`` (accuracy: held-out greedy accuracy after training, as a fraction);
the table and docs/img/hybrids.png (held-out accuracy against generated tokens, the mean curve of each method over
its seeds) are redrawn from that file.

    python benchmarks/hybrids.py --list
    python benchmarks/hybrids.py rlsd rlcsd grpo --seeds 0 1 2          # ~12 min a run on 2 CPU cores
    python benchmarks/hybrids.py --reuse-main-job 0 1 2                 # OPSD's seeds from main_job_seeds.json
    python benchmarks/hybrids.py --plot-only --markdown                 # the table of docs/results.md, the plot
    python benchmarks/hybrids.py --long opsd grpo rlsd --seeds 0 1      # the long run: ~40 min a run

``--long``: 4x those 150 steps (600), held-out accuracy every 50 steps, into benchmarks/results/long_run.json
(``{"method", "seed", "curve", "completion_length", "digit_share", ...}``) and docs/img/long_run.png: the two
pathologies the hybrids' papers name, measured on the same runs: mean completion length over training (style
drift) and the share of the per-token divergence carried by digit tokens (OPSD: its reverse KL; RLSD: its
teacher-student log-ratio; GRPO has no teacher, so no share). The summary says where each method's accuracy peaked
and how far it fell after.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from recipe_runs import ROOT, machine, run_recipe, use_launch_heap

RESULTS = ROOT / "benchmarks" / "results" / "hybrids.json"
PLOT = ROOT / "docs" / "img" / "hybrids.png"
LONG_RESULTS = ROOT / "benchmarks" / "results" / "long_run.json"
LONG_PLOT = ROOT / "docs" / "img" / "long_run.png"
LONG = ["training.max_steps=600", "eval.every_steps=50"]
MAIN_JOB = ROOT / "benchmarks" / "results" / "main_job_seeds.json"
MAIN_JOB_RECORD = "shipped_s150_amx_2026-12-03"  # the main job's 3 seeds at 150 steps x 12, docs/results.md

#: configuration -> (recipe, overrides); every one at 150 x 12 rollouts, the budget of the main job's recorded OPSD
#: seeds (the shipped main job now runs 100 steps, so OPSD's 150 is an override).
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "rlsd": ("recipes/rlsd_arithmetic.yaml", []),
    "rlcsd": ("recipes/rlcsd_arithmetic.yaml", []),
    "grpo": ("recipes/rlsd_arithmetic.yaml", ["training.rlsd_lambda=0"]),
    "opsd": ("recipes/opsd_arithmetic.yaml", ["training.max_steps=150", "eval.every_steps=40"]),
    # GRPO's seed 0 and RLSD's seed 2 (sixth session) wrote every rollout to the 16-token cap within 20 steps while
    # cut rollouts still scored (the verifier reads the last number, and a cut can fall right after the answer):
    # GRPO's training reward rose to 0.5-0.7 on cut rollouts while its held-out accuracy (32 tokens) stayed at 0-4%;
    # RLSD's rewards fell to 0 by step 50, where equal rewards in every group leave no advantage to recover with.
    # The same runs with cut rollouts out of the GRPO term (TRL's mask_truncated_completions, DAPO's overlong
    # filtering): variants, not the published methods.
    "grpo_mask_truncated": ("recipes/rlsd_arithmetic.yaml", ["training.rlsd_lambda=0",
                                                             "training.mask_truncated_completions=true"]),
    "rlsd_mask_truncated": ("recipes/rlsd_arithmetic.yaml", ["training.mask_truncated_completions=true"]),
}


def row(method: str, seed: int, result: dict) -> dict:
    return {
        "method": method, "seed": seed, "accuracy": float(result["eval_after"]["greedy_accuracy"]),
        "generated_tokens": int(result["generated_tokens"]),
        "accuracy_before": (result.get("eval_before") or {}).get("greedy_accuracy"),
        "rollouts": result.get("rollouts"), "steps": result.get("steps"), "train_seconds": result.get("train_seconds"),
        "wall_seconds": result.get("wall_seconds"), "learning_curve": result.get("learning_curve") or [],
        "recipe": result.get("recipe"), "overrides": result.get("overrides"),
        **({"reused_from": result["reused_from"]} if "reused_from" in result else {}),
    }


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def record(path: Path, entry: dict) -> list[dict]:
    """Replace the run with the same (method, seed), merged into what is on disk now."""
    runs = [r for r in load(path) if (r["method"], r["seed"]) != (entry["method"], entry["seed"])]
    runs.append(entry)
    runs.sort(key=lambda r: (list(CONFIGS).index(r["method"]) if r["method"] in CONFIGS else 99, r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1))
    return runs


def from_main_job(seed: int) -> dict:
    """OPSD's run of one seed as benchmarks/main_job_seeds.py recorded it, in a results.json's shape."""
    record_ = json.loads(MAIN_JOB.read_text()).get(MAIN_JOB_RECORD, {})
    run = record_.get("runs", {}).get(str(seed))
    if run is None:
        raise SystemExit(f"--reuse-main-job {seed}: {MAIN_JOB.name} has no seed {seed} in {MAIN_JOB_RECORD!r}")
    recipe, overrides = CONFIGS["opsd"]
    return {"recipe": recipe, "overrides": overrides, "reused_from": f"{MAIN_JOB.name}:{MAIN_JOB_RECORD} seed {seed}",
            "eval_before": {"greedy_accuracy": run["before"]}, "eval_after": {"greedy_accuracy": run["after"]},
            **{k: run.get(k) for k in ("steps", "rollouts", "generated_tokens", "train_seconds", "wall_seconds",
                                       "learning_curve")}}


def groups(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    return out


def markdown(runs: list[dict]) -> str:
    lines = ["| method | seeds | held-out accuracy, mean ± sd | per seed | generated tokens (mean) | rollouts |",
             "|---|---|---|---|---|---|"]
    for method, rs in groups(runs).items():
        acc = [r["accuracy"] for r in rs]
        sd = f" ± {statistics.stdev(acc):.1%}" if len(acc) > 1 else ""
        tokens = statistics.mean(r["generated_tokens"] for r in rs)
        lines.append(f"| {method} | {', '.join(str(r['seed']) for r in rs)} | {statistics.mean(acc):.1%}{sd} | "
                     f"{' / '.join(f'{a:.1%}' for a in acc)} | {tokens:,.0f} | {rs[0]['rollouts']} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Held-out accuracy (the learning curve's problems) against generated tokens: each seed thin, the mean thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.2), dpi=120)
    for i, (method, rs) in enumerate(groups(runs).items()):
        color = f"C{i}"
        curves = [r["learning_curve"] for r in rs if r["learning_curve"]]
        for c in curves:
            ax.plot([p["generated_tokens"] for p in c], [100 * p["greedy_accuracy"] for p in c], color=color,
                    alpha=0.25, lw=0.8)
        if curves and all(len(c) == len(curves[0]) for c in curves):
            x = [statistics.mean(p[j]["generated_tokens"] for p in curves) for j in range(len(curves[0]))]
            y = [statistics.mean(100 * p[j]["greedy_accuracy"] for p in curves) for j in range(len(curves[0]))]
            ax.plot(x, y, color=color, lw=2, marker="o", ms=3, label=f"{method} ({len(curves)} seeds)")
    ax.set_xlabel("generated tokens (training rollouts)")
    ax.set_ylabel("held-out greedy accuracy (%, curve problems)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
    ax.set_title("RLSD and RLCSD against GRPO and OPSD, main job budget", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def long_row(method: str, seed: int, result: dict) -> dict:
    """A long run as long_run.json records it: the accuracy curve and, per logging window, the mean completion
    length and the digit share of the divergence."""
    log = result.get("train_log") or []

    def series(key: str) -> list[dict]:
        return [{"step": h["step"], "value": h[key]} for h in log if key in h]

    curve = result.get("learning_curve") or []
    best = max(curve, key=lambda p: p["greedy_accuracy"], default=None)
    return {
        "method": method, "seed": seed, "accuracy": float(result["eval_after"]["greedy_accuracy"]),
        "steps": result.get("steps"), "generated_tokens": result.get("generated_tokens"),
        "train_seconds": result.get("train_seconds"), "overrides": result.get("overrides"),
        "curve": [{"step": p["step"], "accuracy": p["greedy_accuracy"]} for p in curve],
        "peak": None if best is None else {"step": best["step"], "accuracy": best["greedy_accuracy"]},
        "completion_length": series("completions/mean_length"), "reward": series("reward"),
        "digit_share": series("divergence/digit_share"),
        "digit_token_fraction": series("divergence/digit_token_fraction"),
    }


def long_summary(runs: list[dict]) -> str:
    lines = ["| method | seed | peak (step) | final curve point | held-out after | length first → last window | "
             "digit share first → last |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        length, share = r["completion_length"], r["digit_share"]
        last = r["curve"][-1]["accuracy"] if r["curve"] else float("nan")
        peak = r["peak"] or {"accuracy": float("nan"), "step": "-"}
        lines.append(
            f"| {r['method']} | {r['seed']} | {peak['accuracy']:.0%} ({peak['step']}) | {last:.0%} | "
            f"{r['accuracy']:.1%} | "
            + (f"{length[0]['value']:.1f} → {length[-1]['value']:.1f}" if length else "-") + " | "
            + (f"{share[0]['value']:.2f} → {share[-1]['value']:.2f}" if share else "- (no teacher)") + " |")
    return "\n".join(lines)


def long_plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=120)
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in runs))}
    for r in runs:
        style = dict(color=colors[r["method"]], lw=1.2, ls="-" if r["seed"] == 0 else "--",
                     label=f"{r['method']} s{r['seed']}")
        axes[0].plot([p["step"] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], marker="o", ms=2,
                     **style)
        axes[1].plot([p["step"] for p in r["completion_length"]], [p["value"] for p in r["completion_length"]],
                     **style)
        if r["digit_share"]:
            axes[2].plot([p["step"] for p in r["digit_share"]], [p["value"] for p in r["digit_share"]], **style)
    for ax, title in zip(axes, ("held-out greedy accuracy (%, curve problems)", "mean completion length (tokens)",
                                "share of the per-token divergence on digit tokens")):
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 100)
    axes[2].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"configurations to run: some of {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reuse-main-job", type=int, nargs="*", default=[], metavar="SEED",
                        help="record OPSD's seeds from main_job_seeds.json instead of running them")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out-root", type=Path, default=ROOT / "outputs" / "hybrids")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (docs/results.md)")
    parser.add_argument("--long", action="store_true", help="the long run (600 steps, accuracy every 50 steps)")
    args = parser.parse_args()
    use_launch_heap()  # the runs are launched as scripts/main_job.sh launches the main job
    if args.long:
        run_long(args)
        return
    if args.list:
        for name, (recipe, overrides) in CONFIGS.items():
            print(f"{name:8} {recipe} {' '.join(overrides)}")
        return
    unknown = [n for n in args.names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from: {', '.join(CONFIGS)}")
    for seed in args.reuse_main_job:
        record(args.results, row("opsd", seed, from_main_job(seed)))
    if not args.plot_only and args.names:
        info = machine()
        print(f"machine: {info.get('cpu')}", flush=True)
        for seed in args.seeds:
            for name in args.names:
                recipe, overrides = CONFIGS[name]
                print(f"running {name}@s{seed} ...", flush=True)
                result = run_recipe(f"{name}@s{seed}", recipe, [*overrides, f"training.seed={seed}"], args.out_root)
                if "error" in result:
                    print(f"{name}@s{seed} failed: {result['error']}", flush=True)
                    continue
                record(args.results, {**row(name, seed, result), "cpu": info.get("cpu")})
    runs = load(args.results)
    print(markdown(runs))
    if runs:
        plot(runs, PLOT)
        print(f"wrote {args.results} and {PLOT}")


def run_long(args: argparse.Namespace) -> None:
    results = args.results if args.results != RESULTS else LONG_RESULTS
    names = args.names or ["opsd", "grpo", "rlsd"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from: {', '.join(CONFIGS)}")
    runs = load(results)
    if not args.plot_only:
        info = machine()
        print(f"machine: {info.get('cpu')}", flush=True)
        for seed in args.seeds:
            for name in names:
                recipe, overrides = CONFIGS[name]
                print(f"running long {name}@s{seed} ...", flush=True)
                result = run_recipe(f"{name}@s{seed}", recipe, [*overrides, *LONG, f"training.seed={seed}"],
                                    args.out_root / "long")
                if "error" in result:
                    print(f"long {name}@s{seed} failed: {result['error']}", flush=True)
                    continue
                runs = [r for r in load(results) if (r["method"], r["seed"]) != (name, seed)]
                runs.append({**long_row(name, seed, result), "cpu": info.get("cpu")})
                results.parent.mkdir(parents=True, exist_ok=True)
                results.write_text(json.dumps(runs, indent=1))
    print(long_summary(runs))
    if runs:
        long_plot(runs, LONG_PLOT)
        print(f"wrote {results} and {LONG_PLOT}")


if __name__ == "__main__":
    main()
