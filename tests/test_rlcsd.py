"""RLCSD (selfdistill.methods.rlcsd): the contrastive signal, the sign-anchored advantages and the two-path GRPO loss
against a brute-force float64 reference, values and gradients; the views it builds; a trainer that trains with it."""

import math

import pytest
import torch
from conftest import build_dataset, build_model
from test_trainer import make_args

from selfdistill import SelfDistillTrainer
from selfdistill.methods.rlcsd import ContrastiveHints, contrastive_advantages
from selfdistill.sources import Rollout
from selfdistill.step import policy_gradient_term

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def _reference(logits, view_logits, real, tokens, token_adv, lam, tau, delta, eta, eps=0.2):
    """Token by token, in Python floats (float64) where the method has no gradient."""
    n = len(tokens)
    rows = []
    for t in range(n):
        y = int(tokens[t])
        logps = [float(v[t][y] - torch.logsumexp(v[t], 0)) for v in view_logits]
        wrong = [math.exp(lp) for lp, ok in zip(logps[1:], real[:, t].tolist()) if ok]
        e = logps[0] - math.log(sum(wrong) / len(wrong)) if wrong else 0.0
        r = lam * math.tanh(e / tau)
        a = float(token_adv[t])
        selected = abs(r) > delta
        if selected:
            a = max(0.0, a + r) if token_adv[t] > 0 else min(0.0, a + r) if token_adv[t] < 0 else 0.0
        rows.append((selected, a))
    n_sel = sum(s for s, _ in rows)
    total = 0.0
    for t, (selected, a) in enumerate(rows):
        logp = logits[t][int(tokens[t])] - torch.logsumexp(logits[t], 0)
        ratio = torch.exp(logp - logp.detach())  # fresh rollouts: ratio 1, gradient -a * grad log p
        surrogate = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
        total = total + (eta * surrogate / n_sel if selected else surrogate / (n - n_sel))
    return total, rows


