"""AVSD: view builders, composed views, the multi-view trainer path and the recipe."""

import math

import pytest
from conftest import build_dataset, build_model
from test_trainer import exact_reward, make_args

from selfdistill import SelfDistillTrainer
from selfdistill.methods.avsd.source import DEFAULT_TEMPLATES, INCOMPLETE, final_answer, partial_solution
from selfdistill.recipes import RecipeError, parse_recipe
from selfdistill.sources import MultiView, ReferenceSolution, Reviser, Rollout, TeacherView

PROMPT = [{"role": "user", "content": "What is 12 + 3?"}]


def _rollout(solution, answer=None, reward=None, completion="15"):
    row = {"prompt": PROMPT, "solution": solution}
    if answer is not None:
        row["answer"] = answer
    return Rollout(row=row, prompt=PROMPT, completion=completion, completion_ids=[1, 2], reward=reward)


def _pis(source, rollout):
    return {v.name: v.pi for v in source.views([rollout])[0]}


def test_the_three_solution_views_of_a_worked_solution():
    solution = "Split 16 into 10 + 6. 64 + 10 = 74. 74 + 6 = 80. The answer is 80."
    pis = _pis(MultiView(), _rollout(solution))
    assert pis["full_solution"] == solution
    assert pis["partial_solution"] == f"Split 16 into 10 + 6. 64 + 10 = 74. ... {INCOMPLETE}"
    assert pis["answer_only"] == "80"


def test_one_step_solution_keeps_its_step_without_the_answer():
    assert partial_solution("12 + 3 = 15.", "15") == f"12 + 3 = ... {INCOMPLETE}"
    # the answer inside another number is not cut
    assert partial_solution("115 - 100 = 15.", "15") == f"115 - 100 = ... {INCOMPLETE}"


def test_multiline_solution_steps_are_lines():
    solution = "Step one: 2 + 2 = 4.\nStep two: 4 * 3 = 12.\nSo \\boxed{12}"
    assert partial_solution(solution, "12") == f"Step one: 2 + 2 = 4. ... {INCOMPLETE}"


@pytest.mark.parametrize("solution, answer", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("First \\boxed{3}, then \\boxed{4}", "4"),
    ("The answer is 80.", "80"),
    ("the answer is: $-7$", "-7"),
    ("no answer stated here", None),
])
def test_final_answer(solution, answer):
    assert final_answer(solution) == answer


def test_no_final_answer_found_names_the_row_and_the_fix():
    source = MultiView()
    with pytest.raises(ValueError, match="no final answer was found.*answer_column="):
        source.views([_rollout("we add the numbers and get fifteen")])
    # the answer column, when given, is used instead of parsing the solution
    assert _pis(MultiView(answer_column="answer"), _rollout("fifteen", answer="15"))["answer_only"] == "15"


def test_empty_solution_is_a_clear_error_naming_the_row():
    with pytest.raises(ValueError, match="row .*What is 12 \\+ 3.*empty 'solution'"):
        MultiView().views([_rollout("  ")])


def test_feedback_view_carries_the_verdict_and_needs_rewards():
    source = MultiView(views=["full_solution", "feedback"])
    assert source.needs_rewards and not MultiView().needs_rewards
    pis = _pis(source, _rollout("12 + 3 = 15. The answer is 15.", reward=0.0, completion="The result is 14"))
    assert "The result is 14" in pis["feedback"] and "judged this attempt wrong" in pis["feedback"]


def hint_view(rollout):
    return f"Hint: the answer has {len(rollout.row['answer'])} digits."


def test_user_functions_and_other_sources_compose():
    source = MultiView(views=[ReferenceSolution(), hint_view, Reviser()])
    assert source.names == ["referencesolution", "hint_view", "reviser"] and source.needs_rewards
    [views] = source.views([_rollout("12 + 3 = 15. The answer is 15.", answer="15", reward=1.0)])
    assert [v.name for v in views] == source.names
    assert views[1].pi == "Hint: the answer has 2 digits."
    # the reviser keeps its spliced layout: first copy (EOS dropped), then the cue
    assert views[2].continuation == [[1], Reviser().cues["correct"]]

    def custom(rollout):
        return TeacherView(context="raw teacher text", pi=None)

    [[view]] = MultiView(views=[custom]).views([_rollout("x. The answer is 1.")])
    assert view.name == "custom" and view.context == "raw teacher text"


