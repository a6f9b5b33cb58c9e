"""The methods side by side on the built-in task with the embedded model, at equal training rollouts.

Each run is a shipped recipe (plus overrides), run by the `selfdistill` command one after the other. Prints a
table, writes benchmarks/results/methods_arithmetic.json and docs/img/methods_arithmetic.png (held-out accuracy
against training rollouts).

    python benchmarks/compare_methods.py                      # every configuration below
    python benchmarks/compare_methods.py sdzero sdzero_no_srt # only these (results are merged)
    python benchmarks/compare_methods.py --reuse opsd=outputs/sweep/temp0.6_scale_clip_lr2e-5_len16_70steps/results.json
        # record an earlier run of the same configuration instead of running it again (marked "reused_from")
    python benchmarks/compare_methods.py --plot-only          # table and plot from the recorded results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipe_runs import ROOT, plot, run_all, table

RESULTS = ROOT / "benchmarks" / "results" / "methods_arithmetic.json"
PLOT = ROOT / "docs" / "img" / "methods_arithmetic.png"

# All runs: 70 optimizer steps x 8 rollouts = 560 training rollouts, temperature 0.6, lr 2e-5, full fine-tuning,
# reverse KL over the full vocabulary with the scale clip, frozen initial teacher; only the source differs.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "opsd": ("recipes/opsd_arithmetic.yaml", []),
    "sdzero": ("recipes/sdzero_arithmetic.yaml", []),
    "sdzero_no_srt": ("recipes/sdzero_arithmetic.yaml", ["srt.enabled=false"]),
    "avsd": ("recipes/avsd_arithmetic.yaml", []),
    "avsd_agreement": ("recipes/avsd_arithmetic.yaml", ["source.weights=agreement"]),
    "sdzero_sync10": ("recipes/sdzero_arithmetic.yaml", ["training.teacher_policy=sync",
                                                         "training.teacher_update_every=10"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"configurations to run: {', '.join(CONFIGS)}")
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME=RESULTS_JSON")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    for item in args.reuse:
        name, _, path = item.partition("=")
        if name not in CONFIGS:
            raise SystemExit(f"--reuse {item}: unknown configuration {name!r}")
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        recipe, overrides = CONFIGS[name]
        results[name] = {**json.loads(Path(path).read_text()), "name": name, "recipe": recipe,
                         "overrides": overrides, "reused_from": path}
        RESULTS.write_text(json.dumps(results, indent=1, default=str))
    if args.plot_only or (args.reuse and not args.names):
        results = json.loads(RESULTS.read_text())
        print(table(results))
    else:
        results = run_all(CONFIGS, args.names, RESULTS, ROOT / "outputs" / "methods")
    plot(results, PLOT, "Methods on SmolLM2-135M-Instruct, two-digit addition (CPU), 560 rollouts")
    print(f"wrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
