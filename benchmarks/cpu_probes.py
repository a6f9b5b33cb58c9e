"""CPU probes behind docs/performance.md: bf16 autocast, teacher prefix sharing, static cache, the allocator.

Each probe times one piece of a training step on the embedded SmolLM2-135M-Instruct in float32, 2 threads, with
the main job's prompts (8 two-digit additions) and the OPSD teacher wording:

- ``bf16``: one student forward+backward over 8 x (prompt + 13) tokens, float32 vs bf16 autocast (on a CPU
  without AVX512-BF16/AMX, autocast emulates bfloat16).
- ``bf16gen``: ``generate`` of 8 x 16 tokens under bf16 as the trainer runs it (accelerate's autocast around each
  forward, so every decoding step casts the weights again) vs inside one enclosing autocast region
  (``selfdistill.sampling.generation_model``: one cast per call), float32 beside them; greedy, so the tokens can be
  compared.
- ``bf16copy``: a bfloat16 copy of the weights (no autocast) for sampling and the teacher pass, against the float32
  weights under one autocast region: ``generate`` of 8 x 16 sampled tokens, the teacher pass over 8 rollouts, the
  cost of refreshing the copy from the float32 weights, and the gap between the two log-probabilities.
- ``teacher``: the 8 teacher rows scored plainly vs with shared prefixes (``shared_prefix_logits``).
- ``cache``: ``generate`` of 8 x 16 tokens with the dynamic vs a static cache; ``--compile`` adds the static
  cache compiled by inductor (slow: minutes to compile); ``--bf16`` runs them in one bf16 autocast region.
- ``student``: the student's forward+backward over 8 rollouts at G = 1 (8 prompts) and G = 4 (2 prompts x 4):
  plain, with shared prefixes as two passes (``shared_prefix_logits``), and packed into one pass
  (``packed_completion_logits``); median of 3 interleaved rounds after a warm-up round.
- ``decode``: one decoding step's layer products for 8 rows (210 linears) as they are, with q/k/v and gate/up
  fused into single products, and through oneDNN's prepacked weights (plus the cost of prepacking them).
- ``profile``: the figures docs/performance.md and docs/benchmarks.md quote from profiles: the student pass's share
  of time in ``aten::mm`` and that product rate; ``aten::add``/``aten::fill_`` in the two-pass vs packed student
  backward at G = 4; ``generate`` at G = 4 (and how often attention took SDPA's math kernel); the G = 1 teacher
  rows packed into one row vs the two-pass layout.
- ``reuse``: sampling plus the student's forward+backward at G = 1 and G = 4, as the trainer runs them (a no-grad
  prefill inside sampling, then the packed student pass) vs reusing the prefill: the prompt (but its last token)
  runs with gradients before sampling, ``generate`` continues from a detached copy of its KV cache and the student
  pass continues from the cache that carries the graph; median of 3 interleaved rounds after a warm-up round.
- ``overlap``: sampling (8 rollouts, G = 1) and the teacher's prefill of its 8 contexts (the part of the teacher
  pass known before sampling) one after the other on 2 threads, vs both at once in two Python threads (1 + 1 and
  2 + 1 intra-op threads), the teacher on its own copy of the weights; median of 4 interleaved rounds.
- ``step``: one real G = 1 training step of ``benchmarks/train_step.py`` (selfdistill side, every lever on) under
  the profiler: its seconds in ``aten::mm`` (split into decoding products of at most 64 rows and the rest) against
  the step's other operators.
- ``g1``: where a G = 1 step's sampling goes in bf16 (matrix products, ``torch.multinomial``'s exponential draws,
  attention, under the profiler), and three well-kept paths tried against it: SDPA's math kernel for sampling, the
  teacher and the student pass; transformers' compiled static cache on a bfloat16 copy of the weights; the
  teacher's prefill in a second thread during sampling (all bf16; 5 interleaved rounds, each kept).
- ``matmul``: float32 matrix-product rate (GFLOP/s) of a large square product and of the training passes' shapes,
  the ceiling a compute-bound pass runs into.
- ``srtsample``: SD-Zero's self-revision stage samples a batch of 64 training prompts x up to 24 tokens
  (temperature 0.6, its recipe's settings) through ``sample_completions``: float32 against one bf16 autocast region
  (``selfdistill.rollout.sampling_precision``), each the mean of 2 calls after a warm-up call.
- ``heap``: one optimizer step of the packed G = 1 student pass (forward, backward, fused AdamW), float32 and bf16
  autocast, in two fresh processes: glibc's defaults (``GLIBC_TUNABLES`` removed from the child's environment:
  each large buffer a fresh ``mmap``) against the launch scripts' setting, applied at process start through the
  environment (``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``: freed buffers
  stay on the heap for the next step); seconds and minor page faults per step, median of 4 steps after one.
- ``padding``: token positions each layout feeds the model (padding included) against its rows' real tokens:
  the padded rectangle (SDFT's layout), the two-pass shared prefix (the teacher pass), the packed rows (the student
  pass), at G = 1 and 4.
- ``views``: ``teacher_batch_views``: AVSD's three views of 8 rollouts through the teacher pass in one forward, or
  one forward per view; seconds and token positions.
- ``bandwidth``: GB/s of weights streamed by a decoding step's float32 products (8 rows and 1 row, and MKL's
  prepacked format with its packing cost) beside a plain sum and copy over 540 MB: how far decoding is from the
  memory bandwidth; then the same products in bf16, plain and through oneDNN's prepacked weights.

    python benchmarks/cpu_probes.py                     # every probe (~12 min on 2 cores)
    python benchmarks/cpu_probes.py bf16 teacher        # some probes only
    python benchmarks/cpu_probes.py teacher --out F.json  # record in another file (e.g. another machine's run)

Prints each figure and records it in benchmarks/results/cpu_probes.json (probes not run keep their entries).
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from recipe_runs import machine  # noqa: E402  (benchmarks/, the script's own folder)

RESULTS = ROOT / "benchmarks" / "results" / "cpu_probes.json"
TEMPLATE = "{problem}\n\nHere is a reference solution:\n{solution}\n\nUnderstand it, then answer in your own words."
PROBES = ("bf16", "bf16gen", "bf16copy", "teacher", "cache", "student", "decode", "profile", "reuse", "overlap", "step",
          "matmul", "heap", "bandwidth", "padding", "views", "srtsample", "g1")
# The allocator setting the launch scripts (scripts/main_job.sh, scripts/launch.sh) export before Python starts.
TUNED_HEAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def timed(fn, repeats: int = 3) -> float:
    """Mean seconds of ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def setup():
    from selfdistill.modeling import load_model, load_tokenizer
    from selfdistill.sequences import render_context
    from selfdistill.sources import ReferenceSolution
    from selfdistill.sources.base import Rollout
    from selfdistill.tasks.arithmetic import make_arithmetic_dataset

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct")
    rows = [make_arithmetic_dataset(2000, 200, seed=0, digits=2)["train"][i] for i in range(8)]
    prompts = [render_context(tok, r["prompt"]) for r in rows]
    views = ReferenceSolution(column="solution", template=TEMPLATE).views(
        [Rollout(row=r, prompt=r["prompt"], completion="", completion_ids=[]) for r in rows])
    teacher = [render_context(tok, v[0].context) for v in views]
    completion = tok(" The answer is 12345.", add_special_tokens=False)["input_ids"][:12] + [tok.eos_token_id]
    return tok, model, prompts, teacher, [completion] * 8


