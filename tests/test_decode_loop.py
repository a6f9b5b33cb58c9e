"""The fused decoding loop (selfdistill.decode_loop): its logits against the model's forward, its draws against
transformers' generate, the models and settings it declines, and the trainer's switch."""

import logging

import pytest
import torch
from conftest import build_model

from selfdistill import cpu_decode, decode_loop, rollout
from selfdistill.rollout import decode_linears, sample_completions
from selfdistill.sequences import MIN_SHARED_PREFIX, left_pad, render_context, run_shared_prefixes

needs_kernel = pytest.mark.skipif(cpu_decode.kernel() is None,
                                  reason="no decode kernel on this machine (no AVX-512 or no C compiler)")

#: head size 8 (the kernel's scalar attention path) and 16 with two query heads per key head (its vector path)
SHAPES = {"tiny": {}, "gqa": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)}


def prompts(tokenizer, n):
    texts = ["What is 3 + 4?", "Hi", "What is 12 + 30? Think step by step, then answer.", "7 + 8", "Hello there"]
    return [render_context(tokenizer, [{"role": "user", "content": texts[i % len(texts)]}]) for i in range(n)]


def full_logits(model, rows):
    """Each row's logits after its last token from one plain forward over the left-padded rows."""
    ids, mask = left_pad(rows, max(map(len, rows)), 0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [False, True])
def test_each_step_gives_the_logits_of_the_models_own_forward(tokenizer, shape, shared):
    model = build_model(tokenizer, **SHAPES[shape]).eval()
    rows = prompts(tokenizer, 5)  # different lengths: left padding
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        assert decode_loop.declines(model, len(rows), 6) is None
        if shared:  # repeated prompts' cache first, as sample_completions builds it for G > 1
            rows = [rows[0], rows[0], rows[2], rows[2], rows[2]]
            cache = run_shared_prefixes(model, rows, MIN_SHARED_PREFIX, "cpu", keep_last=True, pad_id=0)
            suffix_ids, suffix_mask = left_pad(cache.suffixes, max(map(len, cache.suffixes)), 0)
            ids = torch.cat([cache.ids, suffix_ids], dim=1)
            mask = torch.cat([cache.mask, suffix_mask], dim=1)
            decoder = decode_loop.Decoder(model, ids, mask, cache.cache, max_new_tokens=6)
        else:
            ids, mask = left_pad(rows, max(map(len, rows)), 0)
            decoder = decode_loop.Decoder(model, ids, mask, None, max_new_tokens=6)
        torch.testing.assert_close(decoder.first_logits, full_logits(model, rows), rtol=1e-5, atol=1e-5)
        for _ in range(6):
            tokens = torch.randint(0, model.config.vocab_size, (len(rows),), generator=gen)
            rows = [r + [int(t)] for r, t in zip(rows, tokens)]
            torch.testing.assert_close(decoder.step(tokens), full_logits(model, rows), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="larger max_new_tokens"):
            decoder.step(tokens)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(temperature=1.3, top_k=5, top_p=0.9),
                                      dict(do_sample=False)], ids=["temperature", "top-k-top-p", "greedy"])
@pytest.mark.parametrize("n,share", [(1, False), (3, True), (8, True), (8, False)])
def test_the_loop_draws_the_tokens_generate_draws(tokenizer, monkeypatch, shape, settings, n, share):
    model = build_model(tokenizer, seed=n, **SHAPES[shape]).eval()
    calls = []
    original = decode_loop.sample
    monkeypatch.setattr(decode_loop, "sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    rows = prompts(tokenizer, n)
    if n == 8:
        rows[4:] = [rows[0]] * 4  # whole prompts repeated, as with G > 1
    kwargs = dict(pad_id=tokenizer.pad_token_id, eos=[tokenizer.eos_token_id], max_new_tokens=12, share_prefix=share,
                  **settings)
    for seed in range(3):
        torch.manual_seed(seed)
        fused = sample_completions(model, rows, loop=True, **kwargs)
        after_fused = torch.rand(1)  # the generator advanced alike
        torch.manual_seed(seed)
        plain = sample_completions(model, rows, loop=False, **kwargs)
        assert fused == plain
        assert torch.equal(after_fused, torch.rand(1))
    assert len(calls) == 3


@needs_kernel
def test_rows_stop_at_eos_and_the_loop_ends_when_all_have(tokenizer):
    model = build_model(tokenizer).eval()
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] += 10.0  # EOS dominates after a few steps
    rows = prompts(tokenizer, 4)
    torch.manual_seed(0)
    out = sample_completions(model, rows, pad_id=tokenizer.pad_token_id, eos=[eos], max_new_tokens=30,
                             temperature=1.0)
    torch.manual_seed(0)
    assert out == sample_completions(model, rows, pad_id=tokenizer.pad_token_id, eos=[eos], max_new_tokens=30,
                                     temperature=1.0, loop=False)
    assert all(c[-1] == eos and eos not in c[:-1] for c in out.completion_ids) and not any(out.truncated)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def _hooked(model):
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 2)
    return model


