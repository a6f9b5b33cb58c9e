"""Sampling from a Llama-architecture model on the CPU with one C call per layer and decoding step.

transformers' ``generate`` runs each decoding step as ~25 tensor operators per layer (norms, rotary embedding, the
KV cache's concatenation, attention, the MLP) plus the loop's own bookkeeping. With the weights read by
:mod:`selfdistill.cpu_decode`'s kernel, those operators cost about as much as the products on the 2-core machine of
docs/benchmarks.md (~20 of ~55 ms a step for 8 rows of SmolLM2-135M). :func:`sample` keeps the model's own forward
for the prompt (the prefill, under the caller's :func:`selfdistill.rollout.decode_linears`) and then runs each
decoding step layer by layer through the kernel's ``decode_layer``: RMSNorm, the q/k/v products, the rotary
embedding, the KV cache write into a preallocated buffer, attention over the row's cached positions, the output
product and the residual, RMSNorm, gate/up, SiLU and the down product, in one OpenMP region with barriers between
the stages. The output head, the logits processors and the draw are transformers' and torch's as ``generate`` runs
them (temperature, top-k and top-p warpers, then ``torch.multinomial``, or argmax when greedy), so the generator
is advanced the same way and the same tokens come out (to float rounding of the logits: a different summation
order, ~1e-6).

It runs only where it computes what ``generate`` would (:func:`declines` says why not otherwise, and the caller
falls back to ``generate``): a plain ``LlamaForCausalLM`` (no PEFT wrapper, no hooks or replaced forwards, no
biases, SiLU, RMSNorm) in float32 on the CPU, outside autocast, with at most
:data:`selfdistill.cpu_decode.MAX_ROWS` rows, widths that are multiples of 16, the kernel built, and a generation
config that asks for no logits processor beyond temperature, top-k and top-p.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from transformers import GenerationConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from selfdistill import cpu_decode
from selfdistill.sequences import CACHE_KEY

#: Generation-config settings whose non-default values add a logits processor or a stopping rule that :func:`sample`
#: does not implement; where the model's config sets one, ``generate`` runs instead.
UNSUPPORTED_SETTINGS = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "min_length", "min_new_tokens", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty", "renormalize_logits",
    "remove_invalid_values", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "num_beams", "penalty_alpha",
    "guidance_scale", "watermarking_config", "stop_strings", "max_time", "num_return_sequences", "dola_layers",
    "diversity_penalty", "num_beam_groups", "top_h",
)


class _LayerArgs(ctypes.Structure):
    """``layer_args`` of the kernel's C source (the same fields in the same order)."""

    _fields_ = [(name, ctypes.c_int) for name in
                ("rows", "hidden", "heads", "kv_heads", "head_dim", "inter", "cap", "pos", "threads")]
    _fields_ += [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_void_p) for name in
                 ("ln1", "ln2", "wq", "wk", "wv", "wo", "wg", "wu", "wd", "k_cache", "v_cache", "valid", "cos",
                  "sin", "x", "h", "q", "k", "v", "att", "g", "u", "scores")]


def _unsupported_settings(config: Any) -> list[str]:
    defaults = GenerationConfig()
    return [name for name in UNSUPPORTED_SETTINGS
            if getattr(config, name, None) != getattr(defaults, name, None)]


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _replaced(module: torch.nn.Module) -> bool:
    """A forward replaced on the instance, or hooks: something the loop would bypass."""
    return ("forward" in module.__dict__ or bool(module._forward_hooks) or bool(module._forward_pre_hooks)
            or bool(getattr(module, "_forward_hooks_with_kwargs", None)))


