"""The main job on several seeds, and whether its gains carry over to other wordings and to three-digit addition.

For each seed, `selfdistill train recipes/opsd_arithmetic.yaml training.seed=S` runs as its own process (its
results.json gives the held-out accuracy and the wall time of the whole job: set-up, both evaluations, training,
saving). Then the base model and every trained model answer the same held-out problems under other prompts:

    what_is           "What is a + b?"                      (the main job's 200 held-out problems)
    work_out          "Please work out a + b for me."
    equation          "a + b = ?"
    three_digit       the trained wording, "Calculate a + b. Give the result in one short sentence.", on 200
                      three-digit additions (never seen in training)

Greedy decoding with 48 new tokens (the base model's answers to "What is a + b?" often run past 32), scored by the
arithmetic verifier. Prints a table, writes benchmarks/results/main_job_seeds.json and docs/img/main_job_seeds.png.

    python benchmarks/main_job_seeds.py                       # seeds 0 1 2, the shipped recipe
    python benchmarks/main_job_seeds.py --seeds 0 --name try -- training.learning_rate=3e-5
    python benchmarks/main_job_seeds.py --eval-only           # re-evaluate the trained models already on disk
    python benchmarks/main_job_seeds.py --name amx --plot docs/img/main_job_seeds_amx.png   # another machine's run

Each record notes the machine it ran on (CPU model and its bf16 instructions): the wall time depends on it. The runs
start with the allocator setting of scripts/main_job.sh (GLIBC_TUNABLES), as the README's main job does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from recipe_runs import ROOT, machine, mean_sd, record_result, run_recipe, save_percent_plot, use_launch_heap

sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "main_job_seeds.json"
PLOT = ROOT / "docs" / "img" / "main_job_seeds.png"
RECIPE = "recipes/opsd_arithmetic.yaml"

#: name -> (prompt template, operand digits). The trained wording on the two-digit held-out problems is the main job's
#: own evaluation (results.json eval_before / eval_after), so it is not repeated here.
EVAL_SETS: dict[str, tuple[str | None, int]] = {
    "what_is": ("What is {question}?", 2),
    "work_out": ("Please work out {question} for me.", 2),
    "equation": ("{question} = ?", 2),
    "three_digit": (None, 3),
}


def eval_sets(n: int) -> dict:
    from selfdistill.tasks.arithmetic import DEFAULT_PROMPT_TEMPLATE, make_arithmetic_dataset

    out = {}
    for name, (template, digits) in EVAL_SETS.items():
        # Test problems depend only on the seed and digits (data seed 0: the main job's held-out set for 2 digits).
        dd = make_arithmetic_dataset(0, n, seed=0, digits=digits, prompt_template=template or DEFAULT_PROMPT_TEMPLATE)
        out[name] = dd["test"]
    return out


def evaluate_model(path: str, sets: dict, max_new_tokens: int) -> dict[str, float]:
    import torch

    from selfdistill.evaluation import evaluate
    from selfdistill.modeling import load_model, load_tokenizer
    from selfdistill.tasks.arithmetic import arithmetic_reward

    torch.manual_seed(0)
    model, tokenizer = load_model(path), load_tokenizer(path)
    scores = {}
    for name, dataset in sets.items():
        result = evaluate(model, tokenizer, dataset, arithmetic_reward, batch_size=100, max_new_tokens=max_new_tokens,
                          desc=f"{Path(path).parent.name}/{name}", progress=False)
        scores[name] = result["greedy_accuracy"]
        print(f"  {path}: {name} {result['greedy_accuracy']:.1%} ({result['seconds']:.0f} s)", flush=True)
    return scores


def report(record: dict) -> str:
    runs = record["runs"]
    lines = [f"recipe {RECIPE} {' '.join(record['overrides'])}", ""]
    head = f"{'seed':>4} {'before':>7} {'after':>7} {'wall s':>7} {'train s':>7} {'steps':>5}"
    lines += [head, "-" * len(head)]
    for seed, r in runs.items():
        lines.append(f"{seed:>4} {r['before']:>7.1%} {r['after']:>7.1%} {r['wall_seconds']:>7.0f} "
                     f"{r['train_seconds']:>7.0f} {r['steps']:>5}")
    afters = [r["after"] for r in runs.values()]
    walls = [r["wall_seconds"] for r in runs.values()]
    lines.append(f"mean ± sd: after {mean_sd(afters)}, wall {statistics.mean(walls):.0f} s (max {max(walls):.0f})")
    if record.get("generalisation"):
        gen = record["generalisation"]
        lines += ["", f"{'eval set':16} {'base':>7} {'trained (mean ± sd over seeds)':>32}"]
        lines.append(f"{'trained wording':16} {statistics.mean(r['before'] for r in runs.values()):>7.1%} "
                     f"{mean_sd(afters):>32}")
        for name in EVAL_SETS:
            trained = [gen[seed][name] for seed in runs if seed in gen]
            lines.append(f"{name:16} {gen['base'][name]:>7.1%} {mean_sd(trained):>32}")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    gen = record["generalisation"]
    seeds = [s for s in runs if s in gen]
    # The trained wording: the main job's own before/after evaluation.
    scores = {s: {"trained_wording": runs[s]["after"], **gen[s]} for s in seeds}
    base = {"trained_wording": runs[seeds[0]]["before"], **gen["base"]}
    names = ["trained_wording", *EVAL_SETS]
    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=120)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [100 * base[n] for n in names], width=0.4, label="base model")
    means = [100 * statistics.mean(scores[s][n] for s in seeds) for n in names]
    errs = [100 * statistics.stdev(scores[s][n] for s in seeds) if len(seeds) > 1 else 0 for n in names]
    ax.bar([i + 0.2 for i in x], means, width=0.4, yerr=errs, capsize=3, label=f"after OPSD ({len(seeds)} seeds)")
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("greedy accuracy (%)")
    ax.axhline(80, color="grey", ls="--", lw=1)
    save_percent_plot(fig, ax, path, "Main job: held-out accuracy by prompt wording and digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="shipped", help="record name in the results file")
    parser.add_argument("--n", type=int, default=200, help="problems per generalisation set")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate the models on disk")
    parser.add_argument("--no-generalisation", action="store_true", help="train only")
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"plot path (default {PLOT.relative_to(ROOT)})")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    parser.add_argument("--out-root", type=Path, default=ROOT / "outputs" / "main_job_seeds",
                        help="the runs' folders go under OUT_ROOT/NAME (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every seed (after --)")
    args = parser.parse_args()
    results = args.results

    all_results = json.loads(results.read_text()) if results.exists() else {}
    record = all_results.get(args.name, {"overrides": args.overrides, "runs": {}, "generalisation": {}})
    if record.get("overrides") != args.overrides:
        record = {"overrides": args.overrides, "runs": {}, "generalisation": {}}
    if not args.eval_only:
        record["machine"] = machine()
        record["glibc_tunables"] = use_launch_heap()  # as scripts/main_job.sh launches the job
    out_root = args.out_root / args.name

    def save() -> None:
        record_result(results, args.name, record)

    for seed in args.seeds:
        if args.eval_only:
            break
        print(f"seed {seed}: training ...", flush=True)
        r = run_recipe(f"seed{seed}", RECIPE, [f"training.seed={seed}", *args.overrides], out_root)
        if "error" in r:
            raise SystemExit(f"seed {seed}: {r['error']}")
        record["runs"][str(seed)] = {
            "before": r["eval_before"]["greedy_accuracy"], "after": r["eval_after"]["greedy_accuracy"],
            "wall_seconds": r["wall_seconds"], "train_seconds": r["train_seconds"], "steps": r["steps"],
            "rollouts": r["rollouts"], "generated_tokens": r["generated_tokens"],
            "learning_curve": r["learning_curve"], "final_model": str(out_root / f"seed{seed}" / "final"),
            # Seconds per optimizer step by stage, from the last logging window.
            "step_seconds": {k: v for k, v in r["final_train_metrics"].items() if k.startswith("time/")},
        }
        save()
        print(f"seed {seed}: {r['eval_before']['greedy_accuracy']:.1%} -> {r['eval_after']['greedy_accuracy']:.1%} "
              f"in {r['wall_seconds']:.0f} s wall", flush=True)

    if not args.no_generalisation:
        sets = eval_sets(args.n)
        gen = record.setdefault("generalisation", {})
        if "base" not in gen:
            gen["base"] = evaluate_model("smollm2-135m-instruct", sets, args.max_new_tokens)
            save()
        for seed in args.seeds:
            run = record["runs"].get(str(seed))
            if run is None:
                continue
            gen[str(seed)] = evaluate_model(run["final_model"], sets, args.max_new_tokens)
            save()
        record["eval_settings"] = {"n": args.n, "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}
        save()
        if len([s for s in record["runs"] if s in gen]) >= 1:
            plot(record, args.plot)
    print(report(record))
    print(f"wrote {results}" + ("" if args.no_generalisation else f" and {args.plot}"))


if __name__ == "__main__":
    main()
