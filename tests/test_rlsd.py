"""RLSD (selfdistill.methods.rlsd): the per-token weights and the reshaped GRPO term against a brute-force float64
reference, values and gradients; its switches and errors; a trainer that trains with it."""

import math

import pytest
import torch
from conftest import build_dataset, build_model
from test_trainer import make_args

from selfdistill import ReferenceSolution, SelfDistillConfig, SelfDistillTrainer
from selfdistill.grpo import policy_gradient_losses
from selfdistill.methods.avsd.source import MultiView
from selfdistill.methods.rlsd import rlsd_advantages, rlsd_weights
from selfdistill.step import policy_gradient_term


def _reference_loss(logits, teacher_logits, tokens, token_adv, old_logp, lam, eps_w, eps):
    """Token by token, in plain Python floats (float64): w, A_t, and the clipped surrogate."""
    losses = []
    for t in range(len(tokens)):
        y = int(tokens[t])
        s_row, t_row = logits[t], teacher_logits[t]
        log_z = torch.logsumexp(s_row, 0)
        logp = s_row[y] - log_z  # keeps the graph: the gradient flows through the student's log-prob only
        teacher_logp = float(t_row[y] - torch.logsumexp(t_row, 0))
        a = float(token_adv[t])
        sign = (a > 0) - (a < 0)
        w = min(max(math.exp(sign * (teacher_logp - logp.item())), 1 - eps_w), 1 + eps_w)
        shaped = a * ((1 - lam) + lam * w)
        ratio = torch.exp(logp - (logp.item() if old_logp is None else float(old_logp[t])))
        clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
        losses.append(-torch.minimum(ratio * shaped, clipped * shaped))
    return torch.stack(losses)


@pytest.mark.parametrize("lam, eps_w", [(0.5, 0.2), (1.0, 0.5), (0.0, 0.2)])
@pytest.mark.parametrize("stale", [False, True])
def test_reshaped_grpo_term_matches_a_float64_reference(lam, eps_w, stale):
    torch.manual_seed(0)
    n, vocab = 9, 7
    logits = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, vocab, dtype=torch.float64) * 2
    tokens = torch.randint(0, vocab, (n,))
    advantages, counts = [1.3, -0.7, 0.0], [4, 3, 2]
    token_adv = torch.tensor(advantages, dtype=torch.float64).repeat_interleave(torch.tensor(counts))
    old = (torch.log_softmax(logits.detach(), -1).gather(-1, tokens[:, None])[:, 0]
           + 0.3 * torch.randn(n, dtype=torch.float64)) if stale else None

    teacher_logp = torch.log_softmax(teacher, -1).gather(-1, tokens[:, None])[:, 0]
    ours, metrics = policy_gradient_term(
        logits, tokens, advantages, counts, old, 0.2, None,
        shape=lambda adv, logp: rlsd_advantages(adv, teacher_logp, logp, lam, eps_w))
    reference = _reference_loss(logits, teacher, tokens, token_adv, old, lam, eps_w, 0.2)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    (expected,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert 1 - eps_w <= metrics["rlsd/weight_mean"] <= 1 + eps_w


def test_the_weights_scale_but_never_flip_the_advantage_and_carry_no_gradient():
    torch.manual_seed(1)
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, 0.0])
    teacher = torch.tensor([-0.1, -5.0, -0.1, -5.0, -0.1], requires_grad=True)
    student = torch.tensor([-2.0, -1.0, -2.0, -1.0, -2.0], requires_grad=True)
    w = rlsd_weights(adv, teacher, student, 0.2)
    # the teacher likes token 0 more than the student: a correct rollout's token is pushed up harder (1.2), a
    # wrong rollout's same token less hard (0.8); the opposite for the token the teacher dislikes
    assert w.tolist() == pytest.approx([1.2, 0.8, 0.8, 1.2, 1.0])  # A = 0: no direction, weight 1
    shaped, _ = rlsd_advantages(adv, teacher, student, 0.5, 0.2)
    assert torch.equal(torch.sign(shaped), torch.sign(adv))
    assert shaped.tolist() == pytest.approx([2.2, 1.8, -0.9, -1.1, 0.0])
    assert not shaped.requires_grad  # the magnitude is a stop-gradient signal
    plain, _ = rlsd_advantages(adv, teacher, student, 0.0, 0.2)
    assert torch.equal(plain, adv)  # lambda 0: GRPO's advantages
    loss, _ = policy_gradient_losses(torch.zeros(5, requires_grad=True), shaped)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("overrides, message", [
    (dict(rlsd_lambda=0.5), "reshapes the GRPO term's advantages, but grpo_weight=0"),
    (dict(rlsd_lambda=1.5, grpo_weight=1, num_generations=2), "rlsd_lambda=1.5 must be in [0, 1]"),
    (dict(rlsd_lambda=0.5, rlsd_epsilon=1.0, grpo_weight=1, num_generations=2), "rlsd_epsilon=1.0 must be in (0, 1)"),
])
def test_rlsd_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        SelfDistillConfig(output_dir=str(tmp_path), **overrides)
    assert message in str(err.value)