def probe_bf16(ctx) -> dict:
    from selfdistill.sequences import completion_logits, splice

    tok, model, prompts, _, completions = ctx
    batch = splice(prompts, completions, tok.pad_token_id)

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = completion_logits(model, batch)
        out.float().logsumexp(-1).sum().backward()
        model.zero_grad()

    return {"native_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
            "student_fwd_bwd_float32_s": timed(lambda: step(False), 2),
            "student_fwd_bwd_bf16_autocast_s": timed(lambda: step(True), 1)}


def probe_bf16gen(ctx) -> dict:
    import copy

    from accelerate import Accelerator

    from selfdistill.rollout import sample_completions
    from selfdistill.sampling import generation_model

    tok, model, prompts, _, _ = ctx
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    wrapped = accelerator.prepare(copy.deepcopy(model))  # forward under autocast, as in training
    out: dict = {}
    tokens = {}

    def run(name, target, region):
        def call():
            with region() if region else contextlib.nullcontext(target) as m:
                tokens[name] = sample_completions(m, prompts, pad_id=tok.pad_token_id, eos=[tok.eos_token_id],
                                                  max_new_tokens=16, do_sample=False).completion_ids
        out[f"{name}_s"] = timed(call, 3)

    run("float32", model, None)
    run("bf16_autocast_per_forward", wrapped, None)
    run("bf16_one_region", wrapped, lambda: generation_model(wrapped, accelerator))
    out["bf16_same_tokens"] = tokens["bf16_autocast_per_forward"] == tokens["bf16_one_region"]
    return out


def probe_teacher(ctx) -> dict:
    from selfdistill.sequences import completion_logits, shared_prefix_logits, splice

    tok, model, _, teacher, completions = ctx
    batch = splice(teacher, completions, tok.pad_token_id)
    with torch.no_grad():
        return {"teacher_plain_s": timed(lambda: completion_logits(model, batch)),
                "teacher_shared_prefix_s": timed(lambda: shared_prefix_logits(model, batch, teacher))}


def probe_cache(ctx, compile_too: bool, bf16: bool = False) -> dict:
    """``--bf16``: every call inside one bf16 autocast region, as the trainer samples (one weight cast per call)."""
    from selfdistill.sequences import splice

    tok, model, prompts, _, _ = ctx
    batch = splice(prompts, [[] for _ in prompts], tok.pad_token_id)
    width = batch.context_width
    ids, mask = batch.input_ids[:, :width], batch.attention_mask[:, :width]

    def generate(**kw):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.6, top_k=0,
                           max_new_tokens=16, min_new_tokens=16, pad_token_id=tok.pad_token_id, **kw)

    out = {"precision": "bf16 autocast" if bf16 else "float32", "generate_dynamic_cache_s": timed(generate),
           "generate_static_cache_s": timed(lambda: generate(cache_implementation="static"))}
    if compile_too:
        from transformers import CompileConfig

        config = CompileConfig()
        config._compile_all_devices = True  # transformers compiles on the CPU only when told to
        start = time.perf_counter()
        generate(cache_implementation="static", compile_config=config)
        out["generate_compiled_first_call_s"] = time.perf_counter() - start
        out["generate_compiled_s"] = timed(lambda: generate(cache_implementation="static", compile_config=config))
    return out


