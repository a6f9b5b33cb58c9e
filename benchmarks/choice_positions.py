"""On two-option addition, does a trained model add, or pick an option by its place in the prompt?

Two options make a positional rule score well: on the 200 held-out rows of `recipes/sdzero_choice.yaml` the right
option is printed last on 112 (56%), so "always the last option" scores 56% without adding anything. For each saved
model this replays the held-out evaluation (greedy, the recipe's eval settings) and splits it by where the right
option stands: a model that adds is right as often when it is first as when it is last; a positional rule is right
on one side only. Also counts which option each answer names (first, last, both, neither).

    python benchmarks/choice_positions.py outputs/premises/choice_*/*/final          # saved models
    python benchmarks/choice_positions.py --base outputs/premises/choice_sdzero/grpo@s1/final   # plus the base model

Writes benchmarks/results/choice_positions.json (one entry per model path; rerunning a path replaces its entry).
"""

from __future__ import annotations

import json
import sys

from recipe_runs import ROOT, greedy_texts, machine, saved_model_args

sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "choice_positions.json"
RECIPE = "recipes/sdzero_choice.yaml"


def measure(path: str, rows: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    from selfdistill.tasks.arithmetic import arithmetic_reward, named_options, option_values

    texts, _ = greedy_texts(path, rows, max_new_tokens, batch_size)
    right = arithmetic_reward([r["prompt"] for r in rows], texts, [r["answer"] for r in rows],
                              options=[r["options"] for r in rows])
    order = [option_values(r["options"]) for r in rows]
    last = [values[-1] == int(r["answer"]) for values, r in zip(order, rows)]
    # which printed option(s) each answer names: "first", "last"
    names = [{("first", "last")[values.index(v)] for v in named_options(t, r["options"], r["prompt"])}
             for t, r, values in zip(texts, rows, order)]

    def share(xs: list[bool]) -> float:
        return sum(xs) / max(len(xs), 1)

    return {
        "accuracy": share([x >= 0.5 for x in right]),
        "accuracy_right_first": share([x >= 0.5 for x, lst in zip(right, last) if not lst]),
        "accuracy_right_last": share([x >= 0.5 for x, lst in zip(right, last) if lst]),
        "rows_right_first": sum(not x for x in last), "rows_right_last": sum(last),
        "names_first_only": share([n == {"first"} for n in names]),
        "names_last_only": share([n == {"last"} for n in names]),
        "names_both": share([n == {"first", "last"} for n in names]),
        "names_neither": share([not n for n in names]),
        "examples": [{"completion": t, "correct": c >= 0.5} for t, c in zip(texts[:4], right[:4])],
    }


def main() -> None:
    args, paths, recipe, rows, results = saved_model_args(
        __doc__, RESULTS, "outputs/premises/choice_sdzero/sdzero@s0/final", RECIPE)
    for path in paths:
        r = measure(path, rows, recipe.eval.max_new_tokens, recipe.eval.batch_size)
        results[path] = {**r, "recipe": RECIPE, "cpu": machine().get("cpu")}
        print(f"{path}: accuracy {r['accuracy']:.1%}; right option first {r['accuracy_right_first']:.1%} of "
              f"{r['rows_right_first']}, last {r['accuracy_right_last']:.1%} of {r['rows_right_last']}; names first "
              f"only {r['names_first_only']:.0%}, last only {r['names_last_only']:.0%}, both {r['names_both']:.0%}, "
              f"neither {r['names_neither']:.0%}", flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
