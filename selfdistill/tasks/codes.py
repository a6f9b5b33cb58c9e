"""Keyed recall: each of a fixed set of cities has a code number that no prompt states.

A miniature where Skill-SD's premise holds by construction: what one attempt at a task learns ("the code number of
Oslo is 2") serves every later attempt at the same task, and the model cannot know it otherwise. A skill bank that
holds such facts, retrieved by task, makes the teacher answer; the student, which never sees the bank, can only
take the facts into its weights. The 135M model copies a stated fact reliably but does not look one up in a list
(diagnose, sampled: right 0.91 of the time shown its city's fact, 0.20 shown all 24 facts as one skill; `python
benchmarks/premises.py codes_skillsd skillsd_seeded skillsd_seeded_one_list --diagnose`), so the bank holds one skill
per city and retrieval picks it.

The codes are single digits by default. Reverse KL is mode-seeking: it moves the student's mass among what the student
already gives some, and GRPO needs a right answer sampled by chance. With two-digit codes neither had anything to
work with (a first draft of this task with codes 10-99: Skill-SD at the recipe's settings 0% after 60 steps, seed 0,
with a teacher right 95% of the time).

Every city appears in both splits; the held-out split asks in wordings training never uses, so held-out accuracy
reads whether the student learned the codes, not the training sentences.
"""

from __future__ import annotations

import random
import re
from typing import Any

CITIES = (
    "Oslo", "Lima", "Cairo", "Delhi", "Paris", "Tokyo", "Quito", "Rome", "Berlin", "Madrid", "Dublin", "Vienna",
    "Prague", "Athens", "Lisbon", "Warsaw", "Nairobi", "Havana", "Manila", "Seoul", "Bogota", "Ottawa", "Santiago",
    "Helsinki",
)
ANSWER_FORM = " Answer in one short sentence."  # as the arithmetic task asks: without it the replies run past 32 tokens
TRAIN_TEMPLATES = tuple(t + ANSWER_FORM for t in (
    "What is the code number of {city}?",
    "Which code number belongs to {city}?",
    "Tell me the code number of {city}.",
    "{city} has a code number. What is it?",
))
TEST_TEMPLATES = tuple(t + ANSWER_FORM for t in (
    "What number is the code of {city}?",
    "Give the code number for {city}.",
))
FACT_TEMPLATE = "The code number of {city} is {code}."


def code_table(cities: int = len(CITIES), seed: int = 0, low: int = 1, high: int = 9) -> dict[str, int]:
    """The first ``cities`` cities of :data:`CITIES`, each with a code from ``low..high``, as evenly spread as the
    counts allow and shuffled (seeded): no code is much more common than another, so answering one code to every
    question (a rule that ignores the city) scores at most ``ceil(cities / (high - low + 1)) / cities``."""
    if not isinstance(cities, int) or isinstance(cities, bool) or not 1 <= cities <= len(CITIES):
        raise ValueError(f"cities must be an integer from 1 to {len(CITIES)}, got {cities!r}")
    if not (isinstance(low, int) and isinstance(high, int) and low <= high):
        raise ValueError(f"codes are drawn from low..high: need integers with low <= high, got {low!r}..{high!r}")
    rng = random.Random(f"selfdistill-codes-{seed}")
    codes = [low + i % (high - low + 1) for i in range(cities)]
    rng.shuffle(codes)
    return dict(zip(CITIES[:cities], codes))


def code_facts(table: dict[str, int]) -> list[str]:
    """One skill text per city ("The code number of Oslo is 2."): what a bank seeded with the facts holds."""
    return [FACT_TEMPLATE.format(city=city, code=code) for city, code in table.items()]


_FACT = re.compile(r"The code number of (?P<city>[A-Za-z ]+) is (?P<code>-?\d+)\.")


def contradicted_facts(skills: list[str], table: dict[str, int]) -> list[str]:
    """The skills that state a city's code (in :data:`FACT_TEMPLATE`'s words) other than ``table``'s: a bank seeded
    with them would teach wrong codes. Other texts are not facts of this task and are left alone."""
    wrong = []
    for text in skills:
        match = _FACT.fullmatch(text.strip())
        if match and match["city"] in table and int(match["code"]) != table[match["city"]]:
            wrong.append(f"{text!r} (the table says {table[match['city']]})")
    return wrong


def check_seeded_facts(skills: list[str], seed: int) -> None:
    """Refuse seeded skills that state codes ``seed`` does not draw (facts written for another ``data.seed``): the
    teacher copies what it is shown, so they would teach wrong codes, silently."""
    wrong = contradicted_facts(skills, code_table(seed=seed))
    if wrong:
        raise ValueError(
            f"source.seed_skills states {len(wrong)} code(s) that data.seed={seed} does not draw, e.g. {wrong[0]}: "
            "the codes are drawn from data.seed. Seed the bank with that seed's facts (python -c \"from "
            f"selfdistill.tasks.codes import code_facts, code_table; print(code_facts(code_table(seed={seed})))\") "
            "or keep the data.seed the facts were written for"
        )


def make_codes_dataset(cities: int = len(CITIES), seed: int = 0, low: int = 1, high: int = 9) -> Any:
    """Train and test splits as a ``datasets.DatasetDict``: every city in every wording of its split.

    Columns: ``prompt`` (one user message), ``answer`` (the code, as a string: the arithmetic verifier reads the
    reply's last integer), ``task`` (the city: Skill-SD files the skills written about an attempt under it) and
    ``wording`` (the template's index).
    """
    from datasets import Dataset, DatasetDict

    table = code_table(cities, seed, low, high)

    def split(templates: tuple[str, ...]) -> Dataset:
        rows = [{"prompt": [{"role": "user", "content": template.format(city=city)}], "answer": str(code),
                 "task": city, "wording": k}
                for k, template in enumerate(templates) for city, code in table.items()]
        random.Random(f"selfdistill-codes-order-{seed}").shuffle(rows)
        return Dataset.from_list(rows)

    return DatasetDict({"train": split(TRAIN_TEMPLATES), "test": split(TEST_TEMPLATES)})