def probe_bf16copy(ctx) -> dict:
    """A bfloat16 copy of the weights for sampling and the teacher pass (no autocast), against the trainer's float32
    weights under one bf16 autocast region: the same 8 main-job prompts x 16 sampled tokens, the teacher pass over 8
    rollouts, the cost of refreshing the copy after an optimizer step, and how far the copy's log-probabilities of
    the same tokens are from autocast's (the precision gap sampling would then have from the scored policy)."""
    import copy

    from selfdistill.sequences import completion_logits, shared_prefix_logits, splice

    tok, model, prompts, teacher, completions = ctx
    batch = splice(prompts, [[] for _ in prompts], tok.pad_token_id)
    width = batch.context_width
    ids, mask = batch.input_ids[:, :width], batch.attention_mask[:, :width]
    twin = copy.deepcopy(model).to(torch.bfloat16)
    scored = splice(teacher, completions, tok.pad_token_id)

    def generate(target, autocast: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            target.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.6, top_k=0,
                            max_new_tokens=16, min_new_tokens=16, pad_token_id=tok.pad_token_id)

    def teacher_pass(target, autocast: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = shared_prefix_logits(target, scored, teacher)
            return (completion_logits(target, scored) if out is None else out).float().log_softmax(-1)

    def refresh():
        with torch.no_grad():
            for mine, theirs in zip(twin.parameters(), model.parameters()):
                mine.copy_(theirs)

    gap = (teacher_pass(twin, False) - teacher_pass(model, True)).abs()
    return {"generate_float32_weights_one_autocast_region_s": timed(lambda: generate(model, True)),
            "generate_bf16_copy_s": timed(lambda: generate(twin, False)),
            "teacher_pass_autocast_s": timed(lambda: teacher_pass(model, True)),
            "teacher_pass_bf16_copy_s": timed(lambda: teacher_pass(twin, False)),
            "refresh_copy_s": timed(refresh),
            "logprob_gap_mean_nats": float(gap.mean()), "logprob_gap_max_nats": float(gap.max())}


def probe_student(ctx) -> dict:
    import random
    import statistics

    from selfdistill.sequences import completion_logits, packed_completion_logits, shared_prefix_logits, splice

    tok, model, prompts, _, completions = ctx
    rng = random.Random(0)
    completions = [c[: rng.randint(6, len(c))] for c in completions]  # rollouts of different lengths
    out = {}
    for g, contexts in ((1, prompts), (4, [prompts[0]] * 4 + [prompts[1]] * 4)):
        batch = splice(contexts, completions, tok.pad_token_id)
        mask = batch.completion_mask.bool()
        passes = {"plain": lambda b=batch: completion_logits(model, b),
                  "two_pass_shared": lambda b=batch, c=contexts: shared_prefix_logits(model, b, c),
                  "packed": lambda b=batch, c=contexts: packed_completion_logits(model, b, c)}
        times: dict[str, list[float]] = {name: [] for name in passes}
        for round_ in range(4):
            for name, fn in passes.items():
                start = time.perf_counter()
                fn()[mask].logsumexp(-1).sum().backward()
                model.zero_grad(set_to_none=True)
                if round_:
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            out[f"G{g}_{name}_s"] = statistics.median(values)
    return out


def probe_decode(_ctx) -> dict:
    layers = [[torch.randn(o, i) * 0.02 for (o, i) in LAYER_SHAPES] for _ in range(30)]
    xs = {576: torch.randn(8, 576), 1536: torch.randn(8, 1536)}
    fused = [[torch.cat(ws[0:3]), ws[3], torch.cat(ws[4:6]), ws[6]] for ws in layers]  # qkv, o, gate+up, down

    def run(groups):
        for ws in groups:
            for w in ws:
                w @ xs[w.shape[1]].T

    out = {"layers_separate_ms": 1e3 * timed(lambda: run(layers), 5),
           "layers_fused_qkv_gate_up_ms": 1e3 * timed(lambda: run(fused), 5)}
    mkldnn = torch.ops.mkldnn
    if hasattr(mkldnn, "_reorder_linear_weight"):
        start = time.perf_counter()
        packed = [[mkldnn._reorder_linear_weight(w, 8) for w in ws] for ws in fused]
        out["onednn_prepack_all_ms"] = 1e3 * (time.perf_counter() - start)

        def onednn():
            for ws in packed:
                for w in ws:
                    mkldnn._linear_pointwise(xs[w.shape[1]], w, None, "none", [], "")

        out["layers_fused_onednn_prepacked_ms"] = 1e3 * timed(onednn, 5)
    return out


def _self_seconds(prof, names) -> float:
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in names) / 1e6


