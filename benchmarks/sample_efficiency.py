"""Sample efficiency: OPSD (selfdistill) against TRL's GRPOTrainer on the built-in task, per generated token.

Both methods start from the embedded SmolLM2-135M-Instruct (full fine-tuning, float32, CPU) on the same training
split (two-digit addition, ``make_arithmetic_dataset(2000, 200, seed=0)``), sample at temperature 0.6 with at most 16
new tokens, and train with AdamW at lr 2e-5 (constant), gradient-norm clip 1.0. Held-out greedy accuracy is measured
on the same 100 test problems by the same function (``selfdistill.evaluation.evaluate``: greedy, 32 new tokens), and
plotted against the completion tokens each method sampled for training (EOS included, prompts excluded).

- OPSD: ``python -m selfdistill train recipes/opsd_arithmetic.yaml`` in a subprocess (8 rollouts per step, one per
  prompt, 70 steps; the teacher is the initial model with the reference solution). Its results.json carries the
  learning curve with the exact completion-token count at each point (the trainer's own counter).
- GRPO: ``trl.GRPOTrainer`` with the arithmetic verifier as reward, 8 prompts x 8 generations = 64 rollouts per step
  (its standard group size), TRL's defaults otherwise (loss_type "dapo", beta 0: no reference model, epsilon 0.2,
  group-scaled advantages). A callback evaluates every ``--eval-every`` steps and counts completion tokens exactly:
  with logging every step and one generation per step, ``completions/mean_length`` x rollouts is the step's sum
  (GRPO's ``num_tokens`` counts prompt tokens too).

    python benchmarks/sample_efficiency.py              # OPSD run (~14 min) + 60 GRPO steps (~30-50 min), 2 cores
    python benchmarks/sample_efficiency.py --opsd-results outputs/sample_efficiency/opsd/results.json  # reuse OPSD
    python benchmarks/sample_efficiency.py --grpo-steps 100 --eval-every 10
    python benchmarks/sample_efficiency.py --quick   # plumbing: 2 OPSD steps, 2 GRPO steps of 8 rollouts, 10 problems

Prints a table and writes benchmarks/results/sample_efficiency.json and docs/img/sample_efficiency.png (``--quick``:
under outputs/benchmarks_quick/). Nothing else may run on the machine meanwhile: two CPU-heavy processes slow each
other several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing the package

RESULTS = ROOT / "benchmarks" / "results" / "sample_efficiency.json"
PLOT = ROOT / "docs" / "img" / "sample_efficiency.png"
QUICK_DIR = ROOT / "outputs" / "benchmarks_quick"
RECIPE = "recipes/opsd_arithmetic.yaml"
MODEL = "smollm2-135m-instruct"

# Shared with the OPSD recipe (recipes/opsd_arithmetic.yaml); the GRPO side uses these values.
N_TRAIN, N_TEST, SEED = 2000, 200, 0
TEMPERATURE = 0.6
MAX_NEW_TOKENS = 16
LEARNING_RATE = 2e-5
EVAL = {"batch_size": 100, "max_new_tokens": 32}  # the recipe's eval section

DIFFERENCES = [
    "Objective: OPSD minimises the reverse KL to the initial model conditioned on the reference solution (full "
    "vocabulary, per-token scale clip tau 1) and needs no reward; GRPO maximises the verifier's reward with TRL's "
    "clipped surrogate (loss_type 'dapo', epsilon 0.2, beta 0: no KL to a reference model) and never sees the "
    "reference solution.",
    "Batch: OPSD samples 8 rollouts per step (8 prompts, one each); GRPO 64 (8 prompts x 8 generations; a group "
    "needs several rollouts for its advantage). Steps are therefore not comparable; rollouts and tokens are.",
    "Extra compute not counted by the x axis: OPSD runs a teacher forward (no sampling) over every completion; GRPO "
    "computes rewards. Wall-clock training seconds (evaluation excluded) are reported beside the tokens.",
    "Loss-side temperature: GRPO divides its logits by the sampling temperature (0.6) when computing log-probs; the "
    "OPSD loss uses the unscaled logits. Both sample at 0.6.",
    "Curve points: OPSD is evaluated every --opsd-eval-every steps (8 rollouts each), GRPO every --eval-every steps "
    "(64 rollouts each), so the first point reaching an accuracy is found at each curve's own resolution.",
]


def split():
    from selfdistill.tasks.arithmetic import make_arithmetic_dataset

    data = make_arithmetic_dataset(N_TRAIN, N_TEST, seed=SEED, digits=2)
    return data["train"], data["test"]


# ------------------------------------------------------------------------------------------------------- OPSD
def opsd_overrides(opts: argparse.Namespace, out_dir: Path) -> list[str]:
    # 8 rollouts a step for 120 steps, as recorded (the recipe itself now takes 12 for 150).
    overrides = [f"training.output_dir={out_dir}", f"eval.curve_n={opts.eval_n}",
                 f"eval.every_steps={opts.opsd_eval_every}", "training.per_device_train_batch_size=8",
                 "training.max_steps=120"]
    if opts.quick:
        overrides += ["training.max_steps=2", "training.per_device_train_batch_size=4", "training.logging_steps=1",
                      f"eval.n={opts.eval_n}", f"eval.batch_size={opts.eval_n}", "eval.after=false"]
    return overrides


def run_opsd(opts: argparse.Namespace, out_dir: Path) -> Path:
    """``selfdistill train`` on the OPSD recipe in a subprocess; the path of its results.json."""
    cmd = [sys.executable, "-m", "selfdistill", "train", RECIPE, *opsd_overrides(opts, out_dir)]
    env = dict(os.environ)
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    log = out_dir.parent / f"{out_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"OPSD: {' '.join(cmd[1:])} (log: {log.relative_to(ROOT)})", flush=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if code:
        raise SystemExit(f"the OPSD run failed (exit {code}); see {log}:\n{log.read_text()[-3000:]}")
    return out_dir / "results.json"


def opsd_curve(path: Path) -> dict[str, Any]:
    """The OPSD learning curve with completion tokens per point (exact when results.json records them)."""
    results = json.loads(path.read_text())
    points = results.get("learning_curve") or []
    if not points:
        raise SystemExit(f"{path} has no learning_curve; run the recipe with eval.every_steps > 0")
    exact = all("generated_tokens" in p for p in points)
    curve = []
    for p in points:
        tokens = p["generated_tokens"] if exact else results["generated_tokens"] * p["step"] / results["steps"]
        curve.append({"step": p["step"], "rollouts": p["rollouts"], "generated_tokens": tokens,
                      "greedy_accuracy": p["greedy_accuracy"]})
    return {
        "results_json": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "tokens_per_point": "exact: the trainer's tokens_generated counter at each curve point" if exact else
        "ESTIMATED as generated_tokens * step / steps (this results.json records no tokens per curve point)",
        "steps": results["steps"],
        "rollouts": results["rollouts"],
        "generated_tokens": results["generated_tokens"],
        "train_seconds": results["train_seconds"],
        "config": results.get("config"),
        "eval_before_200": (results.get("eval_before") or {}).get("greedy_accuracy"),
        "eval_after_200": (results.get("eval_after") or {}).get("greedy_accuracy"),
        "curve": curve,
    }


# ------------------------------------------------------------------------------------------------------- GRPO
def grpo_kwargs(opts: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out_dir),
        "max_steps": opts.grpo_steps,
        "per_device_train_batch_size": opts.grpo_prompts * opts.grpo_generations,  # rollouts per step
        "num_generations": opts.grpo_generations,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,  # one generation per optimizer step: the logged mean length is that step's
        "num_iterations": 1,
        "max_completion_length": MAX_NEW_TOKENS,
        "temperature": TEMPERATURE,
        "top_p": 1.0,
        "top_k": 0,
        "learning_rate": opts.grpo_lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "beta": 0.0,
        "loss_type": "dapo",
        "epsilon": 0.2,
        "scale_rewards": "group",
        "bf16": False,  # TRL configs default to bf16=True; float32 like the OPSD run
        "fp16": False,
        "activation_checkpointing": False,  # TRL configs default to gradient checkpointing on
        "use_cpu": True,
        "seed": SEED,
        "shuffle_dataset": True,
        "logging_steps": 1,  # the token counter reads every step's log
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }


def run_grpo(opts: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from selfdistill.evaluation import evaluate
    from selfdistill.modeling import load_model, load_tokenizer
    from selfdistill.tasks.arithmetic import arithmetic_reward

    if opts.threads:
        torch.set_num_threads(opts.threads)
    set_seed(SEED)
    train, test = split()
    tok = load_tokenizer(MODEL)
    model = load_model(MODEL)  # float32
    rollouts_per_step = opts.grpo_prompts * opts.grpo_generations

    class Curve(TrainerCallback):
        """Held-out greedy accuracy every ``every`` steps; exact completion tokens from every step's log."""

        def __init__(self):
            self.points: list[dict[str, Any]] = []
            self.step_logs: dict[int, dict[str, Any]] = {}
            self.eval_seconds = 0.0

        def measure(self, step: int) -> None:
            result = evaluate(model, tok, test, arithmetic_reward, n=opts.eval_n, progress=False, **EVAL)
            self.eval_seconds += result["seconds"]
            self.points.append({"step": step, "rollouts": step * rollouts_per_step,
                                "greedy_accuracy": result["greedy_accuracy"]})
            print(f"[grpo] step {step}: held-out greedy accuracy {result['greedy_accuracy']:.1%}", flush=True)

        def on_train_begin(self, args, state, control, **kwargs):
            if not self.points:
                self.measure(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % opts.eval_every == 0 or state.global_step == state.max_steps:
                self.measure(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.step_logs[state.global_step] = {
                    # one generation of rollouts_per_step completions per step: mean x count is the exact sum
                    "completion_tokens": round(logs["completions/mean_length"] * rollouts_per_step),
                    "mean_length": logs["completions/mean_length"],
                    "reward": logs.get("reward"),
                    "num_tokens": logs.get("num_tokens"),  # prompt + completion tokens, cumulative
                    "loss": logs.get("loss"),
                    "step_time": logs.get("step_time"),  # GRPO's own seconds for the step
                }

    curve = Curve()
    args = GRPOConfig(**grpo_kwargs(opts, out_dir))
    trainer = GRPOTrainer(model=model, reward_funcs=[arithmetic_reward], args=args, train_dataset=train,
                          processing_class=tok, callbacks=[curve])
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start - curve.eval_seconds

    steps = trainer.state.global_step
    missing = [s for s in range(1, steps + 1) if s not in curve.step_logs]
    if missing:
        raise RuntimeError(f"no completion-length log for GRPO steps {missing}; the token count would be inexact")
    cumulative, total = {0: 0}, 0
    for s in range(1, steps + 1):
        total += curve.step_logs[s]["completion_tokens"]
        cumulative[s] = total
    for point in curve.points:
        point["generated_tokens"] = cumulative[point["step"]]
    return {
        "tokens_per_point": "exact: sum over steps of completions/mean_length x rollouts per step (logged every step)",
        "steps": steps,
        "rollouts": steps * rollouts_per_step,
        "generated_tokens": total,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(curve.eval_seconds, 1),
        "config": {k: v for k, v in grpo_kwargs(opts, out_dir).items() if k != "output_dir"},
        "reward_funcs": ["selfdistill.tasks.arithmetic.arithmetic_reward"],
        "curve": curve.points,
        "step_logs": curve.step_logs,
    }


# ---------------------------------------------------------------------------------------------------- compare
def first_reaching(curve: list[dict[str, Any]], accuracy: float) -> dict[str, Any] | None:
    return next((p for p in curve if p["greedy_accuracy"] >= accuracy - 1e-9), None)


def compare(opsd: dict[str, Any], grpo: dict[str, Any]) -> dict[str, Any]:
    """Token ratios at which one method first reaches the other's final accuracy."""
    out: dict[str, Any] = {}
    for name, (fast, slow) in {"opsd_reaches_grpo_final": (opsd, grpo),
                               "grpo_reaches_opsd_final": (grpo, opsd)}.items():
        target = slow["curve"][-1]["greedy_accuracy"]
        hit = first_reaching(fast["curve"], target)
        slow_first = first_reaching(slow["curve"], target)
        entry: dict[str, Any] = {"target_accuracy": target, "reached": hit is not None}
        if hit is not None:
            entry.update(step=hit["step"], tokens=hit["generated_tokens"], accuracy=hit["greedy_accuracy"])
            other_final, other_first = slow["curve"][-1]["generated_tokens"], slow_first["generated_tokens"]
            entry["other_tokens_final"] = other_final
            entry["other_tokens_first_reaching"] = other_first
            if hit["generated_tokens"] > 0:
                entry["token_ratio_vs_other_final"] = other_final / hit["generated_tokens"]
                entry["token_ratio_vs_other_first_reaching"] = other_first / hit["generated_tokens"]
            else:
                entry["note"] = "reached at step 0 (the untrained model): no ratio"
        out[name] = entry
    out["explanation"] = (
        "opsd_reaches_grpo_final: the first OPSD curve point with accuracy >= GRPO's final accuracy; "
        "token_ratio_vs_other_final = GRPO's total tokens / OPSD's tokens at that point (the paper's 4-12x claim is "
        "this kind of ratio); token_ratio_vs_other_first_reaching uses the tokens at GRPO's own first point at that "
        "accuracy instead (never larger). grpo_reaches_opsd_final is the same with the roles swapped (a ratio < 1 "
        "there means GRPO needed more tokens)."
    )
    return out


def plot(opsd: dict[str, Any], grpo: dict[str, Any], path: Path, title: str, eval_n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, data, marker in (("OPSD", opsd, "o"), ("GRPO", grpo, "s")):
        label = f"{name} ({data['rollouts'] // max(data['steps'], 1)} rollouts/step, {data['steps']} steps)"
        pts = [p for p in data["curve"] if p["generated_tokens"] > 0]
        ax.plot([p["generated_tokens"] for p in pts], [100 * p["greedy_accuracy"] for p in pts],
                marker=marker, label=label)
    start = opsd["curve"][0]
    if start["step"] == 0:
        ax.axhline(100 * start["greedy_accuracy"], color="grey", ls=":", lw=1, label="before training")
    ax.set_xscale("log")
    ax.set_xlabel("generated completion tokens (training rollouts, log scale)")
    ax.set_ylabel(f"held-out greedy accuracy (%, {eval_n} problems)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(opsd: dict[str, Any], grpo: dict[str, Any], comparison: dict[str, Any]) -> str:
    head = f"{'method':6} {'step':>5} {'rollouts':>8} {'tokens':>8} {'accuracy':>8}"
    lines = [head, "-" * len(head)]
    for name, data in (("OPSD", opsd), ("GRPO", grpo)):
        for p in data["curve"]:
            lines.append(f"{name:6} {p['step']:>5} {p['rollouts']:>8} {round(p['generated_tokens']):>8} "
                         f"{p['greedy_accuracy']:>8.1%}")
        lines.append("")
    for name, data in (("OPSD", opsd), ("GRPO", grpo)):
        final = data["curve"][-1]
        lines.append(f"{name} final: {final['greedy_accuracy']:.1%} after {data['steps']} steps, {data['rollouts']} "
                     f"rollouts, {round(data['generated_tokens'])} generated tokens, {data['train_seconds']:.0f} s "
                     "training")
    for key, label in (("opsd_reaches_grpo_final", "OPSD first reaches GRPO's final"),
                       ("grpo_reaches_opsd_final", "GRPO first reaches OPSD's final")):
        c = comparison[key]
        if not c["reached"]:
            lines.append(f"{label} accuracy ({c['target_accuracy']:.1%}): never")
        elif "token_ratio_vs_other_final" in c:
            lines.append(f"{label} accuracy ({c['target_accuracy']:.1%}) at step {c['step']}, {c['tokens']} tokens: "
                         f"{c['token_ratio_vs_other_final']:.2f}x fewer than the other's total "
                         f"({c['token_ratio_vs_other_first_reaching']:.2f}x vs the other's first point at it)")
        else:
            lines.append(f"{label} accuracy ({c['target_accuracy']:.1%}): {c['note']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpo-steps", type=int, default=60, help="GRPO optimizer steps")
    parser.add_argument("--eval-every", type=int, default=5, help="GRPO steps between held-out evaluations")
    parser.add_argument("--grpo-prompts", type=int, default=8, help="prompts per GRPO step")
    parser.add_argument("--grpo-generations", type=int, default=8, help="GRPO num_generations (group size)")
    parser.add_argument("--grpo-lr", type=float, default=LEARNING_RATE, help="GRPO learning rate (OPSD's: 2e-5)")
    parser.add_argument("--eval-n", type=int, default=100, help="held-out problems per evaluation")
    parser.add_argument("--opsd-eval-every", type=int, default=5, help="OPSD steps between held-out evaluations")
    parser.add_argument("--opsd-results", type=Path, default=None,
                        help="read this OPSD results.json instead of running the recipe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true",
                        help="2 OPSD steps of 4 rollouts, 2 GRPO steps of 2x4 rollouts, 10 problems, 1 thread")
    opts = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if opts.quick:
        opts.grpo_steps, opts.eval_every, opts.grpo_prompts, opts.grpo_generations = 2, 1, 2, 4
        opts.eval_n, opts.opsd_eval_every, opts.threads = 10, 1, 1
    out_root = QUICK_DIR / "sample_efficiency" if opts.quick else ROOT / "outputs" / "sample_efficiency"
    results_path = QUICK_DIR / "sample_efficiency.json" if opts.quick else RESULTS
    plot_path = QUICK_DIR / "sample_efficiency.png" if opts.quick else PLOT

    opsd_path = opts.opsd_results
    if opsd_path is None:
        start = time.perf_counter()
        opsd_path = run_opsd(opts, out_root / "opsd")
        print(f"OPSD done in {time.perf_counter() - start:.0f} s", flush=True)
    opsd = opsd_curve(opsd_path.resolve())
    opsd["command"] = None if opts.opsd_results else \
        f"python -m selfdistill train {RECIPE} {' '.join(opsd_overrides(opts, out_root / 'opsd'))}"
    print(f"OPSD: {len(opsd['curve'])} curve points, {opsd['generated_tokens']} tokens ({opsd['tokens_per_point']})")

    print(f"GRPO: {opts.grpo_steps} steps of {opts.grpo_prompts} prompts x {opts.grpo_generations} generations ...",
          flush=True)
    grpo = run_grpo(opts, out_root / "grpo")
    comparison = compare(opsd, grpo)
    # Both curves start from the same model: on the same problems their step-0 points agree (a sanity check).
    comparison["step0_accuracy"] = {"opsd": opsd["curve"][0]["greedy_accuracy"],
                                    "grpo": grpo["curve"][0]["greedy_accuracy"]}

    import torch
    import transformers
    import trl

    report = {
        "benchmark": "sample_efficiency",
        "quick": opts.quick,
        "model": MODEL,
        "device": "cpu",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "task": f"arithmetic, 2-digit addition: train = make_arithmetic_dataset({N_TRAIN}, {N_TEST}, seed={SEED})"
                "['train']; held-out = the first eval_n rows of its test split",
        "eval": {"function": "selfdistill.evaluation.evaluate (greedy)", "n": opts.eval_n, **EVAL},
        "x_axis": "completion tokens sampled for training (EOS included, prompt tokens excluded), cumulative",
        "opsd": opsd,
        "grpo": grpo,
        "comparison": comparison,
        "differences": DIFFERENCES,
        "torch_threads": opts.threads or "default",
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(report, indent=1, default=str))
    title = "OPSD vs GRPO, SmolLM2-135M-Instruct, two-digit addition (CPU)" + (" [quick]" if opts.quick else "")
    plot(opsd, grpo, plot_path, title, opts.eval_n)
    print()
    print(table(opsd, grpo, comparison))
    print(f"wrote {results_path.relative_to(ROOT)} and {plot_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
