"""`selfdistill diagnose` on every shipped recipe: its wall time (the budget is 3 minutes on a 2-core CPU) and its
verdicts, one recipe after the other, each in its own process.

Writes benchmarks/results/diagnose.json: per recipe the wall seconds of the whole command (model load included), the
CPU, the top-level figures of diagnosis.json and the verdict per premise.

    python benchmarks/diagnose_recipes.py                                  # every shipped recipe
    python benchmarks/diagnose_recipes.py recipes/sdzero_choice.yaml       # some only (results are merged)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from recipe_runs import ROOT, machine

RESULTS = ROOT / "benchmarks" / "results" / "diagnose.json"
BUDGET_S = 180.0

# Recipes whose premise needs something the recipe file does not carry: Skill-SD measures a bank, so the seeded
# strategy of benchmarks/premises.py is given (an empty bank's verdict would be "unknown").
EXTRA = {
    "skillsd_guess_number.yaml": [
        'source.seed_skills=["Guess 4 first. If I say higher, guess 6; if I say lower, guess 2. Then guess the middle '
        'of the numbers still possible. Reply with one number only."]', "source.summaries_per_step=0",
        "source.top_k=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe files (default: every recipes/*.yaml)")
    parser.add_argument("--out-root", type=Path, default=ROOT / "outputs" / "diagnose")
    args = parser.parse_args()
    recipes = [Path(r) for r in args.recipes] or sorted((ROOT / "recipes").glob("*.yaml"))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    info = machine()
    for recipe in recipes:
        out = args.out_root / recipe.stem
        cmd = [sys.executable, "-m", "selfdistill", "diagnose", str(recipe), f"training.output_dir={out}",
               *EXTRA.get(recipe.name, []), "--no-progress"]
        print(f"diagnosing {recipe.name} ...", flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        entry: dict = {"wall_seconds": round(seconds, 1), "within_budget": seconds <= BUDGET_S, "cpu": info.get("cpu"),
                       "overrides": EXTRA.get(recipe.name, [])}
        if done.returncode:
            entry["within_budget"] = None  # it did not run to the end: no time to judge
            entry["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        else:
            report = json.loads((out / "diagnosis.json").read_text())
            entry.update({k: report.get(k) for k in ("method", "student_reward", "student_reward_greedy",
                                                     "teacher_reward", "teacher_view", "revision", "skills")})
            entry["reverse_kl"] = report["signal"].get("reverse_kl")
            entry["verdicts"] = {v["premise"]: v["verdict"] for v in report["verdicts"]}
            print(done.stdout.strip().split("wrote")[0], flush=True)
        results[recipe.name] = entry
        RESULTS.write_text(json.dumps(results, indent=1))
        print(f"{recipe.name}: {seconds:.0f} s{'' if entry['within_budget'] else ' (over the 3-minute budget)'}",
              flush=True)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
