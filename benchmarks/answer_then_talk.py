"""On open addition, did a trained model learn the sum, or to stop after it, or both?

The verifier reads the last number of a completion. Training cuts rollouts at ``max_completion_length`` (16 tokens
in the main job's recipes) and the held-out evaluation at ``eval.max_new_tokens`` (32). A policy-gradient run whose
rollouts all reach the cap is rewarded whenever the cut falls right after the right sum ("The result of 77 + 13 =
90, which is the sum of" ends on 90 at 16 tokens), and is then scored 0 held out, where the same reply goes on to
"... the sum of 77 and 13". For each saved model this replays the held-out evaluation (greedy, the recipe's eval
settings) and reports, beside the verifier's accuracy:

- ``ended``: the share of replies that end (an end-of-sequence token) within the evaluation's limit;
- ``accuracy_at_training_cap``: the verifier on the same replies cut to the training limit's tokens, what training
  rewarded;
- ``sum_after_equals``: the share whose first number after an ``=`` is the right sum (the model wrote the sum, and
  whatever it wrote after).

    python benchmarks/answer_then_talk.py outputs/hybrids/*/final        # saved models
    python benchmarks/answer_then_talk.py --base                          # the embedded base model

Writes benchmarks/results/answer_then_talk.json (one entry per model path; rerunning a path replaces its entry).
"""

from __future__ import annotations

import json
import re
import sys

from recipe_runs import ROOT, greedy_texts, machine, saved_model_args

sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "answer_then_talk.json"
RECIPE = "recipes/rlsd_arithmetic.yaml"  # the main job's task and held-out problems
_AFTER_EQUALS = re.compile(r"=\s*(-?\d[\d,]*)")


def measure(path: str, rows: list[dict], max_new_tokens: int, cap: int, batch_size: int) -> dict:
    from selfdistill.modeling import load_tokenizer
    from selfdistill.tasks.arithmetic import arithmetic_reward

    texts, cut = greedy_texts(path, rows, max_new_tokens, batch_size)
    tokenizer = load_tokenizer(path)
    at_cap = [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:cap]) for t in texts]
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    right = arithmetic_reward(prompts, texts, answers)
    right_at_cap = arithmetic_reward(prompts, at_cap, answers)
    firsts = [_AFTER_EQUALS.search(t) for t in texts]
    sums = [m is not None and m.group(1).replace(",", "") == str(a).strip() for m, a in zip(firsts, answers)]
    n = max(len(rows), 1)
    return {
        "n": len(rows), "accuracy": sum(x >= 0.5 for x in right) / n,
        "accuracy_at_training_cap": sum(x >= 0.5 for x in right_at_cap) / n,
        "ended": sum(not c for c in cut) / n, "sum_after_equals": sum(sums) / n,
        "examples": [{"completion": t, "correct": c >= 0.5} for t, c in zip(texts[:4], right[:4])],
    }


def main() -> None:
    args, paths, recipe, rows, results = saved_model_args(__doc__, RESULTS, "outputs/hybrids/grpo@s0/final", RECIPE)
    cap = int(recipe.training["max_completion_length"])
    for path in paths:
        r = measure(path, rows, recipe.eval.max_new_tokens, cap, recipe.eval.batch_size)
        results[path] = {**r, "recipe": RECIPE, "training_cap": cap, "eval_max_new_tokens": recipe.eval.max_new_tokens,
                         "cpu": machine().get("cpu")}
        print(f"{path}: accuracy {r['accuracy']:.1%} ({recipe.eval.max_new_tokens} tokens), "
              f"{r['accuracy_at_training_cap']:.1%} cut to {cap}; ended {r['ended']:.0%}; right sum after '=' "
              f"{r['sum_after_equals']:.1%}", flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
