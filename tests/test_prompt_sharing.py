"""Prompt prefixes shared in sampling and in the student pass. Float rounding only."""

import pytest
import torch
from conftest import build_model

from selfdistill.rollout import sample_completions
from selfdistill.sequences import completion_logits, render_context, shared_prefix_logits, splice


def _prompts(tokenizer):
    questions = ["What is 12 + 30?", "What is 12 + 30?", "What is 7 + 8? Answer briefly.", "Hi"]
    return [render_context(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def _assert_same_logits_and_gradients(model, batch, run):
    """``run(model)`` gives the same completion logits and parameter gradients as the plain pass."""
    mask = batch.completion_mask.bool()
    weights = torch.randn(int(mask.sum()), model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    results = []
    for fn in (lambda m: completion_logits(m, batch), run):
        model.zero_grad()
        out = fn(model)
        assert out is not None and out.shape == (*batch.completion_ids.shape, model.config.vocab_size)
        (out[mask].log_softmax(-1) * weights).sum().backward()
        results.append((out[mask].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (other, other_grads) = results
    torch.testing.assert_close(other, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        # float32 sums in another order: the absolute tolerance scales with the tensor's largest entry (the embedding
        # gradient reaches ~77, where one rounding step is ~1e-5; seen on an AMD EPYC)
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_student_gradients_through_a_shared_prefix_match_the_plain_pass(tokenizer):
    model = build_model(tokenizer)
    contexts = _prompts(tokenizer)
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["42", "The answer is", "15", ""]]
    batch = splice(contexts, completions, tokenizer.pad_token_id)
    # The chat template's header is shared by all four rows (None would fail the check).
    _assert_same_logits_and_gradients(model, batch, lambda m: shared_prefix_logits(m, batch, contexts))


@pytest.mark.parametrize("do_sample", [False, True])
def test_sampling_from_a_shared_prefix_draws_the_same_tokens(tokenizer, do_sample):
    model = build_model(tokenizer).eval()
    prompts = _prompts(tokenizer) * 2  # G = 2 copies as well as a shared header
    draws = []
    for share in (False, True):
        torch.manual_seed(3)
        out = sample_completions(model, prompts, pad_id=tokenizer.pad_token_id, eos=[tokenizer.eos_token_id],
                                 max_new_tokens=8, do_sample=do_sample, temperature=0.8, share_prefix=share)
        draws.append(out)
    assert draws[1].completion_ids == draws[0].completion_ids
    assert draws[1].truncated == draws[0].truncated
    assert any(len(c) > 1 for c in draws[0].completion_ids)


def test_trainer_with_and_without_shared_prompts_agree(tmp_path, tokenizer):
    from test_trainer import make_trainer

    losses, grads_norms = [], []
    for share in (True, False):
        trainer = make_trainer(tmp_path / str(share), tokenizer, model=build_model(tokenizer), max_steps=2,
                               num_generations=4, share_prompt_prefix=share)
        assert trainer._share_student is share
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        losses.append([h["loss"] for h in history])
        grads_norms.append([h["grad_norm"] for h in history])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3, abs=1e-7)
    assert grads_norms[0] == pytest.approx(grads_norms[1], rel=1e-3, abs=1e-7)


def test_student_sharing_is_off_under_gradient_checkpointing(tmp_path, tokenizer):
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, tokenizer, model=build_model(tokenizer), gradient_checkpointing=True)
    assert trainer._share_student is False


def test_groups_keep_whole_prompts_when_that_computes_fewer_tokens():
    from selfdistill.sequences import _prefix_groups

    header = list(range(26))
    a, b = header + list(range(100, 121)), header + list(range(200, 221))
    # G = 4 copies of two prompts: two groups sharing their whole 47-token prompts (26 + 8 x 0 suffix tokens
    # would cost more as one group with the 26-token header: 26 + 8 x 21).
    assert _prefix_groups([a] * 4 + [b] * 4, 8) == ([0, 0, 0, 0, 1, 1, 1, 1], [47, 47])
    # G = 1: distinct prompts share the header.
    assert _prefix_groups([a, b, header + [300] * 21], 8) == ([0, 0, 0], [26])


@pytest.mark.parametrize("share", [True, False])
def test_an_empty_prompt_is_named_on_either_sampling_path(tokenizer, share):
    model = build_model(tokenizer).eval()
    prompts = _prompts(tokenizer) + [[]]
    with pytest.raises(ValueError, match="an empty context"):
        sample_completions(model, prompts, pad_id=tokenizer.pad_token_id, eos=[tokenizer.eos_token_id],
                           max_new_tokens=4, share_prefix=share)


def test_distinct_long_contexts_share_their_header():
    """G = 1 teacher contexts: 26 shared tokens then 88 each; sharing the header saves 26 tokens per extra row."""
    from selfdistill.sequences import _prefix_groups

    header = list(range(26))
    contexts = [header + [1000 * (k + 1) + j for j in range(88)] for k in range(8)]
    assert _prefix_groups(contexts, 8) == ([0] * 8, [26])


# ------------------------------------------------------------------------------------------ packed student pass
def _student_batch(tokenizer):
    contexts = _prompts(tokenizer) + _prompts(tokenizer)[:1]  # three copies of one prompt, a shared header, "Hi"
    texts = ["42", "The answer is 42", "15", "", "4"]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    completions[3] = []  # a rollout with no tokens predicts nothing
    return contexts, splice(contexts, completions, tokenizer.pad_token_id)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_pass_matches_the_plain_pass_in_values_and_gradients(tokenizer, attention, tied):
    from selfdistill.sequences import packed_completion_logits

    model = build_model(tokenizer, tie_word_embeddings=tied)
    model.config._attn_implementation = attention
    contexts, batch = _student_batch(tokenizer)
    _assert_same_logits_and_gradients(model, batch, lambda m: packed_completion_logits(m, batch, contexts))


def test_packed_pass_returns_hidden_states_for_the_fused_loss(tokenizer):
    from selfdistill.sequences import completion_hidden, packed_completion_logits

    model = build_model(tokenizer)
    contexts, batch = _student_batch(tokenizer)
    mask = batch.completion_mask.bool()
    with torch.no_grad():
        plain = completion_hidden(model, model.lm_head, batch)[mask]
        packed = packed_completion_logits(model, batch, contexts, head=model.lm_head)[mask]
    assert packed.shape[-1] == model.config.hidden_size
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


class _HeadProducts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the rows of every product with the output head's weight."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.rows = weight, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            if b.shape == self.weight.T.shape and b.data_ptr() == self.weight.data_ptr():
                self.rows.append(a.shape[0])
        return func(*args, **(kwargs or {}))


def test_a_passed_through_head_computes_nothing_and_the_packed_pass_scores_only_completions(tokenizer):
    from selfdistill.sequences import head_passthrough, packed_completion_logits, score_completions

    model = build_model(tokenizer)
    contexts, batch = _student_batch(tokenizer)
    mask = batch.completion_mask.bool()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        counter = _HeadProducts(model.lm_head.weight)
        with counter:
            model(input_ids=ids)
        assert counter.rows == [14]  # the counter sees the head's product
        counter = _HeadProducts(model.lm_head.weight)
        with counter, head_passthrough(model.lm_head):
            hidden = model(input_ids=ids).logits
        assert counter.rows == []  # before: the full [14, V] product, computed and thrown away
        assert "forward" not in model.lm_head.__dict__
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(hidden, expected)
        counter = _HeadProducts(model.lm_head.weight)
        with counter:
            logits = packed_completion_logits(model, batch, contexts)
        assert counter.rows == [int(mask.sum())]  # the predicting positions only, not the packed rows
        # masked=True: the valid positions directly, the same values (and order) as [mask] of the full tensor
        for pack, share in ((True, True), (False, True), (False, False)):
            full = score_completions(model, batch, contexts, share, pack=pack)
            torch.testing.assert_close(score_completions(model, batch, contexts, share, pack=pack, masked=True),
                                       full[mask], rtol=0, atol=0)
        torch.testing.assert_close(logits[mask], full[mask], rtol=1e-5, atol=1e-5)


def test_pack_rows_layout_and_mask():
    from selfdistill.sequences import pack_rows

    contexts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7], [1, 2, 3, 4, 5], [9, 8]]
    completions = [[10, 11], [12], [13, 14, 15], [16, 17]]
    packed = pack_rows(contexts, completions, min_shared=3)
    # Rows 0 and 2 share their whole context, row 1 the first four tokens; [9, 8] packs alone.
    assert packed is not None and packed.input_ids.shape[0] == 2  # the group of rows 0-2, and [9, 8] alone
    ids = packed.input_ids.tolist()
    positions = packed.position_ids.tolist()
    flat = list(zip(packed.rows.tolist(), packed.columns.tolist()))
    k = 0
    for i, completion in enumerate(completions):
        for t in range(len(completion)):
            r, c = flat[k]
            k += 1
            # The predicting position holds the token before `token` in row i's own sequence, at its own position.
            own = contexts[i] + completion
            assert ids[r][c] == own[len(contexts[i]) + t - 1], (i, t)
            assert positions[r][c] == len(contexts[i]) + t - 1, (i, t)
    assert k == len(flat) == sum(map(len, completions))
    mask = packed.mask(True, torch.float32, "cpu")[:, 0]
    segments = packed.segments
    for r in range(mask.shape[0]):
        for q in range(mask.shape[1]):
            for key in range(mask.shape[2]):
                sq, sk = int(segments[r, q]), int(segments[r, key])
                expected = key <= q and sk >= 0 and (sk == sq or sk == 0) if sq >= 0 else key == q
                assert bool(mask[r, q, key]) == expected
    float_mask = packed.mask(False, torch.float32, "cpu")
    assert torch.equal(float_mask == 0, packed.mask(True, torch.float32, "cpu"))
    assert pack_rows([[1, 2, 3], [4, 5, 6]], [[7], [8]], min_shared=2) is None


def test_pack_rows_repeats_the_prefix_in_a_new_row_when_attention_would_cost_more():
    from selfdistill.sequences import pack_rows

    contexts = [[1, 2, 3, 4]] * 4
    completions = [[5, 6, 7]] * 4
    assert pack_rows(contexts, completions, min_shared=2).input_ids.shape[0] == 1
    cheap_pairs = pack_rows(contexts, completions, min_shared=2, tokens_per_pair=1.0)
    assert cheap_pairs.input_ids.shape[0] > 1
    assert all(row[:4] == [1, 2, 3, 4] for row in cheap_pairs.input_ids.tolist())


def test_packed_pass_declines_models_it_cannot_reproduce(tokenizer):
    from selfdistill.sequences import packed_completion_logits, packs_rows

    contexts, batch = _student_batch(tokenizer)
    model = build_model(tokenizer)
    assert packs_rows(model)
    model.config.sliding_window = 4
    assert not packs_rows(model)
    assert packed_completion_logits(model, batch, contexts) is None
    model = build_model(tokenizer)
    model.config._attn_implementation = "flash_attention_2"  # its kernels ignore a 4D mask
    assert packed_completion_logits(model, batch, contexts) is None
    model = build_model(tokenizer)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))  # applied by hand, it would differ
    assert packed_completion_logits(model, batch, contexts) is None