def probe_profile(ctx) -> dict:
    from torch.profiler import ProfilerActivity, profile

    import selfdistill.rollout as rollout
    from selfdistill.sequences import completion_logits, packed_completion_logits, shared_prefix_logits, splice

    tok, model, prompts, teacher, completions = ctx
    out = {}
    batch = splice(prompts, completions, tok.pad_token_id)
    mask = batch.completion_mask.bool()

    def student(fn):
        fn()[mask].logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)

    student(lambda: completion_logits(model, batch))
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        student(lambda: completion_logits(model, batch))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = [e for e in events if e.key == "aten::mm"]
    mm_seconds = sum(e.self_cpu_time_total for e in mm) / 1e6
    out["student_G1_mm_share"] = mm_seconds / total
    out["student_G1_mm_gflops"] = sum(e.flops for e in mm) / mm_seconds / 1e9

    g4 = [prompts[0]] * 4 + [prompts[1]] * 4
    batch4 = splice(g4, completions, tok.pad_token_id)
    mask4 = batch4.completion_mask.bool()
    for name, fn in (("two_pass", lambda: shared_prefix_logits(model, batch4, g4)),
                     ("packed", lambda: packed_completion_logits(model, batch4, g4))):
        fn()[mask4].sum().backward()
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()[mask4].logsumexp(-1).sum().backward()
            model.zero_grad(set_to_none=True)
        out[f"student_G4_{name}_add_fill_s"] = _self_seconds(prof, {"aten::add", "aten::fill_"})

    def generate():
        torch.manual_seed(0)
        return rollout.sample_completions(model, g4, pad_id=tok.pad_token_id, eos=[tok.eos_token_id],
                                          max_new_tokens=16, temperature=0.6)

    out["generate_G4_s"] = timed(generate, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate()
    out["generate_G4_sdpa_math_calls"] = sum(
        e.count for e in prof.key_averages() if e.key == "aten::_scaled_dot_product_attention_math")

    tbatch = splice(teacher, completions, tok.pad_token_id)
    with torch.no_grad():
        out["teacher_G1_two_pass_s"] = timed(lambda: shared_prefix_logits(model, tbatch, teacher), 2)
        from selfdistill.sequences import pack_rows

        packed_all = pack_rows(teacher, completions, tokens_per_pair=float("inf"))  # one row, as the student packs
        out["teacher_G1_one_packed_row_tokens"] = int(packed_all.input_ids.shape[1])
        hidden_mask = packed_all.mask(True, torch.float32, "cpu")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=packed_all.input_ids, attention_mask=hidden_mask, position_ids=packed_all.position_ids,
                  use_cache=False, logits_to_keep=1)
        out["teacher_G1_one_packed_row_attention_s"] = _self_seconds(
            prof, {"aten::_scaled_dot_product_flash_attention_for_cpu"})
    return out


def _detached(cache, config):
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys.detach(), layer.values.detach()) for layer in cache.layers],
                        config=config)


def probe_reuse(ctx) -> dict:
    import statistics

    import selfdistill.rollout as rollout
    from selfdistill.sequences import (
        CACHE_KEY,
        MIN_SHARED_PREFIX,
        left_pad,
        packed_completion_logits,
        run_shared_prefixes,
        splice,
    )

    tok, model, prompts, _, _ = ctx
    pad, eos = tok.pad_token_id, [tok.eos_token_id]
    model.train()

    def trainer_way(contexts):  # what SelfDistillTrainer runs today
        torch.manual_seed(0)
        start = time.perf_counter()
        gen = rollout.sample_completions(model, contexts, pad_id=pad, eos=eos, max_new_tokens=16, temperature=0.6)
        sampled = time.perf_counter()
        batch = splice(contexts, gen.completion_ids, pad)
        packed_completion_logits(model, batch, contexts)[batch.completion_mask.bool()].logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)
        return sampled - start, time.perf_counter() - sampled, gen.completion_ids

    def reusing(contexts):  # the prompt but its last token with gradients; sampling and the student continue from it
        torch.manual_seed(0)
        start = time.perf_counter()
        shared = run_shared_prefixes(model, contexts, MIN_SHARED_PREFIX, "cpu", keep_last=True, pad_id=pad)
        cache, mask, ids = shared.cache, shared.mask, shared.ids
        heads = [s[:-1] for s in shared.suffixes]
        if max(len(h) for h in heads):
            head_ids, head_mask = left_pad(heads, max(len(h) for h in heads), pad)
            mask = torch.cat([mask, head_mask], 1)
            model(input_ids=head_ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **{CACHE_KEY: cache},
                  position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, shared.mask.shape[1]:])
            ids = torch.cat([ids, head_ids], 1)
        last = torch.tensor([[s[-1]] for s in shared.suffixes])
        with torch.no_grad():
            out = model.generate(input_ids=torch.cat([ids, last], 1), pad_token_id=pad, eos_token_id=eos,
                                 attention_mask=torch.cat([mask, torch.ones_like(last)], 1), do_sample=True,
                                 max_new_tokens=16, temperature=0.6, top_k=0,
                                 **{CACHE_KEY: _detached(cache, model.config)})
        completions = []
        for row in out[:, ids.shape[1] + 1:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            completions.append(row if cut is None else row[: cut + 1])
        sampled = time.perf_counter()
        comp_ids, comp_mask = left_pad([c[::-1] for c in completions], max(map(len, completions)), pad)
        comp_ids, comp_mask = comp_ids.flip(1), comp_mask.flip(1)  # right-padded
        full = torch.cat([mask, torch.ones_like(last), comp_mask], 1)
        rest = model(input_ids=torch.cat([last, comp_ids], 1), attention_mask=full, use_cache=True,
                     position_ids=(full.cumsum(-1) - 1).clamp_min(0)[:, mask.shape[1]:],
                     logits_to_keep=comp_ids.shape[1] + 1, **{CACHE_KEY: cache})
        rest.logits[:, :-1][comp_mask.bool()].logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)
        return sampled - start, time.perf_counter() - sampled, completions

    out = {}
    for g, contexts in ((1, prompts), (4, [prompts[0]] * 4 + [prompts[1]] * 4)):
        times: dict[str, list[tuple[float, float]]] = {"trainer": [], "reusing_prefill": []}
        drawn = {}
        for round_ in range(4):
            for name, fn in (("trainer", trainer_way), ("reusing_prefill", reusing)):
                sample_s, student_s, drawn[name] = fn(contexts)
                if round_:
                    times[name].append((sample_s, student_s))
        for name, values in times.items():
            sample_s = statistics.median(v[0] for v in values)
            student_s = statistics.median(v[1] for v in values)
            out[f"G{g}_{name}_sampling_s"] = sample_s
            out[f"G{g}_{name}_student_s"] = student_s
            out[f"G{g}_{name}_total_s"] = statistics.median(v[0] + v[1] for v in values)
        out[f"G{g}_same_tokens_drawn"] = drawn["trainer"] == drawn["reusing_prefill"]
    return out


