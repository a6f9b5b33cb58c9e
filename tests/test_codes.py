"""Keyed recall (`data.task: codes`): the Skill-SD miniature whose bank holds one fact per city."""

from pathlib import Path

import pytest

from selfdistill.data import load_splits
from selfdistill.methods.skillsd.bank import SkillBank
from selfdistill.recipes import DataSpec, RecipeError, load_recipe
from selfdistill.tasks.arithmetic import arithmetic_reward
from selfdistill.tasks.codes import CITIES, code_facts, code_table, make_codes_dataset

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "skillsd_codes.yaml"


def test_codes_are_seeded_and_every_city_is_asked_in_both_splits_in_different_wordings():
    assert code_table(seed=0) == code_table(seed=0)
    assert code_table(seed=0) != code_table(seed=1)
    assert all(10 <= c <= 99 for c in code_table(seed=3, low=10, high=99).values())
    table = code_table(seed=3)
    assert list(table) == list(CITIES) and all(1 <= c <= 9 for c in table.values())
    # evenly spread: always answering the commonest code scores at most 3 of 24 (a rule that ignores the city)
    assert max(list(table.values()).count(c) for c in range(1, 10)) == 3
    dd = make_codes_dataset(seed=3)
    train, test = dd["train"], dd["test"]
    assert len(train) == 4 * len(CITIES) and len(test) == 2 * len(CITIES)
    for split in (train, test):
        assert sorted(set(split["task"])) == sorted(CITIES)
        for row in split:
            assert row["answer"] == str(table[row["task"]])
            assert row["task"] in row["prompt"][0]["content"]
    train_wordings = {r["prompt"][0]["content"].replace(r["task"], "{city}") for r in train}
    test_wordings = {r["prompt"][0]["content"].replace(r["task"], "{city}") for r in test}
    assert len(train_wordings) == 4 and len(test_wordings) == 2 and not train_wordings & test_wordings


def test_code_table_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cities"):
        code_table(cities=0)
    with pytest.raises(ValueError, match="low <= high"):
        code_table(low=50, high=10)


def test_the_recipe_seeds_the_facts_of_its_task_and_retrieval_picks_each_citys_own():
    recipe = load_recipe(str(RECIPE))
    assert recipe.data.task == "codes" and recipe.method == "skillsd"
    seeded = recipe.source.args["seed_skills"]
    assert seeded == code_facts(code_table(seed=recipe.data.seed))  # a changed seed or table must change the recipe
    bank = SkillBank(retrieval="similarity", top_k=recipe.source.args["top_k"])
    bank.seed(seeded)
    train, test = load_splits(recipe.data)
    for row in [*train, *test]:
        (skill,) = bank.retrieve(row["task"], row["prompt"][0]["content"])
        assert skill.text == f"The code number of {row['task']} is {row['answer']}."


def test_the_verifier_reads_the_code_from_a_reply():
    rewards = arithmetic_reward(None, ["The code number of Oslo is 65.", "It is 56.", ""], ["65", "65", "65"])
    assert rewards == [1.0, 0.0, 0.0]


def test_an_unknown_built_in_task_names_the_ones_there_are(tmp_path):
    recipe = RECIPE.read_text().replace("task: codes", "task: kodes")
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    with pytest.raises(RecipeError, match="arithmetic, codes"):
        load_recipe(str(path))


def test_data_spec_cuts_the_codes_splits_when_asked():
    train, test = load_splits(DataSpec(task="codes", n_train=10, n_test=5))
    assert len(train) == 10 and len(test) == 5


def test_facts_written_for_another_data_seed_are_refused_with_the_fix(tmp_path):
    # The codes follow data.seed; the recipe's facts are seed 0's. Overriding the seed alone would have the teacher
    # copy wrong codes, silently.
    with pytest.raises(RecipeError, match=r"data.seed=1 does not draw.*Oslo is 2.*code_table\(seed=1\)"):
        load_recipe(str(RECIPE), overrides=["data.seed=1"])
    facts = code_facts(code_table(seed=1))
    path = tmp_path / "facts.txt"
    path.write_text("\n".join(["# seed 1's facts", *facts, "Answer with the digit alone."]))
    recipe = load_recipe(str(RECIPE), overrides=["data.seed=1", f"source.seed_skills={path}"])
    assert recipe.data.seed == 1  # the facts of its own seed (and a text that states no code) pass
