"""Multi-view combination (AVSD) against a brute-force float64 reference: values and gradients."""

import itertools
import math

import pytest
import torch
from test_losses import brute_clip, brute_terms

from selfdistill.losses import LossSpec, token_losses
from selfdistill.methods.avsd.combine import (
    ViewSpec,
    candidate_support,
    combine_views,
    multiview_summary,
    multiview_token_losses,
    view_weights,
)

N, V, TOP_K = 5, 11, 3
EPS = 1e-6


# ---------------------------------------------------------------- brute force: scalar loops, written from the paper


def _log_softmax_floats(row):
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


def _student_log_softmax(row):
    """One row of student log-probs as scalar tensors that carry the gradient."""
    zmax = max(float(z.detach()) for z in row)
    log_z = zmax + torch.log(sum(torch.exp(z - zmax) for z in row))
    return [z - log_z for z in row]


def _brute_combine(s, views, w, eps=EPS):
    """One token or entry: (log q*, log q_g, J, g) from floats."""
    consensus = sum(wv * lv for wv, lv in zip(w, views))
    arithmetic = math.log(sum(wv * math.exp(lv) for wv, lv in zip(w, views)))
    jensen = max(0.0, arithmetic - consensus)
    deltas = [lv - s for lv in views]
    mean_delta = abs(sum(wv * d for wv, d in zip(w, deltas)))
    mean_abs = sum(wv * abs(d) for wv, d in zip(w, deltas))
    gate = mean_delta / (mean_abs + eps) * mean_delta / (mean_delta + jensen + eps)
    return consensus + gate * jensen, consensus, jensen, gate


def _brute_jsd(a, b):
    total = 0.0
    for la, lb in zip(a, b):
        lm = math.log(0.5 * math.exp(la) + 0.5 * math.exp(lb))
        total += 0.5 * math.exp(la) * (la - lm) + 0.5 * math.exp(lb) * (lb - lm)
    return total


def _brute_weights(views, kind, scale=5.0):
    """views: M lists of log-probs on the same (valid) entries."""
    m = len(views)
    if kind == "uniform" or m == 1:
        return [1.0 / m] * m
    mean_jsd = [sum(_brute_jsd(views[v], views[u]) for u in range(m) if u != v) / (m - 1) for v in range(m)]
    expo = [math.exp(-scale * d) for d in mean_jsd]
    return [e / sum(expo) for e in expo]


def _brute_candidates(teacher_rows, y, top_k):
    if top_k == 0:
        return list(range(V))
    ids = {y}
    for row in teacher_rows:
        ids |= set(sorted(range(V), key=lambda v: -row[v])[:top_k])
    return sorted(ids)


def _brute_ratio(s_y, old, spec):
    if old is None or spec.ratio_clip is None:
        return 1.0
    return min(math.exp(max(min(s_y - old, 20.0), -20.0)), spec.ratio_clip)


def _brute_loss(student, views, tokens, spec, view, old_logps=None):
    """The mean token loss of either form, looping over tokens, candidate entries and views."""
    m = views.shape[0]
    total = 0.0
    for i in range(N):
        ls = _student_log_softmax([student[i, v] for v in range(V)])
        lt = [_log_softmax_floats([float(views[k, i, v]) for v in range(V)]) for k in range(m)]
        y = int(tokens[i])
        cand = _brute_candidates(lt, y, view.top_k)
        lv = [_log_softmax_floats([lt[k][c] for c in cand]) for k in range(m)]
        w = _brute_weights(lv, view.weights, view.agreement_scale)
        s_y = float(ls[y].detach())
        ratio = _brute_ratio(s_y, None if old_logps is None else float(old_logps[i]), spec)
        if view.form == "sampled":
            target = _brute_combine(s_y, [lt[k][y] for k in range(m)], w)[0]
            delta = s_y - target
            coef = min(delta, spec.clip_tau) if spec.clip in ("token", "scale") else delta
            total = total + ratio * (coef + coef * (ls[y] - s_y))
            continue
        log_c = torch.log(sum(torch.exp(ls[c]) for c in cand))
        s = [ls[c] - log_c for c in cand]
        target = [_brute_combine(float(s[j].detach()), [lv[k][j] for k in range(m)], w)[0] for j in range(len(cand))]
        target = _log_softmax_floats(target)
        total = total + ratio * brute_clip(brute_terms(s, target, spec), spec)
    return total / N


# ---------------------------------------------------------------- inputs


def _inputs(m, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).requires_grad_()
    views = torch.randn(m, N, V, generator=g, dtype=torch.float64) * scale
    views[1:] = 0.6 * views[:1] + 0.8 * views[1:]  # views partly agree, as teachers with different hints do
    tokens = torch.randint(0, V, (N,), generator=g)
    old = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64), -1).gather(-1, tokens[:, None])[:, 0]
    return student, views, tokens, old