def test_dotted_path_views_resolve(monkeypatch, tmp_path):
    (tmp_path / "my_views.py").write_text("def shout(rollout):\n    return 'THINK'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert MultiView(views=["my_views.shout", "reviser"]).names == ["shout", "reviser"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(views=[]), "views is empty"),
    (dict(views=["full_solution", "full_solution"]), "view names repeat"),
    (dict(views=["whole_solution"]), "unknown view 'whole_solution'"),
    (dict(templates={"feedback": "{problem} {pi}"}), "templates for views that are not used"),
    (dict(templates={"answer_only": "{problem}"}), "lacks the {pi} placeholder"),
    (dict(form="dense"), "form"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MultiView(**kwargs)


def _trainer(tmp_path, tokenizer, source, **overrides):
    return SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path, **overrides),
                              train_dataset=build_dataset(), processing_class=tokenizer, privileged=source,
                              reward_funcs=[exact_reward])


def _first_loss(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h][0]


def test_one_view_equals_the_single_view_trainer(tmp_path, tokenizer):
    template = DEFAULT_TEMPLATES["full_solution"].replace("{pi}", "{solution}")
    single = _first_loss(_trainer(tmp_path / "a", tokenizer, ReferenceSolution(template=template), max_steps=1))
    multi = _first_loss(_trainer(tmp_path / "b", tokenizer, MultiView(views=["full_solution"]), max_steps=1))
    assert math.isclose(single["loss"], multi["loss"], rel_tol=1e-6)
    assert math.isclose(single["divergence"], multi["divergence"], rel_tol=1e-6)


def test_three_views_train_and_log_the_view_metrics(tmp_path, tokenizer):
    logs = _first_loss(_trainer(tmp_path, tokenizer, MultiView(answer_column="answer"), max_steps=1))
    for key in ("views/gate", "views/jensen", "views/agreement", "views/divergence/full_solution",
                "views/divergence/partial_solution", "views/divergence/answer_only"):
        assert key in logs and math.isfinite(logs[key]), key
    assert 0.0 <= logs["views/gate"] <= 1.0 and logs["views/jensen"] >= 0.0


@pytest.mark.parametrize("form, weights", [("full", "uniform"), ("full", "agreement"), ("sampled", "uniform")])
def test_joint_and_per_view_teacher_passes_agree(tmp_path, tokenizer, form, weights):
    kwargs = dict(answer_column="answer", form=form, weights=weights, top_k=8)
    extra = dict(support="sampled", clip="token") if form == "sampled" else {}
    joint = _first_loss(_trainer(tmp_path / "a", tokenizer, MultiView(**kwargs), max_steps=1, **extra))
    apart = _first_loss(_trainer(tmp_path / "b", tokenizer, MultiView(**kwargs), max_steps=1,
                                 teacher_batch_views=False, **extra))
    assert math.isclose(joint["loss"], apart["loss"], rel_tol=1e-5, abs_tol=1e-7)


def test_avsd_recipe_validation():
    recipe = parse_recipe({"method": "avsd", "source": {"views": ["full_solution", "answer_only"], "weights":
                                                        "agreement"}, "training": {"use_cpu": True}})
    assert recipe.source.type == "multiview"
    with pytest.raises(RecipeError, match="unknown view"):
        parse_recipe({"method": "avsd", "source": {"views": ["ful_solution"]}, "training": {"use_cpu": True}})
    with pytest.raises(RecipeError, match="needs a verifier"):
        parse_recipe({"method": "avsd", "source": {"views": ["full_solution", "feedback"]},
                      "training": {"use_cpu": True}})


def test_views_of_different_rollouts_must_match(tmp_path, tokenizer):
    class Odd(MultiView):
        def views(self, rollouts):
            return [[TeacherView(context="x", name=f"v{i % 2}")] for i, _ in enumerate(rollouts)]

    trainer = _trainer(tmp_path, tokenizer, Odd(views=["full_solution"]), max_steps=1)
    with pytest.raises(ValueError, match="same views in the same order"):
        trainer.train()


def test_column_views_show_each_column_and_require_it():
    from selfdistill.methods.avsd.source import MultiView
    from selfdistill.sources import Rollout

    source = MultiView(views=["column:ref_a", "column:ref_b"])
    assert source.names == ["ref_a", "ref_b"] and source.required_columns == ("ref_a", "ref_b")
    row = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "ref_a": "2 + 2 = 4.", "ref_b": "2 + 2 = 5."}
    [views] = source.views([Rollout(row=row, prompt=row["prompt"], completion="4", completion_ids=[1])])
    assert [v.name for v in views] == ["ref_a", "ref_b"]
    assert "2 + 2 = 4." in views[0].context[-1]["content"] and "2 + 2 = 5." in views[1].context[-1]["content"]
    with pytest.raises(ValueError, match="empty 'ref_b'"):
        source.views([Rollout(row={**row, "ref_b": " "}, prompt=row["prompt"], completion="4", completion_ids=[1])])
    with pytest.raises(ValueError, match="names no column"):
        MultiView(views=["column:"])
