"""Tests for the built-in arithmetic task: dataset generation, answer extraction and reward."""

from __future__ import annotations

import re

import pytest

from selfdistill.tasks import (
    DEFAULT_PROMPT_TEMPLATE,
    arithmetic_reward,
    count_problems,
    extract_final_integer,
    make_arithmetic_dataset,
    with_reference_solution,
)
from selfdistill.tasks.arithmetic import _solution

_EXPR = re.compile(r"(\d+) ([-+*]) (\d+)")


def _problems(split) -> set[str]:
    return {row["prompt"][0]["content"] for row in split}


def _operands(row) -> tuple[int, str, int]:
    a, sym, b = _EXPR.search(row["prompt"][0]["content"]).groups()
    return int(a), sym, int(b)


def test_rows_have_expected_shape():
    ds = make_arithmetic_dataset(20, 10, seed=0)
    assert set(ds) == {"train", "test"}
    assert len(ds["train"]) == 20 and len(ds["test"]) == 10
    for row in ds["train"]:
        a, sym, b = _operands(row)
        assert sym == "+" and 10 <= a <= 99 and 10 <= b <= 99
        assert row["prompt"] == [
            {"role": "user", "content": DEFAULT_PROMPT_TEMPLATE.format(question=f"{a} + {b}")}
        ]
        assert row["answer"] == str(a + b)
        assert row["solution"].endswith(f"The answer is {a + b}.")
        assert extract_final_integer(row["solution"]) == a + b


def test_custom_prompt_template():
    ds = make_arithmetic_dataset(3, 0, prompt_template="Compute {question} now.")
    for row in ds["train"]:
        assert row["prompt"][0]["content"].startswith("Compute ") and row["prompt"][0]["content"].endswith(
            " now."
        )


@pytest.mark.parametrize(
    ("digits", "ops", "n_train"),
    [(2, ("add",), 300), (1, ("add", "sub", "mul"), 150), ((1, 2), ("sub",), 300), (3, ("mul",), 300)],
)
def test_splits_never_overlap_and_are_unique(digits, ops, n_train):
    ds = make_arithmetic_dataset(n_train, 100, seed=3, digits=digits, ops=ops)
    train, test = _problems(ds["train"]), _problems(ds["test"])
    assert len(train) == n_train and len(test) == 100, "problems must be distinct within a split"
    assert not train & test


def test_exhaustive_split_uses_every_problem_once():
    total = count_problems(digits=1, ops=("add", "sub"))
    assert total == 10 * 10 + 10 * 11 // 2
    ds = make_arithmetic_dataset(total - 40, 40, seed=0, digits=1, ops=("add", "sub"))
    train, test = _problems(ds["train"]), _problems(ds["test"])
    assert len(train | test) == total and not train & test


def test_subtraction_is_never_negative_and_correct():
    ds = make_arithmetic_dataset(200, 0, seed=1, digits=(1, 2, 3), ops="sub")
    for row in ds["train"]:
        a, sym, b = _operands(row)
        assert sym == "-" and a >= b and row["answer"] == str(a - b)


def test_deterministic_under_seed():
    a = make_arithmetic_dataset(50, 20, seed=7, ops=("add", "mul"))
    b = make_arithmetic_dataset(50, 20, seed=7, ops=("add", "mul"))
    c = make_arithmetic_dataset(50, 20, seed=8, ops=("add", "mul"))
    assert a["train"].to_list() == b["train"].to_list() and a["test"].to_list() == b["test"].to_list()
    assert a["train"].to_list() != c["train"].to_list()


def test_test_split_is_stable_when_train_size_changes():
    small = make_arithmetic_dataset(10, 30, seed=0)
    large = make_arithmetic_dataset(500, 50, seed=0)
    assert large["test"].to_list()[:30] == small["test"].to_list()


def test_too_many_problems_raises_clear_error():
    with pytest.raises(ValueError, match="only has 100"):
        make_arithmetic_dataset(90, 11, digits=1, ops="add")
    make_arithmetic_dataset(90, 10, digits=1, ops="add")  # exactly the whole space is fine


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ops": ("div",)}, "Unknown operation"),
        ({"digits": 0}, "digits"),
        ({"prompt_template": "no placeholder"}, "question"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_arithmetic_dataset(1, 1, **kwargs)


def test_negative_size_rejected():
    with pytest.raises(ValueError, match="n_train"):
        make_arithmetic_dataset(-1, 1)


@pytest.mark.parametrize(
    ("op", "a", "b"), [("add", 47, 21), ("sub", 905, 407), ("mul", 38, 70), ("mul", 6, 7)]
)
def test_worked_solutions_are_consistent(op, a, b):
    text, result = _solution(op, a, b)
    assert result == {"add": a + b, "sub": a - b, "mul": a * b}[op]
    assert text.endswith(f"The answer is {result}.")


def test_with_reference_solution_appends_to_user_message():
    prompt = [{"role": "user", "content": "What is 1 + 2?"}]
    out = with_reference_solution(prompt, "1 + 2 = 3. The answer is 3.")
    assert prompt[0]["content"] == "What is 1 + 2?", "input must not be mutated"
    assert out[0]["content"].startswith("What is 1 + 2?") and "The answer is 3." in out[0]["content"]
    with pytest.raises(ValueError, match="no user message"):
        with_reference_solution([{"role": "system", "content": "x"}], "s")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 68.", 68),
        ("47 + 21 = 68", 68),
        ("= 68", 68),
        ("**68**", 68),
        ("\\boxed{68}", 68),
        ("The result is \\boxed{68}. Check: 47 + 21.", 68),
        ("The answer is 1,234.", 1234),
        ("1,234,567", 1234567),
        ("68.0", 68),
        ("x = -5", -5),
        ("x = \u22125", -5),
        ("47-21", 21),
        ("I think 60, no wait, 68", 68),
        ("It is 68\n", 68),
        ("68th", 68),
    ],
)
def test_extract_final_integer(text, expected):
    assert extract_final_integer(text) == expected