def test_rlsd_needs_a_single_view_source(tmp_path, tokenizer):
    args = make_args(tmp_path, rlsd_lambda=0.5, grpo_weight=1, distill_weight=0)
    source = MultiView(views=["full_solution", "answer_only"], column="solution", answer_column="answer")
    with pytest.raises(ValueError, match="weights each token by one teacher view, but MultiView gives several"):
        SelfDistillTrainer(model="no-such-model", args=args, train_dataset=build_dataset(), processing_class=tokenizer,
                           privileged=source, reward_funcs=[lambda completions, **kw: [1.0] * len(completions)])


def test_a_trainer_trains_with_rlsd_alone(tmp_path, tokenizer):
    """distill_weight=0: the teacher pass still runs (it weighs the tokens), the loss is the reshaped GRPO term."""
    def reward(prompts, completions, answer, **kw):
        return [float(i % 2) for i in range(len(completions))]  # a spread in every group: non-zero advantages

    trainer = SelfDistillTrainer(model=build_model(tokenizer), args=make_args(
        tmp_path, max_steps=2, rlsd_lambda=0.5, grpo_weight=1, distill_weight=0), train_dataset=build_dataset(),
        processing_class=tokenizer, privileged=ReferenceSolution(column="solution"), reward_funcs=[reward])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rlsd/weight_mean" in h]
    assert len(logged) == 2 and all(0.8 <= h["rlsd/weight_mean"] <= 1.2 for h in logged)
    assert all("time/teacher" in h for h in logged) and "divergence" not in logged[0]
    assert all(0.0 <= h["divergence/digit_share"] <= 1.0 for h in logged)  # of RLSD's teacher-student log-ratio
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_lambda_decays_to_grpo_when_asked():
    from selfdistill.methods.rlsd import rlsd_lambda_at

    assert [rlsd_lambda_at(0.5, s, None) for s in (0, 49, 500)] == [0.5, 0.5, 0.5]
    assert [rlsd_lambda_at(0.5, s, 50) for s in (0, 25, 50, 80)] == [0.5, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="rlsd_decay_steps=0 must be >= 1"):
        SelfDistillConfig(output_dir="x", rlsd_decay_steps=0)


@pytest.mark.parametrize("mask", [False, True])
def test_truncated_completions_leave_the_grpo_term_when_masked(tmp_path, tokenizer, mask):
    """mask_truncated_completions: a rollout cut at max_completion_length gets advantage 0 (GRPOConfig's switch). The
    tiny model never ends within 2 tokens, so with the mask every advantage is 0 and nothing moves."""
    def reward(prompts, completions, answer, **kw):
        return [float(i % 2) for i in range(len(completions))]  # a spread in every group

    trainer = SelfDistillTrainer(model=build_model(tokenizer), args=make_args(
        tmp_path, max_steps=2, max_completion_length=2, rlsd_lambda=0.5, grpo_weight=1, distill_weight=0,
        mask_truncated_completions=mask), train_dataset=build_dataset(), processing_class=tokenizer,
        privileged=ReferenceSolution(column="solution"), reward_funcs=[reward])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "grpo/advantage_abs" in h]
    assert len(logged) == 2 and all(h["completions/clipped_ratio"] == 1.0 for h in logged)
    moved = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    if mask:
        assert all(h["grpo/advantage_abs"] == 0.0 for h in logged) and not moved
    else:
        assert all(h["grpo/advantage_abs"] > 0.5 for h in logged) and moved
