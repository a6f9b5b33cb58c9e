"""Sweep the levers of the main job (OPSD on the embedded model) and record every run side by side.

Each configuration is `recipes/opsd_arithmetic.yaml` plus overrides, run by the `selfdistill` command one after
the other (never two at once: two processes on two cores slow each other down several-fold). Prints a table,
writes benchmarks/results/main_job_sweep.json and a plot of all learning curves.

    python benchmarks/sweep_main_job.py                 # every configuration below
    python benchmarks/sweep_main_job.py lora_lr3e-4     # only the named ones (results are merged)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "main_job_sweep.json"
PLOT = ROOT / "docs" / "img" / "main_job_sweep.png"
LORA = "peft={r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}"

# Every configuration spells out the levers it moves away from the plain loop of DESIGN.md (full fine-tuning,
# lr 1e-5, batch 8, one rollout per prompt, 24 new tokens, reverse KL over the full vocabulary, frozen initial
# teacher), so the table stays meaningful when the recipe's defaults change.
T1 = "training.temperature=1.0"
T06 = "training.temperature=0.6"
CONFIGS: dict[str, list[str]] = {
    "default": [T1, "training.clip=token", "training.max_steps=50"],  # recipe at the start: T=1, hard cap tau=1
    "no_clip": [T1, "training.clip=none", "training.max_steps=50"],
    "temp0.6_no_clip": [T06, "training.clip=none", "training.max_steps=50"],
    "temp0.6_token_cap": [T06, "training.clip=token", "training.max_steps=50"],
    "temp0.6_scale_clip": [T06, "training.clip=scale", "training.max_steps=50"],
    "temp0.6_scale_clip_lora_r16_lr5e-4_70steps": [T06, "training.clip=scale", LORA, "training.learning_rate=5e-4",
                                                    "training.max_steps=70"],
    "temp0.6_scale_clip_lr2e-5_60steps": [T06, "training.clip=scale", "training.learning_rate=2e-5",
                                          "training.max_steps=60"],
    "temp0.6_scale_clip_lr2e-5_len16_70steps": [T06, "training.clip=scale", "training.learning_rate=2e-5",
                                                "training.max_completion_length=16", "training.max_steps=70"],
    "temp0.4_scale_clip_lr2e-5_len16_70steps": ["training.temperature=0.4", "training.clip=scale",
                                                "training.learning_rate=2e-5", "training.max_completion_length=16",
                                                "training.max_steps=70"],
    "temp0.6_entry_clip_0.05": [T06, "training.clip=entry", "training.clip_tau=0.05", "training.max_steps=50"],
    "temp0.6_sampled_token": [T06, "training.support=sampled", "training.clip=scale", "training.max_steps=50"],
}


def run(name: str, overrides: list[str]) -> dict:
    out = ROOT / "outputs" / "sweep" / name
    cmd = [sys.executable, "-m", "selfdistill", "train", str(ROOT / "recipes" / "opsd_arithmetic.yaml"),
           f"training.output_dir={out}", *overrides]
    start = time.perf_counter()
    log = out.parent / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        return {"name": name, "overrides": overrides, "error": f"exit {code}, see {log}"}
    result = json.loads((out / "results.json").read_text())
    result.update(name=name, overrides=overrides, process_seconds=round(time.perf_counter() - start, 1))
    return result


def table(results: dict[str, dict]) -> str:
    head = f"{'config':34} {'steps':>5} {'train s':>8} {'s/step':>6} {'before':>7} {'after':>7} {'best curve':>10}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:34} {r['error']}")
            continue
        curve = max((p["greedy_accuracy"] for p in r["learning_curve"]), default=float("nan"))
        lines.append(
            f"{name:34} {r['steps']:>5} {r['train_seconds']:>8.0f} {r['train_seconds'] / r['steps']:>6.1f} "
            f"{r['eval_before']['greedy_accuracy']:>7.1%} {r['eval_after']['greedy_accuracy']:>7.1%} {curve:>10.1%}"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, r in results.items():
        if r.get("learning_curve"):
            pts = r["learning_curve"]
            ax.plot([p["rollouts"] for p in pts], [100 * p["greedy_accuracy"] for p in pts], marker="o", label=name)
    ax.axhline(80, color="grey", ls="--", lw=1)
    ax.set_xlabel("training rollouts")
    ax.set_ylabel("held-out greedy accuracy (%, 100 problems)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("OPSD on SmolLM2-135M-Instruct, two-digit addition (CPU)")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT)


def main() -> None:
    names = sys.argv[1:] or list(CONFIGS)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in names:
        print(f"running {name} ...", flush=True)
        results[name] = run(name, CONFIGS[name])
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, default=str))
        print(table({name: results[name]}), flush=True)
    print(table(results))
    plot(results)
    print(f"wrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
