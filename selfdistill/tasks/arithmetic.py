"""Built-in task: seeded integer arithmetic problems with a verifiable answer.

Each row carries

* ``prompt``: conversational prompt (TRL style), one user message such as
  ``[{"role": "user", "content": "Calculate 47 + 21. Give the result in one short sentence."}]``;
* ``solution``: a short worked reference solution ending with ``"The answer is 68."``, usable as
  privileged information for a teacher;
* ``answer``: the integer result as a string, e.g. ``"68"``.

The train and test splits never share a problem: a problem is the ordered triple ``(a, op, b)``.
The test split depends only on ``seed``, ``n_test`` and the problem space (it does not move when
``n_train`` changes), and a larger ``n_test`` extends a smaller one.

``arithmetic_reward`` follows TRL's reward-function convention and scores a completion 1.0 when
``extract_final_integer`` finds the reference answer, else 0.0.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from selfdistill.rewards import completion_text
from selfdistill.sources.base import append_user_text

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "OPERATIONS",
    "REFERENCE_TEMPLATE",
    "arithmetic_reward",
    "count_problems",
    "extract_final_integer",
    "make_arithmetic_dataset",
    "with_reference_solution",
]

#: Operation name -> symbol shown in prompts.
OPERATIONS: dict[str, str] = {"add": "+", "sub": "-", "mul": "*"}

#: Default user prompt; ``{question}`` is e.g. ``"47 + 21"``. Chosen with ``benchmarks/task_baseline.py``
#: (200 test problems, greedy, 32 new tokens): the model answers in ~8 tokens, always within the budget,
#: with 21% accuracy, versus 100% when the reference solution is appended (``with_reference_solution``).
DEFAULT_PROMPT_TEMPLATE = "Calculate {question}. Give the result in one short sentence."

#: Appended to the user message by ``with_reference_solution`` to give a teacher privileged information.
REFERENCE_TEMPLATE = (
    "\n\nHere is a reference solution:\n{solution}\n\nUnderstand it, then answer in your own words."
)


# --------------------------------------------------------------------------------------------------
# Problem space
# --------------------------------------------------------------------------------------------------


def _operand_range(digits: int) -> tuple[int, int]:
    """Inclusive range of non-negative integers with exactly ``digits`` digits (0 counts as 1 digit)."""
    if digits == 1:
        return 0, 9
    return 10 ** (digits - 1), 10**digits - 1


def _block_size(op: str, digits: int) -> int:
    lo, hi = _operand_range(digits)
    n = hi - lo + 1
    # Subtraction keeps a >= b so that answers are never negative.
    return n * (n + 1) // 2 if op == "sub" else n * n


def _block_problem(op: str, digits: int, index: int) -> tuple[int, int]:
    """Map ``index`` in ``[0, _block_size(op, digits))`` to a distinct operand pair ``(a, b)``."""
    lo, hi = _operand_range(digits)
    n = hi - lo + 1
    if op == "sub":
        # Enumerate pairs with a >= b row by row: row i holds b = lo .. lo + i, so it starts at i(i+1)/2.
        i = (math.isqrt(8 * index + 1) - 1) // 2
        return lo + i, lo + index - i * (i + 1) // 2
    return lo + index // n, lo + index % n


def _as_tuple(value: Any, name: str) -> tuple:
    if isinstance(value, (str, int)):
        return (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a value or a sequence of values, got {value!r}") from None
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _blocks(ops: str | Sequence[str], digits: int | Sequence[int]) -> list[tuple[str, int]]:
    ops_t = _as_tuple(ops, "ops")
    digits_t = _as_tuple(digits, "digits")
    for op in ops_t:
        if op not in OPERATIONS:
            raise ValueError(f"Unknown operation {op!r}; choose from {sorted(OPERATIONS)}")
    for d in digits_t:
        if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 9:
            raise ValueError(f"digits must be integers between 1 and 9, got {d!r}")
    # dict.fromkeys deduplicates while keeping order, so the sampling stream stays deterministic.
    return list(dict.fromkeys((op, d) for op in ops_t for d in digits_t))


def count_problems(digits: int | Sequence[int] = 2, ops: str | Sequence[str] = ("add",)) -> int:
    """Number of distinct problems ``(a, op, b)`` for the given digit counts and operations."""
    return sum(_block_size(op, d) for op, d in _blocks(ops, digits))


class _ProblemStream:
    """Draws distinct problems: an (op, digits) block uniformly among non-exhausted blocks, then a
    problem uniformly within it, rejecting problems already drawn by any stream sharing ``seen``."""

    def __init__(self, blocks: list[tuple[str, int]], rng: random.Random, seen: dict) -> None:
        self.blocks = blocks
        self.rng = rng
        self.seen = seen  # (op, digits) -> set of block indices already used

    def draw(self) -> tuple[str, int, int, int]:
        open_blocks = [b for b in self.blocks if len(self.seen[b]) < _block_size(*b)]
        if not open_blocks:  # guarded by the size check in make_arithmetic_dataset
            raise RuntimeError("problem space exhausted")
        op, digits = open_blocks[self.rng.randrange(len(open_blocks))]
        used = self.seen[(op, digits)]
        size = _block_size(op, digits)
        while True:
            index = self.rng.randrange(size)
            if index not in used:
                used.add(index)
                a, b = _block_problem(op, digits, index)
                return op, digits, a, b


# --------------------------------------------------------------------------------------------------
# Reference solutions
# --------------------------------------------------------------------------------------------------


def _place_parts(n: int) -> list[int]:
    """Split ``n`` into its non-zero place values, largest first: 407 -> [400, 7]; 0 -> [0]."""
    parts = [int(c) * 10**i for i, c in enumerate(reversed(str(n))) if c != "0"]
    return list(reversed(parts)) or [0]


def _solution(op: str, a: int, b: int) -> tuple[str, int]:
    """Short worked solution in steps, ending with ``The answer is N.``, and the result."""
    sym = OPERATIONS[op]
    parts = _place_parts(b)
    steps: list[str] = []
    if op in ("add", "sub"):
        result = a + b if op == "add" else a - b
        if len(parts) > 1:
            steps.append(f"Split {b} into {' + '.join(map(str, parts))}.")
            running = a
            for part in parts:
                nxt = running + part if op == "add" else running - part
                steps.append(f"{running} {sym} {part} = {nxt}.")
                running = nxt
        else:
            steps.append(f"{a} {sym} {b} = {result}.")
    else:
        result = a * b
        if len(parts) > 1:
            steps.append(f"Split {b} into {' + '.join(map(str, parts))}.")
            products = [a * part for part in parts]
            for part, prod in zip(parts, products):
                steps.append(f"{a} {sym} {part} = {prod}.")
            steps.append(f"{' + '.join(map(str, products))} = {result}.")
        else:
            steps.append(f"{a} {sym} {b} = {result}.")
    steps.append(f"The answer is {result}.")
    return " ".join(steps), result


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


#: Appended to the prompt when ``choices`` >= 2; ``{options}`` is e.g. ``"57 or 67"``.
CHOICES_TEMPLATE = " The answer is one of: {options}."


def _slip(result: int, rng: random.Random) -> int:
    """A plausible wrong result: off by one in the ones or the tens place (a carry slip), never negative."""
    wrong = result + rng.choice((-10, -1, 1, 10))
    return wrong if wrong >= 0 and wrong != result else result + rng.choice((1, 10))


def _wrong_solution(solution: str, result: int, wrong: int) -> str:
    """The worked solution with its last step and its final answer changed to ``wrong``."""
    head, _, _ = solution.rpartition(f"= {result}.")
    return f"{head}= {wrong}. The answer is {wrong}."


def _row(op: str, a: int, b: int, prompt_template: str, rng: random.Random | None = None, choices: int = 0,
         references: int = 0, reference_error: float = 0.0) -> dict[str, Any]:
    question = f"{a} {OPERATIONS[op]} {b}"
    solution, result = _solution(op, a, b)
    content = prompt_template.format(question=question)
    row: dict[str, Any] = {"solution": solution, "answer": str(result)}
    if choices >= 2:
        options = {result}
        while len(options) < choices:
            options.add(_slip(result, rng))
        shown = sorted(options)
        rng.shuffle(shown)
        content += CHOICES_TEMPLATE.format(options=", ".join(map(str, shown[:-1])) + f" or {shown[-1]}")
        row["options"] = ", ".join(map(str, shown))
    if references:
        texts = []
        for k in range(1, references + 1):
            wrong = rng.random() < reference_error
            row[f"reference_{k}"] = _wrong_solution(solution, result, _slip(result, rng)) if wrong else solution
            row[f"reference_{k}_correct"] = not wrong
            texts.append(f"Reference {k}: {row[f'reference_{k}']}")
        row["references_all"] = "\n".join(texts)
    return {"prompt": [{"role": "user", "content": content}], **row}


def make_arithmetic_dataset(
    n_train: int,
    n_test: int,
    seed: int = 0,
    digits: int | Sequence[int] = 2,
    ops: str | Sequence[str] = ("add",),
    prompt_template: str | Sequence[str] = DEFAULT_PROMPT_TEMPLATE,
    choices: int = 0,
    references: int = 0,
    reference_error: float = 0.0,
) -> DatasetDict:
    """Build seeded arithmetic problems as a ``datasets.DatasetDict`` with ``train`` and ``test`` splits.

    Args:
        n_train: number of training problems.
        n_test: number of test problems; never overlapping the training problems.
        seed: random seed; the same arguments always give the same datasets.
        digits: operand digit count, or several (each problem picks one; both operands share it).
            One digit means 0-9, two digits 10-99, and so on.
        ops: operation(s) among ``"add"``, ``"sub"`` (``a >= b``, never negative) and ``"mul"``.
        prompt_template: user message with a ``{question}`` placeholder, e.g. ``"What is {question}?"``; or several
            such wordings, each problem taking one at random (seeded), so that a model trained on them answers the sum
            however it is asked.
        choices: when >= 2, the prompt lists this many options, the answer among plausible slips (off by one in the
            ones or tens place), in random order (:data:`CHOICES_TEMPLATE`); column ``options``. A wrong choice then
            narrows the answer: SD-Zero's reviser has something to correct towards.
        references: when > 0, columns ``reference_1`` .. ``reference_<references>``: independent references, each
            wrong (its last step and answer changed by such a slip) with probability ``reference_error``
            (``reference_<k>_correct`` says which), and ``references_all`` holding all of them: several noisy views
            of one solution, AVSD's premise.

    Each problem first picks an ``(op, digits)`` combination uniformly (among those not yet
    exhausted), then operands uniformly within it.

    Returns:
        ``DatasetDict`` with columns ``prompt`` (one user message, TRL conversational format),
        ``solution`` (worked steps ending with the answer) and ``answer`` (integer as a string).

    Raises:
        ValueError: bad sizes, operations or digit counts, or more problems requested than exist.
    """
    from datasets import Dataset, DatasetDict

    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not isinstance(choices, int) or isinstance(choices, bool) or choices < 0 or choices == 1:
        raise ValueError(f"choices must be 0 (no options) or an integer >= 2, got {choices!r}")
    if not isinstance(references, int) or isinstance(references, bool) or references < 0:
        raise ValueError(f"references must be a non-negative integer, got {references!r}")
    if not 0.0 <= float(reference_error) <= 1.0:
        raise ValueError(f"reference_error must be in [0, 1], got {reference_error!r}")
    templates = [prompt_template] if isinstance(prompt_template, str) else list(prompt_template)
    if not templates:
        raise ValueError("prompt_template is an empty list; give one wording or several, each with '{question}'")
    for template in templates:
        if not isinstance(template, str) or "{question}" not in template:
            raise ValueError(f"prompt_template must contain '{{question}}', got {template!r}")
    blocks = _blocks(ops, digits)
    available = sum(_block_size(op, d) for op, d in blocks)
    if n_train + n_test > available:
        raise ValueError(
            f"Requested n_train + n_test = {n_train} + {n_test} = {n_train + n_test} distinct problems, but "
            f"ops={list(_as_tuple(ops, 'ops'))} with digits={list(_as_tuple(digits, 'digits'))} only has "
            f"{available}. Request fewer problems, or add digit counts or operations."
        )

    seen: dict[tuple[str, int], set[int]] = {b: set() for b in blocks}
    # Separate streams: the test split depends only on the seed (not on n_train), and training
    # problems are drawn from whatever the test split left.
    test_stream = _ProblemStream(blocks, random.Random(f"selfdistill-arithmetic-test-{seed}"), seen)
    train_stream = _ProblemStream(blocks, random.Random(f"selfdistill-arithmetic-train-{seed}"), seen)
    test = [test_stream.draw() for _ in range(n_test)]
    train = [train_stream.draw() for _ in range(n_train)]

    def to_dataset(problems: list[tuple[str, int, int, int]], split: str) -> Dataset:
        rng = random.Random(f"selfdistill-arithmetic-{split}-extras-{seed}")
        wording = random.Random(f"selfdistill-arithmetic-{split}-wording-{seed}")
        rows = [_row(op, a, b, templates[0] if len(templates) == 1 else wording.choice(templates), rng, choices,
                     references, reference_error) for op, _, a, b in problems]
        return Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]} if rows else
                                 {k: [] for k in ("prompt", "solution", "answer")})

    return DatasetDict({"train": to_dataset(train, "train"), "test": to_dataset(test, "test")})


def with_reference_solution(
    prompt: list[dict[str, Any]], solution: str, template: str = REFERENCE_TEMPLATE
) -> list[dict[str, Any]]:
    """Return a copy of a conversational ``prompt`` whose last user message carries ``solution``.

    This is the privileged-information prompt a teacher sees, e.g.
    ``"What is 47 + 21?\\n\\nHere is a reference solution:\\n...\\n\\nUnderstand it, then answer in
    your own words."``.
    """
    return append_user_text(prompt, template.format(solution=solution), separator="")


# --------------------------------------------------------------------------------------------------
# Verifier
# --------------------------------------------------------------------------------------------------

# A number: optional sign (only when not glued to a preceding word or digit, so "47-21" reads as 47
# and 21), digits with optional thousands separators, optional decimal part.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-\u2212])?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?(?![\d])",
)
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")


def extract_final_integer(text: Any) -> int | None:
    """Extract the final answer of ``text`` as an integer, or None.

    Rule: if the text contains ``\\boxed{...}``, look only inside the last one; otherwise look at the
    whole text. Take the last number there. Thousands separators are accepted (``1,234``), a leading
    minus counts only when it is not glued to a preceding word or digit (``-5`` but ``47-21`` -> 21),
    and a decimal with a zero fraction counts (``68.0``). If that last number is not an integer
    (``68.5``), return None. Markup around it (``**68**``, ``= 68.``) does not matter.
    Never raises: anything that is not a string yields None.
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    frac = last.group("frac")
    if frac is not None and frac.strip("0"):
        return None
    try:
        value = int(last.group("int").replace(",", ""))
    except ValueError:
        return None
    return -value if last.group("sign") else value


