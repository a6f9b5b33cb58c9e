"""Every loss variant against a brute-force float64 reference: values and gradients."""

import itertools
import math

import pytest
import torch

from selfdistill.losses import LossSpec, distillation_loss, importance_ratio

N, V = 5, 7


def brute_terms(ps, pt, spec):
    """Per-entry divergence terms from scalar student (with grad) and teacher log-probs, in float64."""
    terms = []
    for a, b in zip(ps, pt):
        if spec.divergence == "reverse_kl":
            terms.append(torch.exp(a) * (a - b))
        elif spec.divergence == "forward_kl":
            terms.append(math.exp(b) * (b - a))
        else:
            beta = spec.jsd_beta
            log_mix = torch.log(beta * math.exp(b) + (1 - beta) * torch.exp(a))
            terms.append(beta * math.exp(b) * (b - log_mix) + (1 - beta) * torch.exp(a) * (a - log_mix))
    return terms


def brute_clip(terms, spec):
    """One token's loss from its divergence terms under the spec's clip."""
    if spec.clip == "entry":
        return sum(torch.clamp(x, max=spec.clip_tau) for x in terms)
    if spec.clip == "token":
        return torch.clamp(sum(terms), max=spec.clip_tau)
    if spec.clip == "scale":
        d = float(sum(terms).detach())
        return sum(terms) * min(1.0, spec.clip_tau / d) if d > 0 else sum(terms)
    return sum(terms)


def _brute_force(student_logits, teacher_logits, tokens, spec, old_logps=None):
    """Loops over tokens and vocabulary entries with scalar float64 math, written from METHODS.md §1."""
    total = 0.0
    for i in range(student_logits.shape[0]):
        zs = [student_logits[i, v] for v in range(V)]
        zt = [float(teacher_logits[i, v]) for v in range(V)]
        zmax = max(float(z.detach()) for z in zs)
        log_zs = zmax + torch.log(sum(torch.exp(z - zmax) for z in zs))
        ls = [z - log_zs for z in zs]
        log_zt = math.log(sum(math.exp(z) for z in zt))
        lt = [z - log_zt for z in zt]
        y = int(tokens[i])
        weight = 1.0
        if old_logps is not None and spec.ratio_clip is not None:
            weight = min(math.exp(max(min(float(ls[y].detach()) - float(old_logps[i]), 20.0), -20.0)), spec.ratio_clip)
        if spec.support == "sampled":
            delta = float(ls[y].detach()) - lt[y]
            coef = min(delta, spec.clip_tau) if spec.clip in ("token", "scale") else delta
            total = total + weight * (coef + coef * (ls[y] - float(ls[y].detach())))
            continue
        if spec.support == "full":
            entries = list(range(V))
        else:
            k = spec.top_k
            top_s = sorted(range(V), key=lambda v: -float(ls[v].detach()))[:k]
            top_t = sorted(range(V), key=lambda v: -lt[v])[:k]
            entries = {"student": top_s, "teacher": top_t, "union": sorted(set(top_s) | set(top_t))}[spec.topk_from]
        ps = [ls[v] for v in entries]
        pt = [lt[v] for v in entries]
        if spec.support == "topk":
            if spec.tail_bucket:
                ps.append(torch.log(1 - sum(torch.exp(x) for x in ps)))
                pt.append(math.log(1 - sum(math.exp(x) for x in pt)))
            else:
                cs = torch.log(sum(torch.exp(x) for x in ps))
                ct = math.log(sum(math.exp(x) for x in pt))
                ps = [x - cs for x in ps]
                pt = [x - ct for x in pt]
        total = total + weight * brute_clip(brute_terms(ps, pt, spec), spec)
    return total / student_logits.shape[0]


def _inputs(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).requires_grad_()
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    tokens = torch.randint(0, V, (N,), generator=g)
    old = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64), -1).gather(-1, tokens[:, None])[:, 0]
    return student, teacher, tokens, old


VARIANTS = [
    LossSpec(divergence=d, support=s, top_k=3, topk_from=src, tail_bucket=tail, clip=c, clip_tau=tau, jsd_beta=0.3)
    for d, s, src, tail, c, tau in itertools.product(
        ["reverse_kl", "forward_kl", "jsd"],
        ["full", "topk"],
        ["student", "teacher", "union"],
        [True, False],
        ["none", "entry", "token", "scale"],
        [0.05, 0.4],
    )
    if not (s == "full" and (src != "student" or not tail))
] + [
    LossSpec(divergence="reverse_kl", support="sampled", clip=c, clip_tau=0.3) for c in ["none", "token", "scale"]
]


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda s: f"{s.divergence}-{s.support}-{s.topk_from}-"
                         f"{'tail' if s.tail_bucket else 'renorm'}-{s.clip}{s.clip_tau}")
