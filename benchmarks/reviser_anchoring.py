"""Why SD-Zero's reviser does not correct itself here: does it repeat the wrong number its own answer wrote?

SD-Zero's teacher reads the task, the student's answer y, a cue with the verifier's verdict ("Wait, this response
is wrong. Let me correct it.") and then writes again. `selfdistill diagnose` measures how often a wrong answer
comes out right (the `revision` premise). This splits that rate by what the wrong answer held: a final number or
none, and counts the revisions that end on the same wrong number (anchored). Rows of a recipe's training split;
the student's answers and the revisions are sampled as the recipe trains (its temperature and
max_completion_length), the contexts built by the recipe's own Reviser source.

    python benchmarks/reviser_anchoring.py recipes/sdzero_arithmetic.yaml recipes/sdzero_choice.yaml
    python benchmarks/reviser_anchoring.py --name switch_cue recipes/sdzero_choice.yaml \\
        'source.cues={"wrong": "\\n\\nWait, this response is wrong, so the answer is the other option. ..."}'
    (the full cue is SWITCH_CUE in benchmarks/premises.py)

Writes benchmarks/results/reviser_anchoring.json (one entry per recipe and name; a rerun replaces its entry).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from recipe_runs import ROOT, machine

sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "reviser_anchoring.json"


def measure(recipe_path: str, overrides: list[str], prompts: int, samples: int) -> dict:
    import torch

    from selfdistill.data import load_splits
    from selfdistill.methods.sdzero.source import Reviser
    from selfdistill.modeling import load_model, load_tokenizer
    from selfdistill.recipes import build_source, load_recipe
    from selfdistill.rollout import eos_ids, sample_completions
    from selfdistill.sequences import continuation_ids, render_context
    from selfdistill.sources.base import Rollout
    from selfdistill.tasks.arithmetic import arithmetic_reward, extract_final_integer

    recipe = load_recipe(recipe_path, overrides)
    reviser = build_source(recipe.source)
    if not isinstance(reviser, Reviser):
        raise SystemExit(f"{recipe_path}: the source is {type(reviser).__name__}, not SD-Zero's reviser")
    train, _ = load_splits(recipe.data)
    if "answer" not in train.column_names:
        raise SystemExit(f"{recipe_path}: its rows have no 'answer' column; this benchmark reads numeric answers "
                         "(data.task: arithmetic)")
    rows = [row for row in train.select(range(min(prompts, len(train)))).to_list() for _ in range(samples)]
    torch.manual_seed(recipe.training.get("seed", 0))
    model, tokenizer = load_model(recipe.model), load_tokenizer(recipe.model)
    model.eval()
    eos, pad = eos_ids(model, tokenizer), tokenizer.pad_token_id
    limit, temperature = recipe.training["max_completion_length"], recipe.training.get("temperature", 1.0)

    def score(texts: list[str]) -> list[float]:
        extra = {"options": [r["options"] for r in rows]} if "options" in rows[0] else {}
        return arithmetic_reward([r["prompt"] for r in rows], texts, [r["answer"] for r in rows], **extra)

    contexts = [render_context(tokenizer, r["prompt"]) for r in rows]
    with torch.no_grad():
        first = sample_completions(model, contexts, pad_id=pad, eos=eos, max_new_tokens=limit,
                                   temperature=temperature)
        answers = tokenizer.batch_decode(first.completion_ids, skip_special_tokens=True)
        rewards = score(answers)
        revise = []
        for row, context, ids, cut, reward in zip(rows, contexts, first.completion_ids, first.truncated, rewards):
            rollout = Rollout(row=row, prompt=row["prompt"], completion="", completion_ids=ids, reward=reward,
                              finished=not cut)
            revise.append(context + continuation_ids(tokenizer, [reviser.first_copy(rollout),
                                                                 reviser.cues[reviser.verdict(reward)]]))
        second = sample_completions(model, revise, pad_id=pad, eos=eos, max_new_tokens=limit,
                                    temperature=temperature)
    revisions = tokenizer.batch_decode(second.completion_ids, skip_special_tokens=True)
    revised = score(revisions)

    def share(xs: list[bool]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    wrong = [i for i, r in enumerate(rewards) if r < reviser.threshold]
    with_number = [i for i in wrong if extract_final_integer(answers[i]) is not None]
    without = [i for i in wrong if extract_final_integer(answers[i]) is None]
    right = [i for i, r in enumerate(rewards) if r >= reviser.threshold]
    return {
        "rollouts": len(rows),
        "student_reward": share([r >= reviser.threshold for r in rewards]),
        "wrong": len(wrong),
        "wrong_to_right": share([revised[i] >= reviser.threshold for i in wrong]),
        "right_kept_right": share([revised[i] >= reviser.threshold for i in right]),
        "wrong_with_a_number": len(with_number),
        "wrong_with_a_number_to_right": share([revised[i] >= reviser.threshold for i in with_number]),
        "anchored": share([extract_final_integer(revisions[i]) == extract_final_integer(answers[i])
                           for i in with_number]),
        "wrong_without_a_number": len(without),
        "wrong_without_a_number_to_right": share([revised[i] >= reviser.threshold for i in without]),
        "examples": [{"answer": answers[i], "revision": revisions[i], "right_after": revised[i] >= 0.5}
                     for i in wrong[:6]],
    }


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="+", help="SD-Zero recipes; with --name, one recipe and then overrides")
    parser.add_argument("--name", help="record a single recipe with the overrides that follow it under this name")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [(args.recipes[0], args.recipes[1:], args.name)] if args.name else [(r, [], "recipe") for r in args.recipes]
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    for recipe, overrides, name in runs:
        if not Path(recipe).is_file():
            raise SystemExit(f"{recipe}: no such recipe file")
        start = time.perf_counter()
        r = measure(recipe, overrides, args.prompts, args.samples)
        key = f"{Path(recipe).name}:{name}"
        results[key] = {**r, "overrides": overrides, "seconds": round(time.perf_counter() - start, 1),
                        "cpu": machine().get("cpu")}
        print(f"{key}: student {pct(r['student_reward'])}; wrong -> right {pct(r['wrong_to_right'])} of {r['wrong']}"
              f" (with a number {pct(r['wrong_with_a_number_to_right'])} of {r['wrong_with_a_number']}, anchored "
              f"{pct(r['anchored'])}; without {pct(r['wrong_without_a_number_to_right'])} of "
              f"{r['wrong_without_a_number']}); right kept {pct(r['right_kept_right'])}", flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