@pytest.mark.parametrize("text", ["", "no number here", "68.5", "3.14", "\\boxed{}", None, 68, ["68"], b"68"])
def test_extract_final_integer_returns_none_on_malformed(text):
    assert extract_final_integer(text) is None


def test_reward_on_strings():
    rewards = arithmetic_reward(
        prompts=["p"] * 6,
        completions=["The answer is 68.", "**68**", "67", "", "sixty-eight", "68.5"],
        answer=["68"] * 6,
    )
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_reward_on_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "47 + 21 = 68"}],
        [
            {"role": "assistant", "content": "68"},
            {"role": "user", "content": "sure?"},
            {"role": "assistant", "content": "Sorry, 67."},
        ],
        [{"role": "assistant", "content": [{"type": "text", "text": "The answer is 68."}]}],
        [{"role": "assistant", "content": None}],
        [],
        None,
        [{"role": "assistant"}],
        {"role": "assistant", "content": "68"},
    ]
    rewards = arithmetic_reward(prompts=[None] * len(completions), completions=completions, answer=["68"] * 8)
    assert rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_reward_accepts_int_and_formatted_answers_and_extra_columns():
    rewards = arithmetic_reward(
        prompts=["p", "p", "p"],
        completions=["1234", "1,234", "-5"],
        answer=[1234, "1,234", "-5"],
        solution=["s", "s", "s"],
        trainer_state=None,
    )
    assert rewards == [1.0, 1.0, 1.0]


def test_reward_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        arithmetic_reward(prompts=["p", "p"], completions=["1", "2"], answer=["1"])


def test_choices_list_the_answer_among_slips_and_are_seeded():
    from selfdistill.tasks.arithmetic import make_arithmetic_dataset

    first = make_arithmetic_dataset(40, 10, seed=3, choices=3)
    assert first["train"].to_list() == make_arithmetic_dataset(40, 10, seed=3, choices=3)["train"].to_list()
    for row in first["train"].to_list() + first["test"].to_list():
        options = [int(x) for x in row["options"].split(", ")]
        answer = int(row["answer"])
        assert len(set(options)) == 3 and answer in options
        assert all(abs(o - answer) in (0, 1, 10) for o in options)  # each distractor one slip away
        assert "The answer is one of:" in row["prompt"][0]["content"]
    with pytest.raises(ValueError, match="choices"):
        make_arithmetic_dataset(4, 1, choices=1)


def test_noisy_references_are_wrong_at_the_given_rate_and_only_in_their_answer():
    from selfdistill.tasks.arithmetic import make_arithmetic_dataset

    rows = make_arithmetic_dataset(600, 0, seed=0, references=3, reference_error=0.3)["train"].to_list()
    wrong = 0
    for row in rows:
        for k in (1, 2, 3):
            ref, ok = row[f"reference_{k}"], row[f"reference_{k}_correct"]
            assert (ref == row["solution"]) == ok
            assert ref.endswith(f"The answer is {row['answer']}.") == ok
            wrong += not ok
            assert f"Reference {k}: {ref}" in row["references_all"]
    assert 0.25 < wrong / (3 * len(rows)) < 0.35
    clean = make_arithmetic_dataset(50, 0, seed=0, references=2)["train"].to_list()
    assert all(r["reference_1"] == r["reference_2"] == r["solution"] for r in clean)
    with pytest.raises(ValueError, match="reference_error"):
        make_arithmetic_dataset(4, 1, references=2, reference_error=1.5)


def test_several_wordings_are_drawn_per_problem_and_seeded():
    from selfdistill.tasks.arithmetic import make_arithmetic_dataset

    wordings = ["What is {question}?", "Please work out {question} for me.", "Compute {question}."]
    first = make_arithmetic_dataset(90, 30, seed=1, prompt_template=wordings)
    again = make_arithmetic_dataset(90, 30, seed=1, prompt_template=wordings)
    assert first["train"].to_list() == again["train"].to_list()
    used = {w for w in wordings for r in first["train"].to_list()
            if r["prompt"][0]["content"].startswith(w.split("{")[0])}
    assert used == set(wordings)
    with pytest.raises(ValueError, match="question"):
        make_arithmetic_dataset(4, 1, prompt_template=["What is it?"])


def test_a_completion_naming_two_options_hedges_and_scores_zero():
    """With options in the prompt, naming both ("one of 80 or 90") is not an answer, even when the right one comes
    last; an option that is also an operand of the question does not count as named."""
    rows = make_arithmetic_dataset(40, 20, seed=0, choices=2)["test"].to_list()
    row = rows[0]
    wrong = next(v.strip() for v in row["options"].split(",") if v.strip() != row["answer"])
    completions = [f"The answer is one of {wrong} or {row['answer']}.", f"The answer is {row['answer']}.",
                   f"Not {wrong}: {row['answer']}.", f"The answer is {wrong}."]
    rewards = arithmetic_reward([row["prompt"]] * 4, completions, [row["answer"]] * 4, options=[row["options"]] * 4)
    assert rewards == [0.0, 1.0, 0.0, 0.0]
    assert arithmetic_reward(None, completions[:2], [row["answer"]] * 2) == [1.0, 1.0]  # no options: plain rule
    prompt = [{"role": "user", "content": "Calculate 45 + 1. The answer is one of: 45 or 46."}]
    assert arithmetic_reward([prompt], ["45 + 1 = 46"], ["46"], options=["45, 46"]) == [1.0]