@torch.no_grad()
def _teacher_prefill(teacher_model, teacher, pad) -> None:
    """Each teacher context but its last token into a KV cache, the shared prefix once (what the teacher pass can run
    before sampling ends)."""
    from selfdistill.sequences import CACHE_KEY, left_pad, run_shared_prefixes

    shared = run_shared_prefixes(teacher_model, teacher, 8, "cpu", keep_last=True, pad_id=pad)
    ids, mask = left_pad(shared.suffixes, max(map(len, shared.suffixes)), pad)
    full = torch.cat([shared.mask, mask], 1)
    positions = (full.cumsum(-1) - 1).clamp_min(0)[:, shared.mask.shape[1]:]
    teacher_model(input_ids=ids, attention_mask=full, use_cache=True, logits_to_keep=1, position_ids=positions,
                  **{CACHE_KEY: shared.cache})


def probe_overlap(ctx) -> dict:
    import copy
    import statistics
    import threading

    import selfdistill.rollout as rollout

    tok, model, prompts, teacher, _ = ctx
    pad = tok.pad_token_id
    teacher_model = copy.deepcopy(model).eval()
    threads = torch.get_num_threads()

    def sample():
        torch.manual_seed(0)
        rollout.sample_completions(model, prompts, pad_id=pad, eos=[tok.eos_token_id], max_new_tokens=16,
                                   temperature=0.6)

    def teacher_prefill():
        _teacher_prefill(teacher_model, teacher, pad)

    def one_after_other():
        start = time.perf_counter()
        sample()
        teacher_prefill()
        return time.perf_counter() - start

    def together(sample_threads: int, teacher_threads: int):
        def run(fn, n):
            torch.set_num_threads(n)
            fn()

        start = time.perf_counter()
        workers = [threading.Thread(target=run, args=(sample, sample_threads)),
                   threading.Thread(target=run, args=(teacher_prefill, teacher_threads))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        torch.set_num_threads(threads)
        return time.perf_counter() - start

    out = {"sampling_alone_s": timed(sample, 2), "teacher_prefill_alone_s": timed(teacher_prefill, 2)}
    rounds: dict[str, list[float]] = {"one_after_other_s": [], "together_1_1_threads_s": [],
                                      "together_2_1_threads_s": []}
    for _ in range(4):
        rounds["one_after_other_s"].append(one_after_other())
        rounds["together_1_1_threads_s"].append(together(1, 1))
        rounds["together_2_1_threads_s"].append(together(2, 1))
    out.update({key: statistics.median(values) for key, values in rounds.items()})
    return out


def probe_g1(ctx) -> dict:
    """Where a G = 1 step's sampling goes in bf16, and the well-kept paths tried against it (issue "lean core").

    ``generate`` of the 8 main-job prompts x 16 sampled tokens in one bf16 autocast region (as the trainer samples),
    under the profiler: its seconds in matrix products, in ``aten::exponential_`` (``torch.multinomial`` draws a
    token through it, over the whole 49,152-token vocabulary each step) and in attention. Then, medians of 3 after a
    warm-up: SDPA's math kernel instead of its CPU flash kernel (``torch.nn.attention.sdpa_kernel``) for sampling,
    the teacher pass and the packed student pass; transformers' static cache compiled by inductor on a bfloat16
    copy of the weights (no autocast, so no cast inside the compiled graph) against the same copy eager; and the
    teacher's prefill in a second thread while sampling runs, both in bf16."""
    import copy
    import statistics
    import threading

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    from transformers import CompileConfig

    import selfdistill.rollout as rollout
    from selfdistill.sequences import (
        packed_completion_logits,
        shared_prefix_logits,
        splice,
    )

    tok, model, prompts, teacher, completions = ctx
    pad = tok.pad_token_id
    completions = [c[: 8 + i % 6] for i, c in enumerate(completions)]
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def median(fn, n=3):
        fn()
        seconds = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    def sample(target=model, autocast=True):
        torch.manual_seed(0)
        with torch.no_grad(), bf16() if autocast else contextlib.nullcontext():
            return rollout.sample_completions(target, prompts, pad_id=pad, eos=[tok.eos_token_id], max_new_tokens=16,
                                              temperature=0.6)

    out = {}
    sample()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        sample()
        out["generate_profiled_wall_s"] = time.perf_counter() - start
    events = prof.key_averages()
    out["generate_self_cpu_s"] = sum(e.self_cpu_time_total for e in events) / 1e6
    out["generate_mm_s"] = _self_seconds(prof, {"aten::mm"})
    out["generate_exponential_s"] = _self_seconds(prof, {"aten::exponential_"})
    out["generate_attention_s"] = _self_seconds(prof, {"aten::_scaled_dot_product_flash_attention_for_cpu",
                                                       "aten::_scaled_dot_product_attention_math"})

    tbatch, sbatch = splice(teacher, completions, pad), splice(prompts, completions, pad)

    def teacher_pass():
        with torch.no_grad(), bf16():
            shared_prefix_logits(model, tbatch, teacher)

    def student_pass():
        with bf16():
            logits = packed_completion_logits(model, sbatch, prompts)
        logits.float().logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)

    for name, fn in (("generate", sample), ("teacher", teacher_pass), ("student", student_pass)):
        out[f"{name}_flash_s"] = median(fn)
        with sdpa_kernel([SDPBackend.MATH]):
            out[f"{name}_math_s"] = median(fn)

    twin = copy.deepcopy(model).to(torch.bfloat16).eval()
    batch = splice(prompts, [[] for _ in prompts], pad)
    width = batch.context_width
    ids, mask = batch.input_ids[:, :width], batch.attention_mask[:, :width]
    config = CompileConfig()
    config._compile_all_devices = True  # transformers compiles on the CPU only when told to

    def generate_static(compiled: bool):
        torch.manual_seed(0)
        with torch.no_grad():
            twin.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.6, top_k=0,
                          max_new_tokens=16, min_new_tokens=16, pad_token_id=pad, cache_implementation="static",
                          **({"compile_config": config} if compiled else {}))

    out["bf16_weights_static_cache_eager_s"] = median(lambda: generate_static(False))
    start = time.perf_counter()
    generate_static(True)
    out["bf16_weights_static_cache_compiled_first_call_s"] = time.perf_counter() - start
    out["bf16_weights_static_cache_compiled_s"] = median(lambda: generate_static(True))

    teacher_model = copy.deepcopy(model).eval()
    threads = torch.get_num_threads()

    def teacher_prefill():
        with bf16():
            _teacher_prefill(teacher_model, teacher, pad)

    def together():
        def run(fn):
            torch.set_num_threads(1)
            fn()

        workers = [threading.Thread(target=run, args=(fn,)) for fn in (sample, teacher_prefill)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        torch.set_num_threads(threads)

    # interleaved rounds after a warm-up of each, every round kept: the gain is near the machine's spread
    rounds: dict[str, list[float]] = {"overlap_one_after_other_rounds_s": [], "overlap_together_1_1_rounds_s": []}
    sample(), teacher_prefill(), together()
    for _ in range(5):
        for key, fn in zip(rounds, (lambda: (sample(), teacher_prefill()), together)):
            start = time.perf_counter()
            fn()
            rounds[key].append(round(time.perf_counter() - start, 3))
    out.update(rounds)
    out["overlap_one_after_other_s"] = statistics.median(rounds["overlap_one_after_other_rounds_s"])
    out["overlap_together_1_1_threads_s"] = statistics.median(rounds["overlap_together_1_1_rounds_s"])
    return out


def probe_step(_ctx) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback, set_seed

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    from selfdistill.config import SelfDistillConfig
    from selfdistill.modeling import load_model, load_tokenizer
    from selfdistill.sources import ReferenceSolution
    from selfdistill.trainer import SelfDistillTrainer

    out: dict = {}

    class Profiled(TrainerCallback):  # the third step (two warm-up steps before it)
        def __init__(self):
            self.prof = None
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None:
                return
            self.prof.__exit__(None, None, None)
            out["step_wall_s"] = time.perf_counter() - self.start
            events = self.prof.key_averages(group_by_input_shape=True)
            self.prof = None
            mm = [e for e in events if e.key == "aten::mm"]

            def decoding(e):  # a decoding-sized product: one side has at most 64 rows
                return any(shape and min(shape) <= 64 for shape in e.input_shapes[:2] if len(shape) == 2)

            out["ops_self_s"] = sum(e.self_cpu_time_total for e in events) / 1e6
            out["mm_decoding_s"] = sum(e.self_cpu_time_total for e in mm if decoding(e)) / 1e6
            out["mm_passes_s"] = sum(e.self_cpu_time_total for e in mm if not decoding(e)) / 1e6
            out["other_ops_s"] = out["ops_self_s"] - out["mm_decoding_s"] - out["mm_passes_s"]

    set_seed(train_step.SEED)
    tok, model = load_tokenizer(train_step.MODEL), load_model(train_step.MODEL)
    args = SelfDistillConfig(**train_step.selfdistill_kwargs(1, 8, 3, str(ROOT / "outputs" / "cpu_probes_step")))
    SelfDistillTrainer(model=model, args=args, train_dataset=train_step.make_dataset(), processing_class=tok,
                       privileged=ReferenceSolution(column="solution", template=train_step.OPSD_TEMPLATE),
                       callbacks=[Profiled()]).train()
    return out


def probe_matmul(_ctx) -> dict:
    out = {}
    for m, n, k in ((2048, 2048, 2048), (480, 1536, 576), (480, 576, 1536), (104, 1536, 576)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        out[f"mm_{m}x{n}x{k}_gflops"] = 2 * m * n * k / timed(lambda a=a, b=b: a @ b, 20) / 1e9
    return out


def heap_worker(mode: str) -> dict:
    """One optimizer step of the packed student pass (float32, then bf16 autocast), under whatever allocator setting
    this process was started with (``GLIBC_TUNABLES`` in its environment, read by glibc at process start)."""
    import resource
    import statistics

    from selfdistill.sequences import packed_completion_logits, splice

    tok, model, prompts, _, completions = setup()
    batch = splice(prompts, completions, tok.pad_token_id)
    mask = batch.completion_mask.bool()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)
    out = {}
    for precision in ("float32", "bf16"):
        seconds, faults = [], []
        for round_ in range(5):
            start, faults_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = packed_completion_logits(model, batch, prompts)
            logits.float()[mask].log_softmax(-1).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:  # the first round allocates the optimizer state
                seconds.append(time.perf_counter() - start)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
        out[f"{mode}_{precision}_step_s"] = statistics.median(seconds)
        out[f"{mode}_{precision}_minor_faults"] = statistics.median(faults)
    out[f"{mode}_GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "")
    return out


def probe_heap(_ctx) -> dict:
    """The launch scripts' ``GLIBC_TUNABLES`` setting: the same student step in two fresh processes, one with glibc's
    defaults (``GLIBC_TUNABLES`` removed from its environment) and one started with ``TUNED_HEAP``."""
    out = {}
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    for mode, env in (("plain", base), ("tuned", {**base, "GLIBC_TUNABLES": TUNED_HEAP})):
        done = subprocess.run([sys.executable, __file__, "--heap-worker", mode], capture_output=True, text=True,
                              check=True, env=env)
        out |= json.loads(done.stdout.strip().splitlines()[-1])
    for precision in ("float32", "bf16"):
        out[f"{precision}_speedup"] = out[f"plain_{precision}_step_s"] / out[f"tuned_{precision}_step_s"]
    return out


def probe_padding(ctx) -> dict:
    """Token positions each layout feeds the model (padding included) against the real tokens of its rows, for the
    student pass (prompt + completion) and the teacher pass (teacher context + completion), 8 main-job rows with
    completions of 6-13 tokens: one padded rectangle (SDFT's layout, and ours with sharing off), the two-pass
    shared prefix (our teacher pass) and the packed rows (our student pass). Forward only, no timing."""
    import random

    from selfdistill.sequences import completion_logits, packed_completion_logits, shared_prefix_logits, splice

    tok, model, prompts, teacher, completions = ctx
    rng = random.Random(0)
    completions = [c[: rng.randint(6, len(c))] for c in completions]
    fed = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["input_ids"].numel()),
                                             with_kwargs=True)
    out = {}
    try:
        for g in (1, 4):
            pick = (lambda rows: rows) if g == 1 else (lambda rows: [rows[0]] * 4 + [rows[1]] * 4)
            for side, contexts in (("student", pick(prompts)), ("teacher", pick(teacher))):
                batch = splice(contexts, completions, tok.pad_token_id)
                out[f"G{g}_{side}_real_tokens"] = sum(len(c) + len(x) for c, x in zip(contexts, completions))
                layouts = {"rectangle": lambda b=batch: completion_logits(model, b),
                           "two_pass_shared": lambda b=batch, c=contexts: shared_prefix_logits(model, b, c),
                           "packed": lambda b=batch, c=contexts: packed_completion_logits(model, b, c)}
                for name, fn in layouts.items():
                    fed.clear()
                    with torch.no_grad():
                        fn()
                    out[f"G{g}_{side}_{name}_positions"] = sum(fed)
    finally:
        handle.remove()
    return out


