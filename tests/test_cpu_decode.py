"""The CPU decode kernel (selfdistill.cpu_decode): its products against float64, when it is used, and its fallback."""

import logging

import pytest
import torch
from conftest import build_model

from selfdistill import cpu_decode
from selfdistill.rollout import decode_linears, sample_completions

needs_kernel = pytest.mark.skipif(cpu_decode.kernel() is None,
                                  reason="no decode kernel on this machine (no AVX-512 or no C compiler)")


@needs_kernel
@pytest.mark.parametrize("rows,k_in,n_out", [(8, 576, 1536), (8, 64, 7), (5, 32, 2), (1, 16, 1), (3, 1536, 577),
                                             (8, 48, 4099)])
def test_kernel_products_match_a_float64_reference(rows, k_in, n_out):
    gen = torch.Generator().manual_seed(rows * 1000 + n_out)
    x = torch.randn(rows, k_in, generator=gen)
    weight = torch.randn(n_out, k_in, generator=gen)
    assert cpu_decode.applies(x, weight)
    out = cpu_decode.rows_times_weight(x, weight, cpu_decode.kernel())
    reference = x.double() @ weight.double().T
    assert out.shape == (rows, n_out) and out.dtype == torch.float32
    # float32 sums of k_in products: the error of torch's own product, not more
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=2e-6 * k_in ** 0.5 * reference.abs().max().item())
    torch_error = ((x @ weight.T).double() - reference).abs().max()
    assert (out.double() - reference).abs().max() <= 4 * torch_error + 1e-6


@needs_kernel
def test_kernel_reads_a_non_contiguous_input_and_threads_split_the_rows():
    x = torch.randn(16, 64)[::2]  # every other row: not contiguous
    weight = torch.randn(101, 64)
    expected = x.double() @ weight.double().T
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = cpu_decode.rows_times_weight(x, weight, cpu_decode.kernel())
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_only_few_row_float32_products_without_gradients_apply():
    weight = torch.randn(8, 32)
    assert cpu_decode.applies(torch.randn(8, 32), weight)
    assert not cpu_decode.applies(torch.randn(9, 32), weight)  # more rows than MAX_ROWS: torch's product
    assert not cpu_decode.applies(torch.randn(2, 24), torch.randn(8, 24))  # width not a multiple of 16
    assert not cpu_decode.applies(torch.randn(2, 32, dtype=torch.float64), weight.double())
    assert not cpu_decode.applies(torch.randn(2, 32, dtype=torch.bfloat16), weight.bfloat16())
    assert not cpu_decode.applies(torch.randn(2, 32), weight.T.contiguous().T)  # a transposed view of the weight
    assert not cpu_decode.applies(torch.randn(2, 32, requires_grad=True), weight)  # training: autograd's product
    with torch.no_grad():
        assert cpu_decode.applies(torch.randn(2, 32, requires_grad=True), weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training: autocast's bf16 product, not float32
            assert not cpu_decode.applies(torch.randn(2, 32), weight)


@needs_kernel
def test_decoding_runs_the_kernel_and_gives_the_plain_logits(tokenizer, monkeypatch):
    model = build_model(tokenizer).eval()
    calls = []
    original = cpu_decode.rows_times_weight
    monkeypatch.setattr(cpu_decode, "rows_times_weight", lambda *a: calls.append(a[0].shape) or original(*a))
    x = torch.randint(0, model.config.vocab_size, (4, 1))  # one decoding step of 4 rows
    long = torch.randint(0, model.config.vocab_size, (3, 5))  # 15 rows: torch's product
    with torch.no_grad():
        plain, plain_long = model(input_ids=x).logits, model(input_ids=long).logits
        with decode_linears(model, skinny=False, kernel=True):
            fast = model(input_ids=x).logits
            assert len(calls) == sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
            calls.clear()
            same_long = model(input_ids=long).logits
            assert not calls
        assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(same_long, plain_long)


def test_without_a_compiler_decoding_keeps_torchs_products(tokenizer, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_decode, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="selfdistill.cpu_decode"):
        assert cpu_decode.kernel() is None
    assert "decode kernel" in caplog.text
    model = build_model(tokenizer).eval()
    ids = [tokenizer("Hi there", add_special_tokens=False)["input_ids"]] * 2
    kwargs = dict(pad_id=tokenizer.pad_token_id, eos=[tokenizer.eos_token_id], max_new_tokens=4, do_sample=False)
    assert (sample_completions(model, ids, kernel=True, skinny=False, **kwargs).completion_ids
            == sample_completions(model, ids, kernel=False, skinny=False, **kwargs).completion_ids)


@needs_kernel
def test_a_build_goes_to_the_cache_folder_and_is_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_decode, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_decode.kernel() is not None
    built = list((tmp_path / "selfdistill").glob("decode_kernel_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_decode, "_state", {})
    assert cpu_decode.kernel() is not None
    assert built[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "selfdistill").iterdir())) == 1


@needs_kernel
@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_samples_through_the_kernel_unless_switched_off(tmp_path, tokenizer, monkeypatch, on):
    from test_trainer import make_trainer

    calls = []
    original = cpu_decode.rows_times_weight
    monkeypatch.setattr(cpu_decode, "rows_times_weight", lambda *a: calls.append(1) or original(*a))
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, decode_kernel=on)
    trainer.train()
    assert bool(calls) is on
    assert all(h["loss"] == h["loss"] for h in trainer.state.log_history if "loss" in h)


def test_a_layer_whose_forward_is_already_replaced_keeps_it(tokenizer):
    """accelerate's offload hooks (and other patches) replace a layer's forward on the instance; decoding must
    neither bypass nor remove it."""
    model = build_model(tokenizer).eval()
    calls = []
    head = model.lm_head

    def hooked(x):
        calls.append(x.shape)
        return torch.nn.functional.linear(x, head.weight)

    head.forward = hooked
    with torch.no_grad(), decode_linears(model, skinny=True, kernel=True):
        assert head.__dict__["forward"] is hooked
        model(input_ids=torch.randint(0, model.config.vocab_size, (2, 1)))
    assert calls and head.__dict__["forward"] is hooked
