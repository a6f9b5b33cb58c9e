"""Training-step speed and peak memory: selfdistill's `SelfDistillTrainer` against TRL's `SDFTTrainer`, side by side.

Both trainers run the same job on the CPU: the embedded SmolLM2-135M-Instruct, full fine-tuning in float32, the same
arithmetic prompts in the same order, 8 rollouts per optimizer step (8/G prompts x G generations) at G = 1, 4 and 8,
16 new tokens sampled at temperature 0.6, the same teacher context (the problem plus the reference solution, in the
OPSD recipe's wording), a frozen copy of the initial weights as teacher, and the full-vocabulary reverse KL
KL(student || teacher) without any clipping. AdamW at lr 2e-5 (constant), gradient-norm clip 1.0.

Each (trainer, G) configuration runs in its own subprocess, one after the other, so the two trainers never share a
process and the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the worker) is that configuration's
alone. A worker trains 2 warm-up steps (3 with --compile, 1 with --quick) plus K measured steps; seconds per step is
the wall time between the end of the last warm-up step and the end of the last step, divided by K (generation, teacher
and student passes, optimizer).

    python benchmarks/train_step.py                  # G = 1, 4, 8; K = 5 measured steps; ~7-10 min on 2 CPU cores
    python benchmarks/train_step.py --G 4 --steps 10 # one G, more steps
    python benchmarks/train_step.py --repeats 2      # each pair twice, in alternating order (AB then BA), pooled
    python benchmarks/train_step.py --ablate 1 4 8   # also selfdistill with each speed lever off (~25 min)
    python benchmarks/train_step.py --bf16 --out benchmarks/results/train_step_bf16.json   # both in bf16 autocast
    python benchmarks/train_step.py --bf16 --heap tuned  # both workers started with the launch scripts' allocator
    python benchmarks/train_step.py --G 1 --bf16 --attn eager  # both with transformers' eager attention
    python benchmarks/train_step.py --G 1 --compile  # both with torch_compile=True, 3 warm-up steps (~7 min a G)
    python benchmarks/train_step.py --plot-only --out benchmarks/results/train_step_bf16_amd.json   # its table, plot
    python benchmarks/train_step.py --quick          # plumbing check: G = 1, 4 rollouts, 1 + 1 steps, 1 thread
    python benchmarks/train_step.py --worker trainer=sdft G=4 rollouts=8 steps=5 threads=0   # one worker alone

Prints a table and writes benchmarks/results/train_step.json and .png (``--quick``: outputs/benchmarks_quick/)
with the exact settings of both sides and every difference between them that could not be removed ("differences").
Nothing else may run on the machine meanwhile: two CPU-heavy processes slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing the package
from recipe_runs import machine  # noqa: E402  (benchmarks/, the script's own folder)

RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"
QUICK_RESULTS = ROOT / "outputs" / "benchmarks_quick" / "train_step.json"
MODEL = "smollm2-135m-instruct"
TUNED_HEAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"  # scripts/main_job.sh, launch.sh

# The shared job (recipes/opsd_arithmetic.yaml's training settings, with the clip switched off: SDFT has none).
MAX_NEW_TOKENS = 16
TEMPERATURE = 0.6
LEARNING_RATE = 2e-5
SEED = 0
N_TRAIN, N_TEST = 2000, 200  # the recipe's split sizes, so the training problems are the recipe's
# The recipe's OPSD teacher wording; SDFT's template says the same with its own placeholder names.
OPSD_TEMPLATE = (
    "{problem}\n\nHere is a reference solution:\n{solution}\n\nUnderstand it, then answer in your own words."
)
SDFT_TEMPLATE = OPSD_TEMPLATE.replace("{problem}", "{prompt}").replace("{solution}", "{privileged_context}")

COMMON = {  # TrainingArguments both configs take with the same meaning
    "learning_rate": LEARNING_RATE,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch_fused",  # the TrainingArguments default, named so both sides use it whatever it becomes
    "gradient_accumulation_steps": 1,
    "fp16": False,
    "activation_checkpointing": False,  # TRL configs default to gradient checkpointing on
    "use_cpu": True,
    "seed": SEED,
    "logging_steps": 1,  # every step's completion length is read from the logs
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "max_prompt_length": 512,
    "max_completion_length": MAX_NEW_TOKENS,
    "top_p": 1.0,
}

DIFFERENCES = [
    "Loss normalisation: selfdistill sums the per-token KL over the step's completion tokens and divides by their "
    "total count (token mean); SDFT averages each sequence's tokens, then the sequences (sequence mean). Same "
    "compute, different token weights when completion lengths differ.",
    "Position ids: selfdistill counts real tokens only (as generate does), so a left-padded row's student and "
    "teacher passes use the positions it was sampled with; SDFT passes no position_ids, so the model counts from "
    "the first (padding) column and left-padded rows are scored at shifted positions. Numerics only, not speed.",
    "Shared prefixes: selfdistill runs the beginning that several rows share once and reuses its KV cache: in the "
    "teacher pass (share_teacher_prefix: the G rollouts of a prompt share the whole teacher context, all rows the "
    "chat template's system prompt), in sampling's prefill and, with gradients, in the student pass "
    "(share_prompt_prefix). SDFT runs every full row. Same products, float rounding only; implementation "
    "differences measured here, not settings.",
    "Teacher weights: selfdistill's 'initial' teacher keeps a copy of the trainable parameters and swaps storage "
    "handles with the student's for the teacher pass (one model module); SDFT's 'base' teacher (non-PEFT) is a "
    "second model loaded from the student's path, frozen in eval mode. Both are the frozen initial weights.",
    "Sampling temperature vs loss temperature: SDFT divides both passes' logits by args.temperature before the "
    "loss; selfdistill does not. To make the losses identical, SDFT runs with temperature=1.0 (the loss scale) "
    "and samples at 0.6 through generation_kwargs={'temperature': 0.6}, which overrides its generation config.",
    "Rollouts: both seed 0 and sample with model.generate on the same left-padded prompts, so their first "
    "step's completions can coincide (the quick check saw the same lengths and the same token-mean KL), but after "
    "the first update the weights differ (loss normalisation above) and so do the completions and their lengths, "
    "which set the cost; each run's completion length and token-mean KL per step are recorded.",
]


# --------------------------------------------------------------------------------------------------- settings
#: selfdistill's speed levers (all on by default), switched off one at a time by --ablate.
LEVERS = {
    "all": {},
    "no-prompt-sharing": {"share_prompt_prefix": False},
    "none": {"share_prompt_prefix": False, "share_teacher_prefix": False},
}


def selfdistill_kwargs(g: int, rollouts: int, steps: int, output_dir: str, levers: str = "all",
                       bf16: bool = False, compile_: bool = False) -> dict[str, Any]:
    # bf16 is set on both sides: TRL configs default to bf16=True, so float32 (the default here) is asked for explicitly
    return {
        **COMMON,
        "bf16": bf16,
        "torch_compile": compile_,  # TrainingArguments' own switch, on both sides
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": rollouts,  # counts rollouts: rollouts / G prompts x G generations
        "num_generations": g,
        "temperature": TEMPERATURE,
        "top_k": None,
        "divergence": "reverse_kl",  # KL(student || teacher)
        "support": "full",
        "clip": "none",  # SDFT has no per-token divergence clip
        "ratio_clip": None,  # no rollout reuse, so no importance ratio on either side
        "teacher_policy": "initial",
        "share_teacher_prefix": True,
        "share_prompt_prefix": True,
    } | LEVERS[levers]


def sdft_kwargs(g: int, rollouts: int, steps: int, output_dir: str, bf16: bool = False,
                compile_: bool = False) -> dict[str, Any]:
    return {
        **COMMON,
        "bf16": bf16,
        "torch_compile": compile_,
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": rollouts,  # also counts rollouts (generation_batch_size / num_generations)
        "num_generations": g,
        "temperature": 1.0,  # SDFT divides the loss logits by this; 1.0 = the unscaled logits selfdistill uses
        "generation_kwargs": {"temperature": TEMPERATURE},  # the sampling temperature
        "top_k": 0,
        "distillation_mode": "full_logits",
        "distillation_alpha": 1.0,  # loss_utils.compute_divergence: alpha = 1.0 is KL(student || teacher)
        "distillation_is_clip": None,  # its only clip (importance ratio); inactive without reuse anyway
        "num_loss_tokens_to_skip": 0,
        "teacher_model_kind": "base",  # the frozen initial student
        "teacher_prompt_template": SDFT_TEMPLATE,
        "generate_from_teacher": False,
        "shuffle_dataset": True,
    }


def make_dataset():
    from selfdistill.tasks.arithmetic import make_arithmetic_dataset

    train = make_arithmetic_dataset(N_TRAIN, N_TEST, seed=SEED, digits=2)["train"]
    # SDFT reads the teacher's privileged text from a "privileged_context" column; selfdistill reads "solution".
    return train.add_column("privileged_context", list(train["solution"]))


def check_contexts(n: int = 8) -> dict[str, Any]:
    """Token ids of both trainers' student prompts and teacher contexts for the first n rows, compared."""
    from types import SimpleNamespace

    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    from selfdistill.modeling import load_tokenizer
    from selfdistill.sequences import render_context
    from selfdistill.sources import ReferenceSolution
    from selfdistill.sources.base import Rollout

    tok = load_tokenizer(MODEL)
    rows = make_dataset().select(range(n)).to_list()
    source = ReferenceSolution(column="solution", template=OPSD_TEMPLATE)
    views = source.views([Rollout(row=r, prompt=r["prompt"], completion="", completion_ids=[]) for r in rows])
    builder = DemonstrationTeacherContextBuilder(SimpleNamespace(args=SimpleNamespace(
        teacher_prompt_template=SDFT_TEMPLATE)))

    def sdft_ids(messages):  # SDFTTrainer._tokenize_prompts
        return list(tok.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0])

    same_teacher = all(render_context(tok, v[0].context) == sdft_ids(builder._compose_teacher_prompt(
        r["prompt"], r["privileged_context"])) for r, v in zip(rows, views))
    same_student = all(render_context(tok, r["prompt"]) == sdft_ids(r["prompt"]) for r in rows)
    return {
        "rows_checked": n,
        "student_prompt_ids_identical": same_student,
        "teacher_context_ids_identical": same_teacher,
        "example_teacher_context": tok.decode(render_context(tok, views[0][0].context)),
    }