def probe_views(ctx) -> dict:
    """teacher_batch_views: AVSD's three views of 8 main-job rollouts (its recipe's views) through the teacher pass in
    one forward over the 24 sequences, or one forward per view; seconds (median of 3 after a warm-up) and the token
    positions fed, with the shared-prefix pass on (as the trainer runs it)."""
    import statistics

    from selfdistill.methods.avsd.source import MultiView
    from selfdistill.sequences import render_context
    from selfdistill.sources.base import Rollout
    from selfdistill.step import teacher_outputs
    from selfdistill.tasks.arithmetic import make_arithmetic_dataset

    tok, model, _, _, completions = ctx
    rows = [make_arithmetic_dataset(2000, 200, seed=0, digits=2)["train"][i] for i in range(8)]
    views = MultiView(answer_column="answer").views(
        [Rollout(row=r, prompt=r["prompt"], completion="", completion_ids=[]) for r in rows])
    inputs = {"teacher_ids": [[render_context(tok, v.context) for v in vs] for vs in views],
              "teacher_completion_ids": [[c] * len(vs) for c, vs in zip(completions, views)]}
    fed = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["input_ids"].numel()),
                                             with_kwargs=True)
    out = {"views": len(views[0])}
    try:
        for batched in (True, False):
            name = "one_forward" if batched else "per_view"
            seconds = []
            for round_ in range(4):
                fed.clear()
                start = time.perf_counter()
                with torch.no_grad():
                    teacher_outputs(model, inputs, None, tok.pad_token_id, torch.device("cpu"), True, batched)
                if round_:
                    seconds.append(time.perf_counter() - start)
            out[f"{name}_s"] = statistics.median(seconds)
            out[f"{name}_positions"] = sum(fed)
    finally:
        handle.remove()
    return out


