"""Loading a model and tokenizer from a name, a local folder, or the embedded default model."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


class ModelNotFound(OSError):
    """A model name that is neither embedded, nor a local folder, nor loadable from a hub."""


def resolve(name_or_path: str) -> str:
    """The folder or hub id to load: the embedded model's cache folder for its name, else the argument."""
    from selfdistill.embedded import resolve_model_path

    return resolve_model_path(name_or_path)


def _load(loader: Any, name_or_path: str, what: str, **kwargs: Any) -> Any:
    folder = os.path.expanduser(name_or_path)
    if name_or_path.startswith(("/", "./", "../", "~")) and not os.path.isdir(folder):
        raise ModelNotFound(f"model {name_or_path!r} is a path, and no folder exists there; give the folder a "
                            "model was saved to (save_pretrained), or an embedded model's name")
    if os.path.isdir(folder) and not os.path.exists(os.path.join(folder, "config.json")):
        inside = sorted(os.listdir(folder))[:8]
        raise ModelNotFound(
            f"folder {name_or_path!r} holds no model (no config.json; it has: {', '.join(inside) or 'nothing'}). Give "
            "the folder save_pretrained wrote: a training run's <output_dir>/final, or one of its checkpoint-N folders"
        )
    target = resolve(name_or_path)
    unreachable = None
    if target == name_or_path and not os.path.isdir(folder):  # neither embedded nor a folder: a hub id
        unreachable = hub_unreachable()
        if unreachable:  # the hub cache only: the hub's client would retry for most of a minute before saying so
            kwargs = {**kwargs, "local_files_only": True}
            if loader is AutoModelForCausalLM:  # its look for a PEFT adapter takes its own hub arguments
                kwargs["adapter_kwargs"] = {**(kwargs.get("adapter_kwargs") or {}), "local_files_only": True}
    try:
        return loader.from_pretrained(target, **kwargs)
    except OSError as err:
        from selfdistill.embedded import EMBEDDED_MODELS

        known = ", ".join(EMBEDDED_MODELS)
        why = (f"no model hub can be reached from this machine ({unreachable}) and its cache holds no copy"
               if unreachable else f"no model hub answered for it ({err.__class__.__name__}: "
                                    f"{str(err).splitlines()[0][:200]})")
        raise ModelNotFound(
            f"cannot load the {what} of model {name_or_path!r}: it is not an embedded model ({known}), "
            f"not a folder holding a saved model, and {why}. Give an embedded name, or a folder written by "
            "save_pretrained."
        ) from err


def hub_unreachable() -> str | None:
    """Why the model hub cannot be reached, when its host does not even resolve (no network, no DNS); else None.
    ``HF_HUB_OFFLINE`` is left to the hub's client, which then fails at once by itself."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"{host} does not resolve: {err}"
    return None


def load_model(name_or_path: str, init_kwargs: dict[str, Any] | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on the resolved path."""
    return _load(AutoModelForCausalLM, name_or_path, "weights", **(init_kwargs or {}))


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token (the EOS token when it has none; masks, not ids, mark padding here)."""
    tokenizer = _load(AutoTokenizer, name_or_path, "tokenizer")
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