def _penalised(model):
    model.generation_config.repetition_penalty = 1.3
    return model


DECLINED = {
    "lora": (dict(), _lora, "not a plain LlamaForCausalLM"),
    "bias": (dict(attention_bias=True), None, "biases"),
    "width": (dict(hidden_size=24, intermediate_size=32, num_attention_heads=2), None, "multiples of 16"),
    "hook": (dict(), _hooked, "hooks"),
    "repetition penalty": (dict(), _penalised, "repetition_penalty"),
    "float64": (dict(), lambda m: m.double(), "float32"),
}


@needs_kernel
@pytest.mark.parametrize("case", DECLINED)
def test_a_model_the_loop_cannot_decode_samples_through_generate_with_a_log_line(tokenizer, monkeypatch, caplog,
                                                                                  case):
    overrides, change, reason = DECLINED[case]
    model = build_model(tokenizer, **overrides).eval()
    model = change(model) if change else model
    assert reason in decode_loop.declines(model, 2, 4)
    monkeypatch.setattr(rollout, "_LOGGED", set())
    monkeypatch.setattr(decode_loop, "sample", lambda *a, **k: pytest.fail("the loop ran"))
    rows = prompts(tokenizer, 2)
    with caplog.at_level(logging.INFO, logger="selfdistill.rollout"):
        torch.manual_seed(0)
        out = sample_completions(model, rows, pad_id=tokenizer.pad_token_id, eos=[tokenizer.eos_token_id],
                                 max_new_tokens=4)
        sample_completions(model, rows, pad_id=tokenizer.pad_token_id, eos=[tokenizer.eos_token_id], max_new_tokens=4)
    assert caplog.text.count("fused decoding loop not used") == 1 and reason in caplog.text
    torch.manual_seed(0)
    assert out == sample_completions(model, rows, pad_id=tokenizer.pad_token_id, eos=[tokenizer.eos_token_id],
                                     max_new_tokens=4, loop=False)


@needs_kernel
def test_the_loop_declines_autocast_more_rows_than_the_kernel_takes_and_no_new_tokens(tokenizer):
    model = build_model(tokenizer).eval()
    assert decode_loop.declines(model, 8, 4) is None
    assert "rows" in decode_loop.declines(model, cpu_decode.MAX_ROWS + 1, 4)
    assert "no new tokens" in decode_loop.declines(model, 2, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in decode_loop.declines(model, 2, 4)
    with decode_linears(model, skinny=True, kernel=True):  # replaced forwards: sample_completions asks before this
        assert "replaced forward" in decode_loop.declines(model, 2, 4)
    assert decode_loop.declines(model, 2, 4) is None


@needs_kernel
def test_a_compiled_model_decodes_through_the_loop_with_the_module_it_wraps(tokenizer, monkeypatch):
    """TrainingArguments' torch_compile hands sampling a torch.compile wrapper (accelerate keeps it on unwrapping)."""
    model = build_model(tokenizer).eval()
    compiled = torch.compile(model, backend="eager")
    used = []
    original = decode_loop.sample
    monkeypatch.setattr(decode_loop, "sample", lambda m, *a, **k: used.append(m) or original(m, *a, **k))
    rows = prompts(tokenizer, 3)
    kwargs = dict(pad_id=tokenizer.pad_token_id, eos=[tokenizer.eos_token_id], max_new_tokens=6, temperature=0.8)
    torch.manual_seed(0)
    fused = sample_completions(compiled, rows, **kwargs)
    torch.manual_seed(0)
    assert fused == sample_completions(compiled, rows, loop=False, **kwargs)
    assert used == [model]


def test_without_the_kernel_the_loop_is_not_used(tokenizer, monkeypatch):
    monkeypatch.setattr(cpu_decode, "_state", {"lib": None})
    assert "kernel" in decode_loop.declines(build_model(tokenizer), 2, 4)


@needs_kernel
def test_nan_logits_in_the_loop_raise_the_named_error(tokenizer):
    model = build_model(tokenizer).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:] = float("nan")
    with pytest.raises(rollout.NonFiniteLogits, match="student produced NaN"):
        sample_completions(model, prompts(tokenizer, 2), pad_id=tokenizer.pad_token_id,
                           eos=[tokenizer.eos_token_id], max_new_tokens=4)


@needs_kernel
@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_samples_through_the_loop_unless_switched_off(tmp_path, tokenizer, monkeypatch, on):
    from test_trainer import make_trainer

    calls = []
    original = decode_loop.sample
    monkeypatch.setattr(decode_loop, "sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, decode_loop=on)
    trainer.train()
    assert bool(calls) is on
    assert all(h["loss"] == h["loss"] for h in trainer.state.log_history if "loss" in h)