def probe_bandwidth(_ctx) -> dict:
    """How close a decoding step's products come to the memory bandwidth: GB/s of weights streamed, float32.

    A plain sum and copy over 540 MB (the model's size) read the machine's bandwidth; the 210 layer products of one
    decoding step (8 rows, then 1 row) and the output head read their weights once each, so bytes / seconds is the
    rate their kernel streams at. ``prepacked``: MKL's own packed format for 8 rows (the private op inductor
    uses), with the seconds packing costs, which a training run pays again after every optimizer step."""
    big = torch.randn(135_000_000)
    copy = torch.empty_like(big)
    layers = [torch.randn(o, i) * 0.02 for _ in range(30) for (o, i) in LAYER_SHAPES]
    head = torch.randn(49152, 576) * 0.02
    layer_bytes, head_bytes = sum(w.numel() * 4 for w in layers), head.numel() * 4
    out = {"sum_GBps": big.numel() * 4 / timed(big.sum, 5) / 1e9,
           "copy_GBps_read_plus_write": 2 * big.numel() * 4 / timed(lambda: copy.copy_(big), 5) / 1e9}
    for rows in (8, 1):
        xs = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
        out[f"layers_F.linear_{rows}_rows_GBps"] = layer_bytes / timed(
            lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in layers], 5) / 1e9
        out[f"head_F.linear_{rows}_rows_GBps"] = head_bytes / timed(lambda xs=xs: F.linear(xs[576], head), 10) / 1e9
    if hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        xs = {576: torch.randn(8, 576), 1536: torch.randn(8, 1536)}
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, 8) for w in layers]
        out["layers_prepacked_8_rows_GBps"] = layer_bytes / timed(
            lambda: [torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, 8) for w, p in zip(layers, packed)], 5) / 1e9
        out["layers_packing_s"] = timed(lambda: [torch.ops.mkl._mkl_reorder_linear_weight(w, 8) for w in layers], 2)
        packed_head = torch.ops.mkl._mkl_reorder_linear_weight(head, 8)
        out["head_prepacked_8_rows_GBps"] = head_bytes / timed(
            lambda: torch.ops.mkl._mkl_linear(xs[576], packed_head, head, None, 8), 10) / 1e9
        out["head_packing_s"] = timed(lambda: torch.ops.mkl._mkl_reorder_linear_weight(head, 8), 3)
    # bf16, the trainer's mode: the same products on bfloat16 weights (as autocast's cached casts hold them during
    # generate), plain and through oneDNN's prepacked weights (the private ops inductor's freezing uses).
    layers16, head16 = [w.bfloat16() for w in layers], head.bfloat16()
    xs16 = {576: torch.randn(8, 576).bfloat16(), 1536: torch.randn(8, 1536).bfloat16()}
    out["bf16_layers_8_rows_GBps"] = layer_bytes / 2 / timed(
        lambda: [F.linear(xs16[w.shape[1]], w) for w in layers16], 5) / 1e9
    out["bf16_head_8_rows_GBps"] = head_bytes / 2 / timed(lambda: F.linear(xs16[576], head16), 10) / 1e9
    mkldnn = torch.ops.mkldnn
    if hasattr(mkldnn, "_reorder_linear_weight"):
        packed16 = [mkldnn._reorder_linear_weight(w, 8) for w in layers16]
        out["bf16_layers_onednn_prepacked_8_rows_GBps"] = layer_bytes / 2 / timed(
            lambda: [mkldnn._linear_pointwise(xs16[w.shape[1]], p, None, "none", [], "")
                     for w, p in zip(layers16, packed16)], 5) / 1e9
        packed_head16 = mkldnn._reorder_linear_weight(head16, 8)
        out["bf16_head_onednn_prepacked_8_rows_GBps"] = head_bytes / 2 / timed(
            lambda: mkldnn._linear_pointwise(xs16[576], packed_head16, None, "none", [], ""), 10) / 1e9
        out["bf16_onednn_packing_s"] = timed(
            lambda: [mkldnn._reorder_linear_weight(w, 8) for w in [*layers16, head16]], 2)
    return out


