"""Loss kernel: time and peak memory of each loss variant, dense logits vs fused-with-the-head, side by side.

Every case runs forward + backward of one loss over N completion tokens, from hidden states ``[N, H]`` and an
output head ``[V, H]`` (student and teacher heads distinct, as with a frozen teacher):

    dense   logits = h @ W.T for student and teacher, then selfdistill.losses.token_losses (the reference path)
    fused   selfdistill.fused.fused_token_losses (token chunks fused with the head; no [N, V] tensor in full)
    trl     TRL's SDFT loss functions (trl.experimental.sdft.loss_utils) on dense logits, as a reference point

Each case runs in its own process, so its peak resident memory is its own: ``peak`` is the process's maximum RSS
during the loss minus its RSS just before (inputs already allocated). Cases that would not fit in memory or the
time budget on this machine are recorded as skipped with the estimate, never silently dropped.

    python benchmarks/loss_kernel.py                    # CPU grid: what fits on this machine
    python benchmarks/loss_kernel.py --grid variants    # every other variant at 4k tokens
    python benchmarks/loss_kernel.py --grid full        # the whole grid (1k/4k/16k x 49,152/151,936 x 576/2048)
    python benchmarks/loss_kernel.py --device cuda      # on a GPU (peak from torch.cuda.max_memory_allocated)

Writes benchmarks/results/loss_kernel.json and prints a table with fused/dense ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "loss_kernel.json"

VARIANTS = {
    "reverse_kl/full/scale": dict(divergence="reverse_kl", support="full", clip="scale", clip_tau=1.0),
    "forward_kl/full/entry": dict(divergence="forward_kl", support="full", clip="entry", clip_tau=0.05),
    "jsd0.5/full/none": dict(divergence="jsd", jsd_beta=0.5, support="full", clip="none"),
    "reverse_kl/top64/tail": dict(divergence="reverse_kl", support="topk", top_k=64, topk_from="student",
                                  tail_bucket=True, clip="none"),
    "reverse_kl/sampled/scale": dict(divergence="reverse_kl", support="sampled", clip="scale", clip_tau=1.0),
}
# TRL reference functions for the variants they implement.
TRL_VARIANTS = {"reverse_kl/full/scale": "full", "reverse_kl/top64/tail": "topk", "reverse_kl/sampled/scale": "sampled"}

GRIDS = {
    # What this CPU machine can run in minutes: the main variant over the token axis at the embedded model's sizes,
    # every variant at 1k tokens, and the large vocabulary / hidden size at 1k tokens.
    "cpu": [(n, 49152, 576, v) for n in (1024, 4096, 16384) for v in ("reverse_kl/full/scale",)]
    + [(1024, 49152, 576, v) for v in VARIANTS if v != "reverse_kl/full/scale"]
    + [(1024, 151936, 2048, "reverse_kl/full/scale"), (4096, 151936, 576, "reverse_kl/full/scale")],
    # Every variant where chunking matters (4k tokens: dense still fits in memory here).
    "variants": [(4096, 49152, 576, v) for v in VARIANTS if v != "reverse_kl/full/scale"],
    "full": [(n, v, h, var) for n, v, h, var in itertools.product((1024, 4096, 16384), (49152, 151936), (576, 2048),
                                                                   VARIANTS)],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(case: dict) -> dict:
    """One case in this process: returns seconds (median of repeats) and peak bytes above the inputs."""
    import torch

    from selfdistill.fused import fused_token_losses
    from selfdistill.losses import LossSpec, token_losses

    torch.manual_seed(0)
    device = torch.device(case["device"])
    n, v, h = case["n"], case["v"], case["h"]
    spec = LossSpec(**VARIANTS[case["variant"]])
    hidden = (torch.randn(n, h, device=device) * 0.5).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h**0.5).requires_grad_()
    teacher_hidden = hidden.detach() + 0.1 * torch.randn(n, h, device=device)
    teacher_weight = weight.detach() + 0.01 * torch.randn(v, h, device=device)
    tokens = torch.randint(0, v, (n,), device=device)

    def step():
        if case["path"] == "fused":
            loss = fused_token_losses(hidden, weight, teacher_hidden, teacher_weight, tokens, spec,
                                      chunk_size=case["chunk"]).loss.sum() / n
        elif case["path"] == "dense":
            loss = token_losses(hidden @ weight.T, teacher_hidden @ teacher_weight.T, tokens, spec).loss.sum() / n
        else:
            from trl.experimental.sdft import loss_utils

            s, t = hidden @ weight.T, teacher_hidden @ teacher_weight.T
            kind = TRL_VARIANTS[case["variant"]]
            if kind == "full":
                per = loss_utils.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=1.0)
            elif kind == "topk":
                per = loss_utils.compute_topk_self_distillation_loss(s, t, distillation_topk=64, distillation_alpha=1.0,
                                                                     distillation_add_tail=True)
            else:
                per = loss_utils.compute_sampled_token_self_distillation_loss(s[None], t[None], tokens[None],
                                                                              distillation_alpha=1.0)
            loss = per.sum() / n
        loss.backward()
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    return {**case, "seconds": round(times[len(times) // 2], 4), "peak_bytes": int(max(peak, 0))}


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 0


def _gflops() -> float:
    """Measured float32 matmul throughput of this machine (for time estimates of skipped cases)."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def estimate(case: dict) -> tuple[float, float]:
    """(bytes, flops): dense holds about 8 float32 [N, V] tensors; fused one chunk's; both do 4 head matmuls."""
    n, v, h = case["n"], case["v"], case["h"]
    flops = 4 * 2 * n * v * h
    if case["path"] == "fused":
        return 10 * min(case["chunk"], n) * v * 4 + 3 * v * h * 4, flops
    return 8 * n * v * 4, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=list(GRIDS), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=1024, help="fused loss chunk size (tokens)")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="skip cases estimated to take longer")
    parser.add_argument("--paths", nargs="+", default=["dense", "fused", "trl"], help="which paths to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    gflops = _gflops() if args.device == "cpu" else None
    budget = _available_bytes() * 0.8 if args.device == "cpu" else None
    rows = []
    for n, v, h, variant in GRIDS[args.grid]:
        paths = ["dense", "fused"] + (["trl"] if variant in TRL_VARIANTS else [])
        for path in [p for p in paths if p in args.paths]:
            case = dict(n=n, v=v, h=h, variant=variant, path=path, chunk=args.chunk, device=args.device,
                        repeats=3 if n * v * h < 1e11 else 1)
            need, flops = estimate(case)
            seconds = flops / (gflops * 1e9) * case["repeats"] if gflops else 0.0
            if budget and need > budget:
                rows.append({**case, "skipped": f"needs ~{need / 2**30:.0f} GiB, {budget / 2**30:.0f} GiB available"})
            elif seconds > args.max_seconds:
                rows.append({**case, "skipped": f"~{seconds:.0f} s estimated at {gflops:.0f} GFLOP/s"})
            else:
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True,
                                      text=True, env=env, cwd=ROOT)
                if done.returncode:
                    rows.append({**case, "skipped": f"exit {done.returncode}: {done.stderr.strip()[-200:]}"})
                else:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(_line(rows[-1]), flush=True)
    # Merge with earlier runs (another grid, another device): a case measured again replaces its old row.
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "gflops_measured": gflops, "chunk": args.chunk, "torch_threads": os.cpu_count()}
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": [], "rows": []}
    key = ("n", "v", "h", "variant", "path", "device", "chunk")
    fresh = {tuple(r[k] for k in key) for r in rows}
    rows = [r for r in old.get("rows", []) if tuple(r.get(k) for k in key) not in fresh] + rows
    runs = old.get("runs", [old["meta"]] if "meta" in old else []) + [{**meta, "grid": args.grid}]
    RESULTS.write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))
    print()
    print(table(rows))
    print(f"wrote {RESULTS}")