def test_trainer_student_pass_runs_packed(tmp_path, tokenizer, monkeypatch):
    from test_trainer import make_trainer

    import selfdistill.sequences as sequences

    calls = []
    original = sequences.packed_completion_logits

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None and out.requires_grad)
        return out

    monkeypatch.setattr(sequences, "packed_completion_logits", spy)
    trainer = make_trainer(tmp_path, tokenizer, model=build_model(tokenizer), max_steps=1, num_generations=4)
    trainer.train()
    assert calls and all(calls)  # every student pass packed its G copies, with gradients


@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_pass_under_gradient_checkpointing_matches_the_plain_pass(tokenizer, reentrant):
    from selfdistill.sequences import packed_completion_logits

    model = build_model(tokenizer).train()
    contexts, batch = _student_batch(tokenizer)
    mask = batch.completion_mask.bool()
    grads = []
    for packed, checkpointing in ((False, False), (True, True)):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.zero_grad()
        out = packed_completion_logits(model, batch, contexts) if packed else completion_logits(model, batch)
        out[mask].log_softmax(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # The loss sums O(1) terms over every completion token (the head's gradient entries reach ~3), and the packed pass
    # adds them in another order: float32 rounding reaches ~3e-6 there on an AVX-512 CPU, so atol is 1e-5.
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