# ----------------------------------------------------------------------------------------------------- worker
def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration for 1 + steps optimizer steps in this process; its timings and peak RSS."""
    import torch
    from transformers import TrainerCallback, set_seed

    from selfdistill.modeling import load_model, load_tokenizer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    set_seed(SEED)
    g, rollouts, steps = spec["G"], spec["rollouts"], spec["steps"]
    warmup = spec["warmup"]
    total = steps + warmup
    out_dir = str(ROOT / "outputs" / "train_step" / f"{spec['trainer']}_{spec['levers']}_G{g}")
    dataset = make_dataset()
    tok = load_tokenizer(MODEL)
    model = load_model(MODEL, {"attn_implementation": spec["attn"]})  # float32; the same attention on both sides
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    class Clock(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.lengths, self.logs = 0.0, [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])
                self.logs.append(dict(logs))

    clock = Clock()
    if spec["trainer"] == "selfdistill":
        from selfdistill.config import SelfDistillConfig
        from selfdistill.sources import ReferenceSolution
        from selfdistill.trainer import SelfDistillTrainer

        args = SelfDistillConfig(**selfdistill_kwargs(g, rollouts, total, out_dir, spec["levers"], bool(spec["bf16"]),
                                                     bool(spec["compile"])))
        trainer = SelfDistillTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                     privileged=ReferenceSolution(column="solution", template=OPSD_TEMPLATE),
                                     callbacks=[clock])
    elif spec["trainer"] == "sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(**sdft_kwargs(g, rollouts, total, out_dir, bool(spec["bf16"]), bool(spec["compile"])))
        trainer = SDFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[clock])
        sdft_phases = time_sdft_phases(trainer)
    else:
        raise SystemExit(f"unknown trainer {spec['trainer']!r}; choose selfdistill or sdft")
    trainer.train()

    if len(clock.ends) != total:
        raise RuntimeError(f"expected {total} optimizer steps, timed {len(clock.ends)}")
    step_seconds = [b - a for a, b in zip([clock.start] + clock.ends[:-1], clock.ends)]
    measured = step_seconds[warmup:]
    phases: dict[str, float] = {}
    if spec["trainer"] == "sdft":  # the timers' split, per step; the first ones are the warm-up steps
        phases = {key: sum(values[warmup:]) / len(values[warmup:]) for key, values in sdft_phases.items()
                  if len(values) > warmup}
    for key in ("time/generation", "time/teacher", "time/student"):  # selfdistill's own split of a step
        values = [log[key] for log in clock.logs[warmup:] if key in log]
        if values:
            phases[key] = sum(values) / len(values)
    # The token-mean KL of each step: selfdistill's loss is that already; SDFT logs it beside its sequence-mean loss.
    kl_key = "loss" if spec["trainer"] == "selfdistill" else "self_distillation/distillation_loss"
    token_mean_kl = [log.get(kl_key) for log in clock.logs]
    return {
        "trainer": spec["trainer"],
        "levers": spec["levers"] if spec["trainer"] == "selfdistill" else None,
        "G": g,
        "rollouts_per_step": rollouts,
        "prompts_per_step": rollouts // g,
        "measured_steps": steps,
        "warmup_seconds": step_seconds[0],
        "warmup_step_seconds": step_seconds[:warmup],
        "step_seconds": measured,
        "seconds_per_step": sum(measured) / len(measured),
        "steps_per_second": len(measured) / sum(measured),
        "mean_completion_length": sum(clock.lengths[warmup:]) / max(len(clock.lengths[warmup:]), 1),
        "completion_length_per_step": clock.lengths,
        "token_mean_kl_per_step": token_mean_kl,
        "phase_seconds_per_step": phases,
        "rss_after_model_load_mb": rss_after_load / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "torch_threads": torch.get_num_threads(),
    }


def time_sdft_phases(trainer: Any) -> dict[str, list[float]]:
    """Split SDFTTrainer's steps as selfdistill splits its own: generation (its `_generate`), teacher (its forwards
    under no_grad) and student (the rest of `training_step`: the student's forward and backward). Per step, in order;
    the timers wrap the trainer's own methods on this instance and change nothing they compute."""
    import torch

    split: dict[str, list[float]] = {"time/generation": [], "time/teacher": [], "time/student": []}
    spent = {"time/generation": 0.0, "time/teacher": 0.0}

    def timed(method, key):
        def call(*args, **kwargs):
            if key == "time/teacher" and torch.is_grad_enabled():
                return method(*args, **kwargs)  # the student's forward: counted in the rest of the step
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        return call

    step = trainer.training_step

    def training_step(*args, **kwargs):
        spent.update({"time/generation": 0.0, "time/teacher": 0.0})
        start = time.perf_counter()
        out = step(*args, **kwargs)
        total = time.perf_counter() - start
        for key, value in spent.items():
            split[key].append(value)
        split["time/student"].append(max(total - sum(spent.values()), 0.0))
        return out

    trainer._generate = timed(trainer._generate, "time/generation")
    trainer._forward_logits = timed(trainer._forward_logits, "time/teacher")
    trainer.training_step = training_step
    return split


def merge_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's repeated workers as one result: every measured step of every repeat, phases averaged."""
    good = [r for r in runs if "step_seconds" in r]
    if not good:
        return runs[-1]
    if len(runs) == 1:
        return runs[0]
    steps = [s for r in good for s in r["step_seconds"]]
    merged = dict(good[0])
    merged.update({
        "step_seconds": steps,
        "measured_steps": len(steps),
        "seconds_per_step": sum(steps) / len(steps),
        "steps_per_second": len(steps) / sum(steps),
        "mean_completion_length": sum(r["mean_completion_length"] for r in good) / len(good),
        "phase_seconds_per_step": {k: sum(r["phase_seconds_per_step"][k] for r in good) / len(good)
                                   for k in good[0]["phase_seconds_per_step"]},
        "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
        "process_seconds": sum(r["process_seconds"] for r in good),
        "repeats": [{k: r.get(k) for k in ("seconds_per_step", "step_seconds", "phase_seconds_per_step", "error")}
                    for r in runs],
    })
    return merged


def parse_spec(items: list[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {"trainer": None, "G": 1, "rollouts": 8, "steps": 5, "threads": 0, "levers": "all",
                            "bf16": 0, "compile": 0, "warmup": 1, "attn": "sdpa"}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in spec:
            raise SystemExit(f"worker argument {item!r} is not one of {', '.join(f'{k}=...' for k in spec)}")
        spec[key] = value if key in ("trainer", "levers", "attn") else int(value)
    if spec["levers"] not in LEVERS:
        raise SystemExit(f"levers={spec['levers']!r} is not one of {', '.join(LEVERS)}")
    if spec["rollouts"] % spec["G"]:
        raise SystemExit(f"rollouts={spec['rollouts']} is not divisible by G={spec['G']}")
    return spec


def run_one(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """launch() with progress lines."""
    name = spec["trainer"] + (f" (levers: {spec['levers']})" if spec.get("levers", "all") != "all" else "")
    print(f"G={spec['G']} {name}: {spec.get('warmup', 1)} warm-up + {spec['steps']} steps of {spec['rollouts']} "
          "rollouts ...", flush=True)
    result = launch(spec, timeout)
    if "error" in result:
        print(f"  failed: {result['error']}\n{result.get('output_tail', '')}", flush=True)
    else:
        print(f"  {result['seconds_per_step']:.2f} s/step, peak RSS {result['peak_rss_mb']:.0f} MiB, "
              f"process {result['process_seconds']:.0f} s", flush=True)
    return result


def launch(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """One worker subprocess; its result line, or the error with the tail of its output."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *[f"{k}={v}" for k, v in spec.items()]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {**spec, "error": f"exit {proc.returncode}", "output_tail": tail}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_seconds"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------------ report


def plot(report: dict[str, Any], path: Path) -> None:
    """Seconds per step by phase: selfdistill (all levers, then each ablation) beside SDFT, one panel per G."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    phases = [("time/generation", "generation"), ("time/teacher", "teacher pass"),
              ("time/student", "student fwd+bwd")]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4.2), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows):
        runs = [("selfdistill", row["selfdistill"])]
        runs += [(f"sd: {name}", r) for name, r in row.get("ablations", {}).items()]
        runs.append(("SDFT", row["sdft"]))
        labels = []
        for x, (name, r) in enumerate(runs):
            labels.append(name.replace("no-prompt-sharing", "no prompt\nsharing").replace("sd: none", "sd: no\nlevers"))
            if "seconds_per_step" not in r:
                continue
            split = r.get("phase_seconds_per_step") or {}
            bottom = 0.0
            for (key, label), color in zip(phases, ("#4c72b0", "#dd8452", "#55a868")):
                if key in split:
                    ax.bar(x, split[key], bottom=bottom, color=color, label=label if x == 0 else None)
                    bottom += split[key]
            rest = r["seconds_per_step"] - bottom  # the optimizer step and the trainer's bookkeeping
            ax.bar(x, rest, bottom=bottom, color="#8c8c8c", label="optimizer and rest" if x == 0 else None)
            ax.text(x, r["seconds_per_step"] + 0.2, f"{r['seconds_per_step']:.1f}", ha="center", fontsize=8)
        ax.set_xticks(range(len(runs)), labels, fontsize=7, rotation=30)
        ratio = row.get("ratio")
        ax.set_title(f"G = {row['G']}" + (f": {ratio:.2f}x SDFT's steps/s" if ratio else ""), fontsize=10)
    axes[0][0].set_ylabel("seconds per optimizer step (8 rollouts)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'G':>2} {'prompts':>7} {'selfdistill s/step':>18} {'SDFT s/step':>11} {'ratio':>6} "
            f"{'sd len':>6} {'SDFT len':>8} {'sd peak RSS':>11} {'SDFT peak RSS':>13}")
    lines = [head, "-" * len(head)]
    for row in rows:
        sd, sdft = row["selfdistill"], row["sdft"]

        def cell(r, key, fmt, width):
            return f"{format(r[key], fmt):>{width}}" if key in r else f"{'error':>{width}}"

        ratio = f"{row['ratio']:>6.2f}" if row.get("ratio") else f"{'-':>6}"
        lines.append(
            f"{row['G']:>2} {row['prompts_per_step']:>7} {cell(sd, 'seconds_per_step', '.2f', 18)} "
            f"{cell(sdft, 'seconds_per_step', '.2f', 11)} {ratio} {cell(sd, 'mean_completion_length', '.1f', 6)} "
            f"{cell(sdft, 'mean_completion_length', '.1f', 8)} {cell(sd, 'peak_rss_mb', '.0f', 8)} MiB "
            f"{cell(sdft, 'peak_rss_mb', '.0f', 10)} MiB"
        )
    lines.append("ratio = selfdistill steps/s over SDFT steps/s (> 1: selfdistill is faster); len = mean completion "
                 "tokens of the measured steps")
    phase_keys = ("time/generation", "time/teacher", "time/student")
    for row in rows:
        runs = [("selfdistill", row["selfdistill"])]
        runs += [(f"sd, {name}", r) for name, r in row.get("ablations", {}).items()]
        runs.append(("SDFT", row["sdft"]))
        lines.append(f"G={row['G']} by phase (s/step: step = generation + teacher + student fwd/bwd + optimizer/rest):")
        for name, r in runs:
            if "seconds_per_step" in r:
                split = [r["phase_seconds_per_step"].get(k, float("nan")) for k in phase_keys]
                rest = r["seconds_per_step"] - sum(split)
                phases = " + ".join(f"{v:.2f}" for v in [*split, rest])
                lines.append(f"  {name:>22}: {r['seconds_per_step']:.2f} = {phases}")
    for row in rows:
        c = row.get("warmup_step_check")
        if c:
            lines.append(f"G={row['G']} warm-up step, selfdistill vs SDFT: completion length "
                         f"{c['selfdistill_completion_length']:.2f} vs {c['sdft_completion_length']:.2f}, "
                         f"token-mean KL {c['selfdistill_token_mean_kl']:.5f} vs {c['sdft_token_mean_kl']:.5f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--G", type=int, nargs="+", default=[1, 4, 8], help="num_generations values")
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per optimizer step (both trainers)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps K after the warm-up step(s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a worker may take")
    parser.add_argument("--repeats", type=int, default=1, help="run each (trainer, G) pair this many times, "
                        "alternating which goes first; a configuration's figure pools all its measured steps "
                        "(--ablate configurations run once)")
    parser.add_argument("--heap", choices=("plain", "tuned"), default="plain",
                        help="glibc's allocator in both workers: its defaults, or the launch scripts' GLIBC_TUNABLES "
                             "(freed buffers stay in the heap; docs/performance.md)")
    parser.add_argument("--bf16", action="store_true", help="both trainers with bf16=True (autocast; TRL's "
                        "default), for a CPU with AVX512-BF16/AMX; float32 without it")
    parser.add_argument("--compile", action="store_true", help="both trainers with torch_compile=True "
                        "(TrainingArguments' switch) and --warmup 3: compiling, then recompiling for dynamic shapes, "
                        "stays out of the measured steps")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="both trainers load the model "
                        "with this attn_implementation (transformers' own switch; sdpa is its default)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps before the measured ones "
                        "(default 2; 3 with --compile, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="G=1, 4 rollouts, 1 measured step, 1 thread")
    parser.add_argument("--ablate", type=int, nargs="*", default=[], metavar="G",
                        help="at these G also run selfdistill with its speed levers off, one at a time and all "
                        f"together ({', '.join(k for k in LEVERS if k != 'all')})")
    parser.add_argument("--worker", nargs="+", metavar="KEY=VALUE", help="run one configuration in this process")
    parser.add_argument("--plot-only", action="store_true", help="table and plot from the recorded results")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON (and plot) here instead")
    opts = parser.parse_args()

    if opts.plot_only:
        source = opts.out or RESULTS
        if not source.exists():
            raise SystemExit(f"no recorded results at {source}: run the benchmark first, or name a file with --out")
        report = json.loads(source.read_text())
        print(table(report["results"]))
        plot(report, source.with_suffix(".png"))
        print(f"wrote {source.with_suffix('.png')}")
        return

    if opts.worker:
        result = run_worker(parse_spec(opts.worker))
        print("RESULT " + json.dumps(result), flush=True)
        return

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if opts.quick:
        opts.G, opts.rollouts, opts.steps, opts.threads = [1], 4, 1, 1
    out_path = opts.out or (QUICK_RESULTS if opts.quick else RESULTS)
    # Two warm-up steps: the first allocates the optimizer's state and the first gradients, and the second is still
    # slower than the later ones on both sides (selfdistill's heap grows once more: ~0.5 GB of page faults, which
    # no later step repeats; docs/benchmarks.md), so the measured steps are the steady state.
    warmup = opts.warmup or (3 if opts.compile else 1 if opts.quick else 2)
    flags = {"bf16": int(opts.bf16), "compile": int(opts.compile), "warmup": warmup, "attn": opts.attn}
    bad = [g for g in opts.G if opts.rollouts % g]
    if bad:
        raise SystemExit(f"--rollouts {opts.rollouts} is not divisible by G={bad}")

    # The allocator is set where a process starts (glibc reads GLIBC_TUNABLES then): in the workers' environment.
    os.environ.pop("GLIBC_TUNABLES", None)
    if opts.heap == "tuned":
        os.environ["GLIBC_TUNABLES"] = TUNED_HEAP
    print("checking that both trainers build the same student prompts and teacher contexts ...", flush=True)
    contexts = check_contexts()
    print(f"  student prompts identical: {contexts['student_prompt_ids_identical']}, teacher contexts identical: "
          f"{contexts['teacher_context_ids_identical']}", flush=True)

    rows = []
    for g in opts.G:
        row: dict[str, Any] = {"G": g, "prompts_per_step": opts.rollouts // g}
        runs: dict[str, list[dict[str, Any]]] = {"selfdistill": [], "sdft": []}
        for r in range(opts.repeats):  # alternating order (AB BA AB ...): a drift of the machine hits both sides
            for trainer in ("selfdistill", "sdft") if r % 2 == 0 else ("sdft", "selfdistill"):
                spec = {"trainer": trainer, "G": g, "rollouts": opts.rollouts, "steps": opts.steps,
                        "threads": opts.threads, **flags}
                runs[trainer].append(run_one(spec, opts.timeout))
        for trainer, done in runs.items():
            row[trainer] = merge_repeats(done)
        if g in opts.ablate:
            row["ablations"] = {}
            for levers in (k for k in LEVERS if k != "all"):
                spec = {"trainer": "selfdistill", "G": g, "rollouts": opts.rollouts, "steps": opts.steps,
                        "threads": opts.threads, "levers": levers, **flags}
                row["ablations"][levers] = run_one(spec, opts.timeout)
        if "steps_per_second" in row["selfdistill"] and "steps_per_second" in row["sdft"]:
            row["ratio"] = row["selfdistill"]["steps_per_second"] / row["sdft"]["steps_per_second"]
            # Same weights, prompts and seed: when the first step's rollouts coincide, so must its loss.
            row["warmup_step_check"] = {
                f"{name}_{key}": row[name][src][0]  # the first warm-up step
                for name in ("selfdistill", "sdft")
                for key, src in (("completion_length", "completion_length_per_step"),
                                 ("token_mean_kl", "token_mean_kl_per_step"))
            }
        rows.append(row)

    import torch
    import transformers
    import trl

    g0 = opts.G[0]
    report = {
        "benchmark": "train_step",
        "quick": opts.quick,
        "model": MODEL,
        "device": "cpu",
        "machine": {**machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "task": f"arithmetic, 2-digit addition, train split of make_arithmetic_dataset({N_TRAIN}, {N_TEST}, seed=0)",
        "rollouts_per_step": opts.rollouts,
        "warmup_steps": warmup,
        "measured_steps": opts.steps,
        "repeats": opts.repeats,
        "torch_threads": opts.threads or "default",
        "attn_implementation": opts.attn,
        "allocator": f"GLIBC_TUNABLES={TUNED_HEAP}" if opts.heap == "tuned" else "glibc defaults",
        "timing": "wall time from the end of the last warm-up step to the end of the last step, over the measured "
                  "steps",
        "peak_rss": "getrusage(RUSAGE_SELF).ru_maxrss at the end of each configuration's own worker process",
        "ratio": "selfdistill steps/s over SDFT steps/s",
        "settings": {
            "selfdistill": {"trainer": "selfdistill.trainer.SelfDistillTrainer",
                            "privileged": f"ReferenceSolution(column='solution', template={OPSD_TEMPLATE!r})",
                            "config": selfdistill_kwargs(g0, opts.rollouts, opts.steps + warmup, "<per run>",
                                                         bf16=opts.bf16, compile_=opts.compile) | {
                                "num_generations": "G"}},
            "sdft": {"trainer": "trl.experimental.sdft.SDFTTrainer",
                     "privileged": "dataset column 'privileged_context' = the 'solution' column",
                     "config": sdft_kwargs(g0, opts.rollouts, opts.steps + warmup, "<per run>", bf16=opts.bf16,
                                           compile_=opts.compile) | {
                         "num_generations": "G"}},
        },
        "context_check": contexts,
        "differences": DIFFERENCES,
        "results": rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(table(rows))
    plot_path = out_path.with_suffix(".png")
    plot(report, plot_path)
    print(f"wrote {out_path} and {plot_path}")


if __name__ == "__main__":
    main()