def _line(row: dict) -> str:
    head = f"N={row['n']:>5} V={row['v']:>6} H={row['h']:>4} {row['variant']:<26} {row['path']:<5}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    return f"{head} {row['seconds']:>8.3f} s  peak {row['peak_bytes'] / 2**20:>8.0f} MiB"


def table(rows: list[dict]) -> str:
    """One line per case: dense, fused and TRL side by side, with the fused/dense ratios."""
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault((row["n"], row["v"], row["h"], row["variant"]), {})[row["path"]] = row

    def cell(row: dict | None) -> str:
        if row is None:
            return f"{'-':>18}"
        if "skipped" in row:
            return f"{'skipped':>18}"
        return f"{row['seconds']:>7.2f}s {row['peak_bytes'] / 2**20:>7.0f}M"

    head = (f"{'N':>6} {'V':>7} {'H':>5} {'variant':<26} {'dense':>18} {'fused':>18} {'trl':>18} "
            f"{'time f/d':>8} {'mem f/d':>8}")
    lines = [head, "-" * len(head)]
    for (n, v, h, variant), paths in cases.items():
        dense, fused = paths.get("dense"), paths.get("fused")
        ratio_t = ratio_m = "-"
        if dense and fused and "skipped" not in dense and "skipped" not in fused:
            ratio_t = f"{fused['seconds'] / dense['seconds']:.2f}"
            ratio_m = f"{fused['peak_bytes'] / max(dense['peak_bytes'], 1):.3f}"
        lines.append(f"{n:>6} {v:>7} {h:>5} {variant:<26} {cell(dense)} {cell(fused)} {cell(paths.get('trl'))} "
                     f"{ratio_t:>8} {ratio_m:>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
