"""The methods side by side on the built-in task with the embedded model, at equal training rollouts.

Each run is a shipped recipe (plus overrides), run by the `selfdistill` command one after the other. Prints a
table, writes benchmarks/results/methods_arithmetic.json and docs/img/methods_arithmetic.png (held-out accuracy
against training rollouts).

    python benchmarks/compare_methods.py                      # every configuration below
    python benchmarks/compare_methods.py sdzero sdzero_no_srt # only these (results are merged)
"""

from __future__ import annotations

import sys

from recipe_runs import ROOT, plot, run_all

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
    results = run_all(CONFIGS, sys.argv[1:], RESULTS, ROOT / "outputs" / "methods")
    plot(results, PLOT, "Methods on SmolLM2-135M-Instruct, two-digit addition (CPU), 560 rollouts")
    print(f"wrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
