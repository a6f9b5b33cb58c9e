"""Teacher-weights policies: initial never moves, ema moves by its rate, sync copies on step k, live is the student."""

import pytest
import torch
from conftest import build_model

from selfdistill.teacher import TeacherWeights


def _nudge(model, amount=1.0):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _teacher_params(teacher, model):
    with teacher.scoring(model):
        return _snapshot(model)


def test_initial_never_moves(tokenizer):
    model = build_model(tokenizer)
    start = _snapshot(model)
    teacher = TeacherWeights(model, "initial")
    for step in range(1, 4):
        _nudge(model)
        assert not teacher.update(model, step)
    for name, value in _teacher_params(teacher, model).items():
        assert torch.equal(value, start[name])
    torch.testing.assert_close(_snapshot(model)["lm_head.weight"], start["lm_head.weight"] + 3)


def test_ema_moves_by_its_rate(tokenizer):
    model = build_model(tokenizer)
    start = _snapshot(model)
    teacher = TeacherWeights(model, "ema", ema_rate=0.25, update_every=2)
    _nudge(model, 1.0)
    assert not teacher.update(model, 1)  # not an update step
    assert teacher.update(model, 2)
    got = _teacher_params(teacher, model)
    for name in start:
        # theta_T = 0.75 * theta_0 + 0.25 * (theta_0 + 1) = theta_0 + 0.25
        torch.testing.assert_close(got[name], start[name] + 0.25)


def test_sync_copies_on_step_k(tokenizer):
    model = build_model(tokenizer)
    start = _snapshot(model)
    teacher = TeacherWeights(model, "sync", update_every=3)
    _nudge(model)
    for step in (1, 2):
        teacher.update(model, step)
        assert torch.equal(_teacher_params(teacher, model)["lm_head.weight"], start["lm_head.weight"])
    teacher.update(model, 3)
    assert torch.equal(_teacher_params(teacher, model)["lm_head.weight"], start["lm_head.weight"] + 1)


def test_live_is_the_student(tokenizer):
    model = build_model(tokenizer)
    teacher = TeacherWeights(model, "live")
    _nudge(model, 0.5)
    with teacher.scoring(model) as scorer:
        assert scorer is model
        assert not torch.is_grad_enabled()
    assert teacher.state_dict() == {}


def test_scoring_restores_the_student_even_after_an_error(tokenizer):
    model = build_model(tokenizer)
    teacher = TeacherWeights(model, "initial")
    _nudge(model)
    student = _snapshot(model)
    with pytest.raises(RuntimeError):
        with teacher.scoring(model):
            raise RuntimeError("boom")
    for name, value in _snapshot(model).items():
        assert torch.equal(value, student[name])


def test_teacher_pass_keeps_train_mode(tokenizer):
    model = build_model(tokenizer)
    model.train()
    teacher = TeacherWeights(model, "initial")
    with teacher.scoring(model) as scorer:
        assert scorer.training  # never .eval() shared weights: it would switch the student's dropout off


def test_state_round_trip(tokenizer):
    model = build_model(tokenizer)
    teacher = TeacherWeights(model, "ema", ema_rate=0.5)
    _nudge(model)
    teacher.update(model, 1)
    state = teacher.state_dict()
    other = TeacherWeights(build_model(tokenizer, seed=1), "ema")
    other.load_state_dict(state)
    for name, value in state.items():
        assert torch.equal(other.params[name], value)
    with pytest.raises(KeyError, match="lacks"):
        other.load_state_dict({})
