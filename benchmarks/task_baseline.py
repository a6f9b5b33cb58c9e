"""Greedy accuracy of the embedded model on the arithmetic task, with and without privileged information.

For each candidate plain-prompt wording, the model answers ``--n`` test problems (a) from the plain
prompt and (b) from the same prompt with the reference solution appended (``with_reference_solution``),
as a teacher with privileged information would see it. Decoding: chat template with
``add_generation_prompt``, left-padded batched ``generate``, greedy, ``--max-new-tokens`` (32).

Usage::

    python benchmarks/task_baseline.py [--n 200] [--batch-size 50] [--max-new-tokens 32]

Prints a table and writes ``benchmarks/results/task_baseline.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

# Allow running from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.embedded import embedded_model_path
from selfdistill.tasks.arithmetic import (
    DEFAULT_PROMPT_TEMPLATE,
    arithmetic_reward,
    make_arithmetic_dataset,
    with_reference_solution,
)

WORDINGS: dict[str, str] = {
    "plain": "What is {question}?",
    "just_number": "What is {question}? Answer with just the number.",
    "one_line": "What is {question}? Answer in one line.",
    "short_sentence": "Calculate {question}. Give the result in one short sentence.",
}

RESULTS = Path(__file__).resolve().parent / "results" / "task_baseline.json"


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[list[dict]], batch_size: int, max_new_tokens: int
) -> dict:
    """Greedy completions for conversational prompts; returns texts and token statistics."""
    texts: list[str] = []
    lengths: list[int] = []
    finished: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rendered = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chunk
        ]
        batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        for row in new:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                n = ids.index(tokenizer.eos_token_id)
                finished.append(True)
            else:
                n = len(ids)
                finished.append(False)
            lengths.append(n)
            texts.append(tokenizer.decode(ids[:n], skip_special_tokens=True))
    return {"texts": texts, "lengths": lengths, "finished": finished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of test problems")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.manual_seed(0)
    path = embedded_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()

    rows: list[dict] = []
    for name, template in WORDINGS.items():
        test = make_arithmetic_dataset(0, args.n, seed=args.seed, prompt_template=template)["test"]
        prompts = list(test["prompt"])
        variants = {
            "plain": prompts,
            "with_pi": [with_reference_solution(p, s) for p, s in zip(prompts, test["solution"])],
        }
        for variant, batch_prompts in variants.items():
            t0 = time.perf_counter()
            gen = generate(model, tokenizer, batch_prompts, args.batch_size, args.max_new_tokens)
            seconds = time.perf_counter() - t0
            rewards = arithmetic_reward(batch_prompts, gen["texts"], list(test["answer"]))
            row = {
                "wording": name,
                "template": template,
                "variant": variant,
                "accuracy": sum(rewards) / len(rewards),
                "mean_new_tokens": sum(gen["lengths"]) / len(gen["lengths"]),
                "finished_frac": sum(gen["finished"]) / len(gen["finished"]),
                "seconds": round(seconds, 1),
                "examples": [
                    {"prompt": p[-1]["content"], "completion": c, "answer": a, "reward": r}
                    for p, c, a, r in list(zip(batch_prompts, gen["texts"], test["answer"], rewards))[:5]
                ],
            }
            rows.append(row)
            print(
                f"{name:<16} {variant:<8} acc={row['accuracy']:.3f} new_tokens={row['mean_new_tokens']:.1f} "
                f"finished={row['finished_frac']:.2f} ({seconds:.0f} s)",
                flush=True,
            )

    print()
    print(f"{'wording':<16} {'plain acc':>10} {'with PI acc':>12} {'plain tokens':>13} {'PI tokens':>10}")
    for name, template in WORDINGS.items():
        plain = next(r for r in rows if r["wording"] == name and r["variant"] == "plain")
        pi = next(r for r in rows if r["wording"] == name and r["variant"] == "with_pi")
        marker = "  (default)" if template == DEFAULT_PROMPT_TEMPLATE else ""
        print(
            f"{name:<16} {plain['accuracy']:>10.3f} {pi['accuracy']:>12.3f} "
            f"{plain['mean_new_tokens']:>13.1f} {pi['mean_new_tokens']:>10.1f}{marker}"
        )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": "smollm2-135m-instruct",
        "n_test": args.n,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
        "default_template": DEFAULT_PROMPT_TEMPLATE,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "results": rows,
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