def declines(model: Any, rows: int, max_new_tokens: int) -> str | None:
    """Why :func:`sample` cannot stand in for ``generate`` on ``model`` (None when it can). Call it before the
    caller's :func:`selfdistill.rollout.decode_linears`, whose own replaced forwards the loop bypasses anyway."""
    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} is not a plain LlamaForCausalLM"
    config = model.config
    if not 0 < rows <= cpu_decode.MAX_ROWS:
        return f"{rows} rows (the loop decodes 1 to {cpu_decode.MAX_ROWS})"
    if max_new_tokens < 1:
        return "no new tokens asked for"
    if torch.is_autocast_enabled("cpu"):
        return "autocast is on (its products run in bf16)"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r}"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the attention or MLP layers have biases"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} (the loop computes SiLU)"
    if model.training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout is active (training mode)"
    unsupported = _unsupported_settings(model.generation_config)
    if unsupported:
        return f"the generation config sets {', '.join(unsupported)}"
    body = model.model
    head_dim = _head_dim(config)
    widths = (config.hidden_size, config.num_attention_heads * head_dim, config.intermediate_size)
    if any(w % cpu_decode.WIDTH for w in widths) or head_dim % 2:
        return f"widths {widths} (multiples of {cpu_decode.WIDTH} needed) or an odd head size {head_dim}"
    modules = [model, body, body.norm]
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(m) is not torch.nn.Linear or m.bias is not None for m in linears):
            return "a layer's projections are not plain bias-free nn.Linear layers (PEFT adapters, quantization)"
        if any(type(n) is not LlamaRMSNorm for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return "a layer's norms are not LlamaRMSNorm"
        modules += [layer, attn, mlp, layer.input_layernorm, layer.post_attention_layernorm, *linears]
    if type(model.lm_head) is not torch.nn.Linear or model.lm_head.bias is not None:
        return "the output head is not a plain bias-free nn.Linear"
    modules.append(model.lm_head)
    if any(_replaced(m) for m in modules):
        return "a module has hooks or a replaced forward (accelerate offloading, another patch)"
    if any(p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous() for p in model.parameters()):
        return "the weights are not contiguous float32 tensors on the CPU"
    if cpu_decode.kernel() is None:
        return "the decode kernel is not available on this machine"
    return None


def _warpers(do_sample: bool, temperature: float, top_p: float, top_k: int | None) -> LogitsProcessorList:
    """The warpers ``generate`` applies for these settings, in its order."""
    warpers = LogitsProcessorList()
    if not do_sample:
        return warpers
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


class Decoder:
    """The KV cache, buffers and per-layer kernel arguments of one batch: :meth:`step` feeds each row one token and
    returns the next logits. Construct it under ``torch.no_grad()`` after :func:`declines` returned None."""

    def __init__(self, model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache: Any = None, max_new_tokens: int = 1):
        self.lib = cpu_decode.kernel()
        self.model, self.body = model, model.model
        rows, width = input_ids.shape
        config = model.config
        done_cols = cache.get_seq_length() if cache is not None else 0
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        # The prefill: the model's own forward over the columns the cache does not hold yet.
        out = model(input_ids=input_ids[:, done_cols:], attention_mask=attention_mask,
                    position_ids=positions[:, done_cols:], use_cache=True, logits_to_keep=1,
                    **({CACHE_KEY: cache} if cache is not None else {}))
        cache, self.first_logits = out[CACHE_KEY], out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        del out
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = _head_dim(config)
        hidden, inter, cap = config.hidden_size, config.intermediate_size, width + max_new_tokens
        n_layers = len(self.body.layers)
        self.kv = torch.zeros(n_layers, 2, rows, kv_heads, cap, head_dim)
        for i in range(n_layers):
            self.kv[i, 0, :, :, :width] = cache.layers[i].keys
            self.kv[i, 1, :, :, :width] = cache.layers[i].values
        del cache
        self.valid = torch.zeros(rows, cap, dtype=torch.uint8)  # which cached columns each row attends to
        self.valid[:, :width] = attention_mask.to(torch.uint8)
        threads = torch.get_num_threads()
        self.buffers = {name: torch.zeros(cpu_decode.MAX_ROWS, size) for name, size in
                        (("x", hidden), ("h", hidden), ("q", heads * head_dim), ("k", kv_heads * head_dim),
                         ("v", kv_heads * head_dim), ("att", heads * head_dim), ("g", inter), ("u", inter))}
        self.buffers["scores"] = torch.zeros(threads, cap)
        self.cos_sin = torch.zeros(2, rows, head_dim)
        self.plans = []
        for i, layer in enumerate(self.body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            args = _LayerArgs(rows, hidden, heads, kv_heads, head_dim, inter, cap, 0, threads,
                              layer.input_layernorm.variance_epsilon, attn.scaling)
            for name, tensor in (("ln1", layer.input_layernorm.weight),
                                 ("ln2", layer.post_attention_layernorm.weight), ("wq", attn.q_proj.weight),
                                 ("wk", attn.k_proj.weight), ("wv", attn.v_proj.weight), ("wo", attn.o_proj.weight),
                                 ("wg", mlp.gate_proj.weight), ("wu", mlp.up_proj.weight),
                                 ("wd", mlp.down_proj.weight), ("k_cache", self.kv[i, 0]),
                                 ("v_cache", self.kv[i, 1]), ("valid", self.valid), ("cos", self.cos_sin[0]),
                                 ("sin", self.cos_sin[1]), *self.buffers.items()):
                setattr(args, name, tensor.data_ptr())
            self.plans.append(args)
        self.rows, self.column, self.capacity = rows, width, cap
        self.last = positions[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[B]``) and return the ``[B, V]`` float32 logits that follow it."""
        if self.column >= self.capacity:
            raise ValueError(f"the decoder's cache holds {self.capacity} positions; make it with a larger "
                             "max_new_tokens")
        rows, x = self.rows, self.buffers["x"]
        self.valid[:, self.column] = 1
        self.last = self.last + 1
        x[:rows] = self.body.embed_tokens(tokens)
        cos, sin = self.body.rotary_emb(x, self.last[:, None])
        self.cos_sin[0], self.cos_sin[1] = cos[:, 0], sin[:, 0]
        for args in self.plans:
            args.pos = self.column
            self.lib.decode_layer(ctypes.byref(args))
        self.column += 1
        return cpu_decode.rows_times_weight(self.body.norm(x[:rows]), self.model.lm_head.weight, self.lib)


@torch.no_grad()
def sample(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any = None, *,
           max_new_tokens: int, eos: list[int], pad_id: int, do_sample: bool = True, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """``[B, n]`` new tokens (n <= max_new_tokens, ``pad_id`` after a row's EOS), as ``model.generate(input_ids,
    attention_mask=..., past_key_values=cache, ...)[:, W:]`` gives them. ``input_ids``/``attention_mask``:
    ``[B, W]`` left-padded prompts; ``cache``: a KV cache holding their first columns already (the shared prefixes
    of :func:`selfdistill.sequences.run_shared_prefixes`), or None. Check :func:`declines` first.

    Each step is ``generate``'s: the warpers, then ``torch.multinomial`` over the softmax (argmax when greedy), a
    finished row's token replaced by ``pad_id``, a row finished at its first EOS, the loop ended when all are."""
    decoder = Decoder(model, input_ids, attention_mask, cache, max_new_tokens)
    warpers = _warpers(do_sample, temperature, top_p, top_k)
    eos_t = torch.tensor(eos, dtype=torch.long)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long)
    logits = decoder.first_logits
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        scores = warpers(None, logits)
        if do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = tokens * unfinished + pad_id * (1 - unfinished)
        new.append(tokens)
        unfinished = unfinished & ~torch.isin(tokens, eos_t)
        if step == max_new_tokens - 1 or unfinished.max() == 0:
            break
        logits = decoder.step(tokens)
    return torch.stack(new, dim=1)