def probe_srtsample(ctx) -> dict:
    from types import SimpleNamespace

    from selfdistill.rollout import sample_completions, sampling_precision
    from selfdistill.sequences import render_context
    from selfdistill.tasks.arithmetic import make_arithmetic_dataset

    tok, model, *_ = ctx
    rows = make_arithmetic_dataset(2000, 200, seed=0, digits=2)["train"].select(range(64))
    prompts = [render_context(tok, r["prompt"]) for r in rows]
    out = {}
    for name, bf16 in (("float32", False), ("bf16_autocast", True)):
        def draw(bf16=bf16):
            torch.manual_seed(0)
            with torch.no_grad(), sampling_precision(model, SimpleNamespace(bf16=bf16)):
                sample_completions(model, prompts, pad_id=tok.pad_token_id, eos=[tok.eos_token_id],
                                   max_new_tokens=24, temperature=0.6)
        out[f"sample_64x24_{name}_s"] = timed(draw, 2)
    out["speedup"] = out["sample_64x24_float32_s"] / out["sample_64x24_bf16_autocast_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probes", nargs="*", default=list(PROBES), help=f"some of {', '.join(PROBES)} (default: all)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled static-cache decode")
    parser.add_argument("--bf16", action="store_true", help="the cache probe under bf16 autocast (one region a call)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="record here (default: %(default)s)")
    parser.add_argument("--heap-worker", choices=("plain", "tuned"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.heap_worker:
        print(json.dumps(heap_worker(opts.heap_worker)))
        return
    unknown = sorted(set(opts.probes) - set(PROBES))
    if unknown:
        raise SystemExit(f"unknown probe(s) {unknown}; choose from {', '.join(PROBES)}")
    ctx = setup() if set(opts.probes) - {"decode", "matmul", "step", "heap", "bandwidth"} else None
    # Probes run now replace their earlier entries; the others stay as recorded.
    results = json.loads(opts.out.read_text())["results"] if opts.out.exists() else {}
    for name in opts.probes:
        print(f"probe {name} ...", flush=True)
        fn = {"bf16": probe_bf16, "bf16gen": probe_bf16gen, "teacher": probe_teacher,
              "cache": lambda c: probe_cache(c, opts.compile, opts.bf16), "student": probe_student,
              "bf16copy": probe_bf16copy,
              "decode": probe_decode,
              "profile": probe_profile, "reuse": probe_reuse, "overlap": probe_overlap, "step": probe_step,
              "matmul": probe_matmul, "heap": probe_heap, "bandwidth": probe_bandwidth,
              "padding": probe_padding, "views": probe_views, "srtsample": probe_srtsample, "g1": probe_g1}[name]
        results[name] = fn(ctx)
        for key, value in results[name].items():
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}", flush=True)
    report = {"benchmark": "cpu_probes", "machine": {**machine(), "torch": torch.__version__,
                                                     "threads": torch.get_num_threads()},
              "results": results}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
