"""The fused, chunked head+loss against the dense path in float64: values and gradients, every variant."""

import itertools

import pytest
import torch

from selfdistill.fused import fused_token_losses, output_head
from selfdistill.losses import LossSpec, token_losses

N, H, V = 7, 5, 13

SPECS = [
    LossSpec(divergence=d, support="full", clip=c, clip_tau=tau)
    for d, (c, tau) in itertools.product(
        ["reverse_kl", "forward_kl", "jsd"], [("none", 1.0), ("entry", 0.05), ("token", 0.3), ("scale", 0.3)]
    )
] + [
    LossSpec(support="topk", top_k=4, topk_from="union", tail_bucket=True, clip="scale", clip_tau=0.3),
    LossSpec(support="topk", top_k=4, topk_from="teacher", tail_bucket=False, clip="entry", clip_tau=0.05),
    LossSpec(support="sampled", clip="scale", clip_tau=0.3),
]


def _inputs(seed, shared_head=False, old=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    teacher_weight = weight.detach() if shared_head else torch.randn(V, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (N,), generator=g)
    old_logps = -torch.rand(N, generator=g, dtype=torch.float64) * 3 if old else None
    return hidden, weight, teacher_hidden, teacher_weight, tokens, old_logps


def _dense(hidden, weight, teacher_hidden, teacher_weight, tokens, spec, old_logps):
    return token_losses(hidden @ weight.T, teacher_hidden @ teacher_weight.T, tokens, spec, old_logps)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.divergence}-{s.support}-{s.clip}")
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("uniform", [True, False])
def test_fused_matches_dense(spec, chunk_size, uniform):
    hidden, weight, teacher_hidden, teacher_weight, tokens, old = _inputs(0, old=not uniform)
    per_token = torch.rand(N, dtype=torch.float64) if not uniform else torch.full((N,), 0.125, dtype=torch.float64)

    dense = _dense(hidden, weight, teacher_hidden, teacher_weight, tokens, spec, old)
    (dense.loss * per_token).sum().backward()
    dense_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    fused = fused_token_losses(hidden, weight, teacher_hidden, teacher_weight, tokens, spec, old, chunk_size)
    (fused.loss * per_token).sum().backward()
    for key in ("loss", "divergence", "clipped", "ratio", "ratio_clipped", "logp_gap"):
        torch.testing.assert_close(getattr(fused, key), getattr(dense, key).detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hidden.grad, dense_grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, dense_grads[1], rtol=1e-10, atol=1e-12)


def test_shared_head_and_frozen_head():
    hidden, weight, teacher_hidden, _, tokens, _ = _inputs(1, shared_head=True)
    spec = LossSpec()
    dense = _dense(hidden, weight, teacher_hidden, weight.detach(), tokens, spec, None)
    dense.loss.sum().backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    fused_token_losses(hidden, weight, teacher_hidden, weight, tokens, spec, chunk_size=2).loss.sum().backward()
    torch.testing.assert_close(hidden.grad, expected[0])
    torch.testing.assert_close(weight.grad, expected[1])
    # a frozen head: only the hidden states get a gradient
    hidden.grad = None
    frozen = weight.detach()
    fused_token_losses(hidden, frozen, teacher_hidden, frozen, tokens, spec, chunk_size=2).loss.sum().backward()
    torch.testing.assert_close(hidden.grad, expected[0])


def test_no_grad_and_empty_inputs():
    hidden, weight, teacher_hidden, teacher_weight, tokens, _ = _inputs(2)
    with torch.no_grad():
        out = fused_token_losses(hidden, weight, teacher_hidden, teacher_weight, tokens, LossSpec(), chunk_size=4)
    dense = _dense(hidden, weight, teacher_hidden, teacher_weight, tokens, LossSpec(), None)
    torch.testing.assert_close(out.loss, dense.loss.detach())
    empty = fused_token_losses(hidden[:0], weight, teacher_hidden[:0], teacher_weight, tokens[:0], LossSpec())
    assert empty.loss.shape == (0,)


def test_shape_errors_name_the_problem():
    hidden, weight, teacher_hidden, teacher_weight, tokens, _ = _inputs(3)
    with pytest.raises(ValueError, match="same completion positions"):
        fused_token_losses(hidden, weight, teacher_hidden[:3], teacher_weight, tokens, LossSpec())
    with pytest.raises(ValueError, match="vocab, hidden"):
        fused_token_losses(hidden, weight[:, :2], teacher_hidden, teacher_weight, tokens, LossSpec())


def test_output_head_refuses_logit_transforms(tokenizer):
    from conftest import build_model

    model = build_model(tokenizer)
    assert output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        output_head(model)


@pytest.mark.parametrize("policy", ["initial", "live"])
def test_trainer_fused_equals_dense(tmp_path, tokenizer, policy):
    from conftest import build_model
    from test_trainer import make_trainer

    def run(fused):
        trainer = make_trainer(tmp_path / str(fused), tokenizer, model=build_model(tokenizer), max_steps=2,
                               fused_loss=fused, loss_chunk_size=5, teacher_policy=policy)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    dense_logs, dense_params = run(False)
    fused_logs, fused_params = run(True)
    for a, b in zip(dense_logs, fused_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-4, abs=1e-6)
    for name in dense_params:
        # Adam amplifies float-order differences of near-zero gradients a little; losses match to 1e-4 above
        torch.testing.assert_close(fused_params[name], dense_params[name], rtol=1e-3, atol=2e-4)


def test_trainer_refuses_fused_with_several_views(tmp_path, tokenizer):
    from conftest import build_dataset, build_model
    from test_trainer import exact_reward, make_args

    from selfdistill import SelfDistillTrainer
    from selfdistill.sources import MultiView

    with pytest.raises(ValueError, match="fused_loss=True is not available with a multi-view source"):
        SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path, fused_loss=True),
                           train_dataset=build_dataset(), processing_class=tokenizer, privileged=MultiView(),
                           reward_funcs=[exact_reward])