def _parse_answer(answer: Any) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer
    if isinstance(answer, str):
        try:
            return int(answer.strip().replace(",", ""))
        except ValueError:
            return extract_final_integer(answer)
    return None


def arithmetic_reward(
    prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any
) -> list[float]:
    """TRL-style reward function: 1.0 where the completion's final integer equals ``answer``, else 0.0.

    ``completions`` may be strings or conversations (lists of message dicts; the last assistant
    message is scored). Malformed or empty completions score 0.0; this function never raises on them
    (only on a length mismatch between ``completions`` and ``answer``, which is a caller bug).

    Rows with ``options`` (``make_arithmetic_dataset(choices=...)``): a completion that names two or more of the
    options ("The answer is one of 80 or 90.") hedges and scores 0.0, whichever it names last; otherwise the
    final integer listed last would win whenever the right option is printed last (56% of the default held-out
    rows). An option that is also an operand of the question does not count as named. Other columns are ignored.
    """
    if len(completions) != len(answer):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    options = kwargs.get("options") or [None] * len(completions)
    prompts = prompts if prompts is not None and len(prompts) == len(completions) else [None] * len(completions)
    rewards: list[float] = []
    for completion, reference, listed, prompt in zip(completions, answer, options, prompts):
        try:
            text = completion_text(completion)
            predicted = extract_final_integer(text)
            target = _parse_answer(reference)
            correct = predicted is not None and predicted == target
            if correct and listed and _hedges(text, listed, prompt):
                correct = False
            rewards.append(1.0 if correct else 0.0)
        except Exception:  # noqa: BLE001 - a reward function must never take the training loop down
            rewards.append(0.0)
    return rewards


def _integers(text: str) -> list[int]:
    return [int(m.group("int").replace(",", "")) for m in _NUMBER.finditer(text) if not m.group("frac")]


def option_values(listed: Any) -> list[int]:
    """A row's ``options`` ("80, 90"; "80 or 90" also read) as integers, in the order the prompt prints them."""
    return [int(v) for v in str(listed).replace(" or ", ",").split(",") if v.strip().lstrip("-").isdigit()]


def named_options(text: str, listed: Any, prompt: Any) -> set[int]:
    """The row's options that ``text`` names, leaving out the options that are operands of the question (an operand
    appears in the prompt once more than the options list shows it)."""
    prompt_ints = _integers(completion_text(prompt)) if prompt is not None else []
    said = set(_integers(text))
    return {v for v in option_values(listed) if v in said and prompt_ints.count(v) <= 1}


def _hedges(text: str, listed: Any, prompt: Any) -> bool:
    """Whether ``text`` names two or more of the row's options (:func:`named_options`)."""
    return len(named_options(text, listed, prompt)) >= 2
