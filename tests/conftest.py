"""Tiny models and tokenizers built in code: no test reaches a hub."""

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus():
    lines = []
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is {a + b}.")
    lines += ["Here is a reference solution. Héllo wörld, ünïcode ✓ 数学 — “quotes”  double  spaces\n\ttabs"] * 5
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def build_model(tokenizer, seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config)


@pytest.fixture
def model(tokenizer):
    return build_model(tokenizer)


def build_dataset(n=8) -> Dataset:
    rows = []
    for i in range(n):
        a, b = 10 + 3 * i, 20 + 5 * i
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "solution": f"{a} + {b} = {a + b}. The answer is {a + b}.",
            "answer": str(a + b),
        })
    return Dataset.from_list(rows)


@pytest.fixture
def dataset():
    return build_dataset()
