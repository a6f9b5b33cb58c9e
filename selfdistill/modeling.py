"""Loading a model and tokenizer from a name, a local folder, or the embedded default model."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


def resolve(name_or_path: str) -> str:
    """The folder or hub id to load: the embedded model's cache folder for its name, else the argument."""
    from selfdistill.embedded import resolve_model_path

    return resolve_model_path(name_or_path)


def load_model(name_or_path: str, init_kwargs: dict[str, Any] | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on the resolved path."""
    return AutoModelForCausalLM.from_pretrained(resolve(name_or_path), **(init_kwargs or {}))


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token (the EOS token when it has none; masks, not ids, mark padding here)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path))
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