def _check_against_brute_force(m, spec, view, seed=0, with_ratio=False):
    student, views, tokens, old = _inputs(m, seed)
    old_logps = old if with_ratio else None
    got = multiview_token_losses(student, views, tokens, spec, view, old_logps).tokens.loss.mean()
    (grad_got,) = torch.autograd.grad(got, student)
    student_ref = student.detach().clone().requires_grad_()
    want = _brute_loss(student_ref, views, tokens, spec, view, old_logps)
    (grad_want,) = torch.autograd.grad(want, student_ref)
    torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- combine_views and weights


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("per_entry", [False, True])
def test_combine_views_matches_brute_force(m, per_entry):
    torch.manual_seed(m)
    shape = (N, 4) if per_entry else (N,)
    student = torch.randn(shape, dtype=torch.float64) - 2.0
    views = student + torch.randn((m, *shape), dtype=torch.float64)
    weights = torch.softmax(torch.randn(m, N, dtype=torch.float64), 0)
    out = combine_views(student, views, weights)
    for idx in itertools.product(*(range(d) for d in shape)):
        want = _brute_combine(float(student[idx]), [float(views[(k, *idx)]) for k in range(m)],
                              [float(weights[k, idx[0]]) for k in range(m)])
        got = [float(t[idx]) for t in (out.target, out.consensus, out.jensen, out.gate)]
        assert got == pytest.approx(list(want), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(out.weights, weights)


def test_combine_views_detaches_the_student():
    student = torch.randn(N, 3, dtype=torch.float64, requires_grad=True)
    views = torch.randn(2, N, 3, dtype=torch.float64)
    out = combine_views(student, views, torch.full((2, N), 0.5, dtype=torch.float64))
    assert not any(t.requires_grad for t in (out.target, out.consensus, out.jensen, out.gate))


@pytest.mark.parametrize("m", [2, 3])
def test_agreement_weights_match_brute_force(m):
    torch.manual_seed(10 + m)
    k = 6
    valid = torch.rand(N, k) > 0.3
    valid[:, 0] = True
    logits = torch.randn(m, N, k, dtype=torch.float64) * 2
    logp = logits - logits.masked_fill(~valid, float("-inf")).logsumexp(-1, keepdim=True)
    spec = ViewSpec(weights="agreement")
    got = view_weights(logp, valid, spec)
    for i in range(N):
        entries = [j for j in range(k) if valid[i, j]]
        want = _brute_weights([[float(logp[v, i, j]) for j in entries] for v in range(m)], "agreement")
        assert got[:, i].tolist() == pytest.approx(want, rel=1e-10)
    torch.testing.assert_close(got.sum(0), torch.ones(N, dtype=torch.float64))
    uniform = view_weights(logp, valid, ViewSpec())
    torch.testing.assert_close(uniform, torch.full((m, N), 1.0 / m, dtype=torch.float64))


# ---------------------------------------------------------------- the two forms against the brute force

# The token and scale tau sit inside the range of the token divergences, so both sides of the clip are exercised.
TOKEN_TAU = {"reverse_kl": 0.5, "forward_kl": 0.5, "jsd": 0.1}
FULL_SPECS = [
    LossSpec(divergence=d, clip=c, clip_tau=tau, jsd_beta=0.3, ratio_clip=1.3)
    for d in ["reverse_kl", "forward_kl", "jsd"]
    for c, tau in [("none", 1.0), ("entry", 0.05), ("token", TOKEN_TAU[d]), ("scale", TOKEN_TAU[d])]
]


def _spec_id(s):
    return f"{s.divergence}-{s.clip}{s.clip_tau}"


@pytest.mark.parametrize("spec", FULL_SPECS, ids=_spec_id)
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("weights", ["uniform", "agreement"])
def test_full_form_matches_brute_force(spec, m, weights):
    _check_against_brute_force(m, spec, ViewSpec(form="full", top_k=TOP_K, weights=weights), seed=m)


@pytest.mark.parametrize("spec", [FULL_SPECS[1], FULL_SPECS[3], FULL_SPECS[5]], ids=_spec_id)
@pytest.mark.parametrize("m", [2, 3])
def test_full_form_whole_vocabulary_matches_brute_force(spec, m):
    _check_against_brute_force(m, spec, ViewSpec(form="full", top_k=0, weights="agreement"), seed=20 + m,
                               with_ratio=True)


def test_full_form_with_importance_ratio_matches_brute_force():
    _check_against_brute_force(3, FULL_SPECS[1], ViewSpec(top_k=TOP_K), seed=4, with_ratio=True)


@pytest.mark.parametrize("clip", ["none", "token", "scale"])
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("weights", ["uniform", "agreement"])
def test_sampled_form_matches_brute_force(clip, m, weights):
    spec = LossSpec(support="sampled", clip=clip, clip_tau=0.3, ratio_clip=1.3)
    view = ViewSpec(form="sampled", top_k=TOP_K, weights=weights)
    _check_against_brute_force(m, spec, view, seed=30 + m, with_ratio=m == 3)


def test_clips_are_exercised_by_the_inputs():
    student, views, tokens, _ = _inputs(3, seed=3)
    entry = multiview_token_losses(student, views, tokens, FULL_SPECS[1], ViewSpec(top_k=TOP_K))
    assert entry.tokens.clipped.sum() > 0
    assert (entry.tokens.loss < entry.tokens.divergence).any()
    out = multiview_token_losses(student, views, tokens, FULL_SPECS[3], ViewSpec(top_k=TOP_K))
    assert 0 < out.tokens.clipped.sum() < N  # scale: some tokens above tau, some below
    assert (out.gate > 0).any() and (out.jensen > 0).all()


# ---------------------------------------------------------------- one view is the single-view loss, exactly


def _assert_same(one, single, student, student_ref):
    assert torch.equal(one.tokens.loss, single.loss)
    for name in ["divergence", "clipped", "ratio", "ratio_clipped", "logp_gap"]:
        assert torch.equal(getattr(one.tokens, name), getattr(single, name)), name
    assert torch.equal(one.view_divergence[0], single.divergence)
    assert torch.equal(one.agreement, torch.zeros(N, dtype=torch.float64))
    (g_one,) = torch.autograd.grad(one.tokens.loss.sum(), student)
    (g_single,) = torch.autograd.grad(single.loss.sum(), student_ref)
    assert torch.equal(g_one, g_single)


@pytest.mark.parametrize("clip", ["none", "token", "scale"])
@pytest.mark.parametrize("weights", ["uniform", "agreement"])
def test_one_view_sampled_form_is_the_single_view_sampled_loss(clip, weights):
    student, views, tokens, old = _inputs(1, seed=40)
    spec = LossSpec(support="sampled", clip=clip, clip_tau=0.3, ratio_clip=1.3)
    one = multiview_token_losses(student, views, tokens, spec, ViewSpec(form="sampled", weights=weights), old)
    student_ref = student.detach().clone().requires_grad_()
    single = token_losses(student_ref, views[0], tokens, spec, old)
    _assert_same(one, single, student, student_ref)


@pytest.mark.parametrize("spec", FULL_SPECS, ids=_spec_id)
def test_one_view_full_form_over_the_vocabulary_is_the_single_view_full_loss(spec):
    student, views, tokens, old = _inputs(1, seed=41)
    one = multiview_token_losses(student, views, tokens, spec, ViewSpec(form="full", top_k=0), old)
    student_ref = student.detach().clone().requires_grad_()
    single = token_losses(student_ref, views[0], tokens, LossSpec(**{**spec.__dict__, "support": "full"}), old)
    _assert_same(one, single, student, student_ref)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("form", ["sampled", "full"])
def test_identical_views_give_no_residual_and_the_view_as_target(form):
    student, views, tokens, _ = _inputs(1, seed=50)
    three = views.expand(3, N, V).clone()
    spec = LossSpec(support="sampled" if form == "sampled" else "full", clip="none")
    view = ViewSpec(form=form, top_k=0, weights="agreement")
    got = multiview_token_losses(student, three, tokens, spec, view)
    want = multiview_token_losses(student, views, tokens, spec, view)
    torch.testing.assert_close(got.jensen, torch.zeros(N, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.agreement, torch.zeros(N, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.tokens.loss, want.tokens.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.tokens.logp_gap, want.tokens.logp_gap, rtol=1e-12, atol=1e-12)
    logp = torch.log_softmax(views, -1)
    out = combine_views(logp[0], logp.expand(3, N, V), torch.full((3, N), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(out.target, logp[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.jensen, torch.zeros_like(out.jensen), rtol=0, atol=1e-12)


def test_gate_in_unit_interval_and_weights_sum_to_one():
    torch.manual_seed(60)
    student = torch.randn(50, 8, dtype=torch.float64) * 3
    views = torch.randn(4, 50, 8, dtype=torch.float64) * 3
    weights = view_weights(torch.log_softmax(views, -1), None, ViewSpec(weights="agreement"))
    torch.testing.assert_close(weights.sum(0), torch.ones(50, dtype=torch.float64))
    assert (weights > 0).all()
    out = combine_views(torch.log_softmax(student, -1), torch.log_softmax(views, -1), weights)
    assert (out.gate >= 0).all() and (out.gate <= 1).all() and (out.jensen >= 0).all()
    assert (out.consensus <= out.target).all()  # q_g <= q* <= q_a
    arithmetic = (weights[..., None].log() + torch.log_softmax(views, -1)).logsumexp(0)
    assert (out.target <= arithmetic + 1e-12).all()


def test_candidate_support_counts_duplicates_once_and_holds_the_sampled_token():
    logits = torch.full((3, 2, V), -5.0)
    logits[:, :, 2] = 5.0  # every view's top-2 is {2, 3} on token 0
    logits[:, :, 3] = 4.0
    logits[2, 1, 7] = 6.0  # view 2 prefers 7 on token 1
    tokens = torch.tensor([2, 9])  # token 0 already a candidate; token 1 in no view's top-k
    ids, valid = candidate_support(logits, tokens, top_k=2)
    assert ids.shape == (2, 3 * 2 + 1)
    assert sorted(ids[0][valid[0]].tolist()) == [2, 3]
    assert sorted(ids[1][valid[1]].tolist()) == [2, 3, 7, 9]
    for i in range(2):
        assert int(tokens[i]) in ids[i][valid[i]].tolist()
    whole, all_valid = candidate_support(logits, tokens, top_k=0)
    assert whole.tolist() == [list(range(V))] * 2 and all_valid.all()


def test_duplicates_do_not_change_the_loss():
    # Views that share their top-k give many duplicate ids; the loss must match the brute force (which uses sets).
    student, views, tokens, _ = _inputs(3, seed=70)
    views[1] = views[0] + 0.01 * views[1]
    views[2] = views[0] - 0.01 * views[2]
    student_ref = student.detach().clone().requires_grad_()
    spec, view = FULL_SPECS[1], ViewSpec(top_k=TOP_K, weights="agreement")
    got = multiview_token_losses(student, views, tokens, spec, view).tokens.loss.mean()
    want = _brute_loss(student_ref, views, tokens, spec, view)
    torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)


def test_half_precision_logits_and_summary():
    student, views, tokens, _ = _inputs(2, seed=80)
    out = multiview_token_losses(student.detach().bfloat16().requires_grad_(), views.bfloat16(), tokens,
                                 LossSpec(clip="entry", clip_tau=0.05), ViewSpec(top_k=TOP_K, weights="agreement"))
    assert out.tokens.loss.dtype == torch.float32 and torch.isfinite(out.tokens.loss).all()
    metrics = multiview_summary(out, ["full_solution", "answer_only"])
    assert set(metrics) == {
        "divergence", "clip_fraction", "ratio_clip_fraction", "teacher_student_logp_gap", "views/gate",
        "views/jensen", "views/agreement", "views/divergence/full_solution", "views/divergence/answer_only",
    }
    assert metrics["views/agreement"] > 0
    with pytest.raises(ValueError, match="one name per view"):
        multiview_summary(out, ["only_one"])
    with pytest.raises(ValueError, match="distinct name"):
        multiview_summary(out, ["a", "a"])


# ---------------------------------------------------------------- errors name the fix


def test_errors_name_the_problem_and_the_fix():
    student, views, tokens, _ = _inputs(2, seed=90)
    with pytest.raises(ValueError, match="M >= 1"):
        multiview_token_losses(student, views[:0], tokens, LossSpec(), ViewSpec())
    with pytest.raises(ValueError, match="M >= 1"):
        combine_views(student[:, 0], views[:0, :, 0], torch.zeros(0, N))
    with pytest.raises(ValueError, match="do not match the student"):
        multiview_token_losses(student, views[:, :, :-1], tokens, LossSpec(), ViewSpec())
    with pytest.raises(ValueError, match="do not match the student"):
        combine_views(student[:, 0], views[:, :-1, 0], torch.full((2, N - 1), 0.5))
    with pytest.raises(ValueError, match="use clip='token'"):
        multiview_token_losses(student, views, tokens, LossSpec(clip="entry"), ViewSpec(form="sampled"))
    with pytest.raises(ValueError, match="set divergence='reverse_kl'"):
        multiview_token_losses(student, views, tokens, LossSpec(divergence="jsd"), ViewSpec(form="sampled"))
    bad = views.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="view log-probs hold NaN"):
        multiview_token_losses(student, bad, tokens, LossSpec(), ViewSpec())
    with pytest.raises(ValueError, match="sum to 1"):
        combine_views(student[:, 0], views[:, :, 0], torch.ones(2, N, dtype=torch.float64))
    with pytest.raises(ValueError, match="need \\[M, N, K\\]"):
        view_weights(views[:, :, 0], None, ViewSpec(weights="agreement"))
    with pytest.raises(ValueError, match="not one of"):
        ViewSpec(form="dense")
    with pytest.raises(ValueError, match="not one of"):
        ViewSpec(weights="learned")
    with pytest.raises(ValueError, match="0 for the whole vocabulary"):
        ViewSpec(top_k=-1)
    with pytest.raises(ValueError, match="agreement_scale"):
        ViewSpec(agreement_scale=-1.0)
