"""`selfdistill diagnose` on every shipped recipe: its wall time (the budget is 3 minutes on a 2-core CPU) and its
verdicts, one recipe after the other, each in its own process.

Writes benchmarks/results/diagnose.json: per recipe the wall seconds of the whole command (model load included), the
CPU, the top-level figures of diagnosis.json and the verdict per premise.

    python benchmarks/diagnose_recipes.py                                  # every shipped recipe
    python benchmarks/diagnose_recipes.py recipes/sdzero_choice.yaml       # some only (results are merged)

An SD-Zero recipe diagnosed a second time loads the self-revision stage the first run kept: its entry then keeps the
cold run's figures under ``cold`` (the budget judges the cold run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipe_runs import ROOT, diagnose_recipe, machine

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
        print(f"diagnosing {recipe.name} ...", flush=True)
        entry = diagnose_recipe(recipe, EXTRA.get(recipe.name, []), args.out_root / recipe.stem)
        seconds = entry["wall_seconds"]
        # a run that did not reach its end has no time to judge
        entry.update(within_budget=None if "error" in entry else seconds <= BUDGET_S, cpu=info.get("cpu"))
        # SD-Zero: the self-revision stage diagnose runs first is phase 1 of training (kept for `selfdistill train`);
        # its share of the wall time is recorded beside the whole command's, which is what the budget judges.
        srt = entry.get("srt") or {}
        stage = None if srt.get("reused_from") else (srt.get("sample_seconds") or 0) + (srt.get("sft_seconds") or 0)
        if stage:
            entry.update(srt_stage_seconds=round(stage, 1), seconds_without_srt_stage=round(seconds - stage, 1))
        previous = results.get(recipe.name) or {}
        if srt.get("reused_from") and "error" not in entry:
            # A second diagnose that loaded the kept stage: keep the cold run's time, which is what the budget judges.
            cold = previous.get("cold") or (previous if previous.get("srt_stage_seconds") else None)
            if cold:
                entry["cold"] = {k: cold.get(k) for k in ("wall_seconds", "srt_stage_seconds",
                                                         "seconds_without_srt_stage", "within_budget", "verdicts")}
                entry.update(within_budget_warm=entry["within_budget"], within_budget=cold.get("within_budget"))
        print(entry.pop("table", ""), flush=True)
        results[recipe.name] = entry
        RESULTS.write_text(json.dumps(results, indent=1))
        split = f", of which {stage:.0f} s the self-revision stage" if stage else ""
        if "error" in entry:  # e.g. a GPU recipe whose model is not on this machine: no time to judge
            print(f"{recipe.name}: did not run to its end ({seconds:.0f} s): {entry['error']}", flush=True)
            continue
        print(f"{recipe.name}: {seconds:.0f} s{split}{'' if entry['within_budget'] else ' (over the 3-minute budget)'}",
              flush=True)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