@pytest.mark.parametrize("lam, tau, delta, eta", [(0.5, 0.02, 0.02, 1.0), (0.3, 1.0, 0.1, 2.0)])
def test_two_path_loss_matches_a_float64_reference(lam, tau, delta, eta):
    torch.manual_seed(0)
    n, vocab, k = 10, 6, 3
    logits = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    view_logits = torch.randn(1 + k, n, vocab, dtype=torch.float64) * 1.5
    tokens = torch.randint(0, vocab, (n,))
    counts, advantages = [4, 3, 3], [0.9, -1.1, 0.0]
    real_rows = [[True, True, False], [True, False, False], [False, False, False]]  # rollout 3: no wrong hint
    real = torch.tensor(real_rows).T.repeat_interleave(torch.tensor(counts), dim=1)
    token_adv = torch.tensor(advantages, dtype=torch.float64).repeat_interleave(torch.tensor(counts))
    view_logp = torch.log_softmax(view_logits, -1).gather(-1, tokens.expand(1 + k, n)[..., None])[..., 0]

    contrast = contrastive_advantages(token_adv, view_logp, real, lam, tau, delta, eta)
    pg, _ = policy_gradient_term(logits, tokens, advantages, counts, None, 0.2, None,
                                 shape=lambda adv, logp: (contrast.advantages, contrast.metrics))
    ours = (pg * contrast.scale).sum() / n  # the trainer's reduction: sum / the step's token count
    reference, rows = _reference(logits, view_logits, real, tokens, token_adv, lam, tau, delta, eta)
    torch.testing.assert_close(contrast.advantages, torch.tensor([a for _, a in rows], dtype=torch.float64))
    assert contrast.scale.shape == (n,) and 0 < sum(s for s, _ in rows) < n  # both paths are exercised
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(ours, logits)
    (expected,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_the_signal_never_flips_the_verifiers_direction_and_cancels_a_style_shift():
    # A token both hints make equally likely (a style shift any hint causes) carries no contrast: not selected.
    same = torch.tensor([[-0.5], [-0.5]], dtype=torch.float64)
    out = contrastive_advantages(torch.tensor([1.0], dtype=torch.float64), same, torch.tensor([[True]]))
    assert out.advantages.tolist() == [1.0] and out.metrics["rlcsd/selected_fraction"] == 0.0
    # The correct hint likes the token far more: a wrong rollout's push-down shrinks, but never turns positive.
    liked = torch.tensor([[-0.1], [-4.0]], dtype=torch.float64)
    down = contrastive_advantages(torch.tensor([-0.3], dtype=torch.float64), liked, torch.tensor([[True]]))
    assert down.advantages.tolist() == [0.0]
    up = contrastive_advantages(torch.tensor([0.3], dtype=torch.float64), liked, torch.tensor([[True]]))
    assert up.advantages.tolist() == pytest.approx([0.8])


def _rollouts(rewards, groups):
    return [Rollout(row={"solution": "2 + 3 = 5"}, prompt=PROMPT, completion=f"attempt {i}", completion_ids=[i],
                    reward=r, group=g) for i, (r, g) in enumerate(zip(rewards, groups))]


def test_the_wrong_hints_are_wrong_siblings_never_the_rollout_itself():
    source = ContrastiveHints(wrong_hints=4)
    views = source.views(_rollouts([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0, 0, 0, 0, 1, 1, 1, 1]))
    assert all(len(v) == 4 for v in views)  # 1 + min(4, G - 1) views for every rollout
    assert [v.pi for v in views[0]][1:3] == ["attempt 1", "attempt 2"] and views[0][0].pi == "2 + 3 = 5"
    assert [v.pi for v in views[1] if v.trains][1:] == ["attempt 2"]  # its own text is never its hint
    assert [v.trains for v in views[3]] == [True, True, True, False]  # a placeholder is left out of the contrast
    assert [v.trains for v in views[7]] == [True, False, False, False]  # the group's only wrong rollout: no contrast
    assert "Here is a reference solution:\nattempt 1" in views[0][1].context[-1]["content"]
    assert source.metrics() == {"rlcsd/wrong_hint_fraction": 7 / 8}
    with pytest.raises(ValueError, match="delta=0.6 must be in"):
        ContrastiveHints(delta=0.6)


def test_a_trainer_trains_with_rlcsd(tmp_path, tokenizer):
    def reward(prompts, completions, answer, **kw):
        return [float(i % 2) for i in range(len(completions))]  # a wrong sibling in every group

    with pytest.raises(ValueError, match="reshapes the GRPO term's per-token advantages, but grpo_weight=0"):
        SelfDistillTrainer(model="no-such-model", args=make_args(tmp_path), train_dataset=build_dataset(),
                           processing_class=tokenizer, privileged=ContrastiveHints(), reward_funcs=[reward])
    trainer = SelfDistillTrainer(
        model=build_model(tokenizer), args=make_args(tmp_path, max_steps=2, grpo_weight=1, distill_weight=0,
                                                     num_generations=4, per_device_train_batch_size=8),
        train_dataset=build_dataset(), processing_class=tokenizer, privileged=ContrastiveHints(tau=1.0, delta=0.001),
        reward_funcs=[reward])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rlcsd/selected_fraction" in h]
    assert len(logged) == 2 and all(h["rlcsd/contrast_fraction"] == 1.0 for h in logged)
    assert any(h["rlcsd/selected_fraction"] > 0 for h in logged)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_the_trainers_loss_is_the_two_path_reduction_of_its_own_tensors(tmp_path, tokenizer):
    """compute_loss end to end: the loss equals grpo_weight * (mean over unselected tokens + eta * mean over selected
    tokens of the clipped surrogate) * N / normalizer, recomputed in float64 from the teacher's log-probs and the
    student's logits the trainer used, with the contrast, selection and sign-anchoring written out again here."""
    from selfdistill import trainer as trainer_module

    def reward(prompts, completions, answer, **kw):
        return [float(i % 2) for i in range(len(completions))]  # a wrong sibling in every group

    lam, tau, delta, eta, weight = 0.5, 0.01, 0.1, 2.0, 0.7  # the tiny model's |e_t| ~ 0.003
    trainer = SelfDistillTrainer(
        model=build_model(tokenizer), args=make_args(tmp_path, grpo_weight=weight, distill_weight=0, num_generations=4,
                                                     per_device_train_batch_size=8),
        train_dataset=build_dataset(), processing_class=tokenizer, reward_funcs=[reward],
        privileged=ContrastiveHints(lam=lam, tau=tau, delta=delta, eta=eta))
    rows = [row for row in build_dataset(2).to_list() for _ in range(4)]
    inputs = trainer._make_rollouts(rows, "train", 1)[0]
    seen = {}
    real_shape, real_pg = trainer.privileged.shape_advantages, trainer_module.policy_gradient_term

    def shape_spy(adv, view_logp, view_trains):
        seen.update(view_logp=view_logp.detach().double(), real=view_trains[1:].clone())
        return real_shape(adv, view_logp, view_trains)

    def pg_spy(logits, tokens, advantages, counts, old, *args, **kwargs):
        seen.update(logits=logits.detach().double(), tokens=tokens, advantages=advantages, counts=counts, old=old)
        return real_pg(logits, tokens, advantages, counts, old, *args, **kwargs)

    trainer.privileged.shape_advantages = shape_spy
    trainer_module.policy_gradient_term = pg_spy
    try:
        loss = trainer.compute_loss(trainer.model, inputs)
    finally:
        trainer_module.policy_gradient_term = real_pg

    n = len(seen["tokens"])
    adv = torch.tensor(seen["advantages"], dtype=torch.float64).repeat_interleave(torch.tensor(seen["counts"]))
    logp = torch.log_softmax(seen["logits"], -1).gather(-1, seen["tokens"][:, None])[:, 0]
    old = logp if seen["old"] is None else seen["old"].double()
    per_token, selected = [], []
    for t in range(n):
        lps = seen["view_logp"][:, t].tolist()
        wrong = [math.exp(lp) for lp, ok in zip(lps[1:], seen["real"][:, t].tolist()) if ok]
        e = lps[0] - math.log(sum(wrong) / len(wrong)) if wrong else 0.0
        r = lam * math.tanh(e / tau)
        a = float(adv[t])
        if abs(r) > delta:
            a = max(0.0, a + r) if adv[t] > 0 else min(0.0, a + r) if adv[t] < 0 else 0.0
        selected.append(abs(r) > delta)
        ratio = math.exp(float(logp[t] - old[t]))
        per_token.append(-min(ratio * a, min(max(ratio, 0.8), 1.2) * a))
    sel = [p for p, s in zip(per_token, selected) if s]
    unsel = [p for p, s in zip(per_token, selected) if not s]
    assert sel and unsel, "both paths must be exercised"
    expected = weight * (sum(unsel) / len(unsel) + eta * sum(sel) / len(sel)) * n / inputs["normalizer"]
    assert seen["real"].any()  # the contrast existed
    torch.testing.assert_close(loss.detach().double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