@pytest.mark.parametrize("with_ratio", [False, True])
def test_loss_matches_brute_force(spec, with_ratio):
    student, teacher, tokens, old = _inputs()
    old_logps = old if with_ratio else None
    spec = LossSpec(**{**spec.__dict__, "ratio_clip": 1.3})
    got = distillation_loss(student, teacher, tokens, spec, old_logps=old_logps).loss
    (grad_got,) = torch.autograd.grad(got, student)
    student_ref = student.detach().clone().requires_grad_()
    want = _brute_force(student_ref, teacher, tokens, spec, old_logps)
    (grad_want,) = torch.autograd.grad(want, student_ref)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-9, atol=1e-12)


def test_reverse_kl_direction_two_tokens():
    # Student certain of token 0, teacher 50/50: KL(S||T) = log 2 / ... computed by hand, KL(T||S) is large.
    p_s = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    p_t = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    tokens = torch.tensor([0])
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert abs(reverse - forward) > 0.1  # the example separates the two directions
    for divergence, want in [("reverse_kl", reverse), ("forward_kl", forward)]:
        spec = LossSpec(divergence=divergence, clip="none", ratio_clip=None)
        got = distillation_loss(p_s.log(), p_t.log(), tokens, spec).loss.item()
        assert got == pytest.approx(want, rel=1e-12)
    # torch's kl_div(input, target) is KL(target || input): the trap the test guards against.
    trap = torch.nn.functional.kl_div(p_s.log(), p_t, reduction="sum").item()
    assert trap == pytest.approx(forward, rel=1e-12)


def test_equal_distributions_give_zero_loss_and_gradient():
    student, _, tokens, _ = _inputs(3)
    for d in ["reverse_kl", "forward_kl", "jsd"]:
        spec = LossSpec(divergence=d, clip="none")
        out = distillation_loss(student, student.detach(), tokens, spec)
        (grad,) = torch.autograd.grad(out.loss, student)
        assert abs(out.loss.item()) < 1e-12
        assert grad.abs().max().item() < 1e-12


def test_reverse_kl_gradient_moves_student_towards_teacher():
    student, teacher, tokens, _ = _inputs(4)
    spec = LossSpec(clip="none")
    before = distillation_loss(student, teacher, tokens, spec).loss
    (grad,) = torch.autograd.grad(before, student)
    after = distillation_loss(student.detach() - 0.1 * grad, teacher, tokens, spec).loss
    assert after.item() < before.item()


def test_normalizer_is_the_global_token_count():
    student, teacher, tokens, _ = _inputs(5)
    spec = LossSpec(clip="none")
    whole = distillation_loss(student, teacher, tokens, spec).loss
    parts = sum(
        distillation_loss(student[i : i + 2], teacher[i : i + 2], tokens[i : i + 2], spec, normalizer=N).loss
        for i in range(0, N, 2)
    )
    torch.testing.assert_close(whole, parts)


def test_entry_clip_can_make_the_token_loss_negative_and_counts_clips():
    student, teacher, tokens, _ = _inputs(6, scale=4.0)
    out = distillation_loss(student, teacher, tokens, LossSpec(clip="entry", clip_tau=0.01))
    assert out.metrics["clip_fraction"] > 0
    assert (out.tokens.loss <= out.tokens.divergence + 1e-12).all()


def test_importance_ratio_is_capped_and_detached():
    s = torch.tensor([0.0, -1.0, -3.0], requires_grad=True)
    old = torch.tensor([-2.0, -1.0, -1.0])
    ratio, hit = importance_ratio(s, old, cap=2.0)
    torch.testing.assert_close(ratio, torch.tensor([2.0, 1.0, math.exp(-2.0)]))
    assert hit.tolist() == [1.0, 0.0, 0.0]
    assert not ratio.requires_grad


def test_bad_specs_name_the_fix():
    with pytest.raises(ValueError, match="outside \\(0, 1\\)"):
        LossSpec(divergence="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="use clip='token'"):
        LossSpec(support="sampled", clip="entry")
    with pytest.raises(ValueError, match="not one of"):
        LossSpec(divergence="kl")
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), LossSpec())


def test_scale_clip_keeps_the_direction_the_cap_drops():
    student, teacher, tokens, _ = _inputs(7, scale=4.0)
    cap = distillation_loss(student, teacher, tokens, LossSpec(clip="token", clip_tau=0.01, ratio_clip=None))
    scale = distillation_loss(student, teacher, tokens, LossSpec(clip="scale", clip_tau=0.01, ratio_clip=None))
    torch.testing.assert_close(cap.loss, scale.loss)  # same value
    (g_cap,) = torch.autograd.grad(cap.loss, student)
    (g_scale,) = torch.autograd.grad(scale.loss, student)
    assert g_cap.abs().max() == 0 and g_scale.abs().max() > 0  # every token capped: only scale still learns
