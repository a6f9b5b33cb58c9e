"""Student rollouts with transformers ``generate`` and reward scoring in TRL's reward-function convention."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import RepeatSampler

from selfdistill.sequences import CACHE_KEY, MIN_SHARED_PREFIX, left_pad, run_shared_prefixes, splice

logger = logging.getLogger(__name__)


class NonFiniteLogits(FloatingPointError):
    """NaN or inf logits in the student or teacher pass."""


NON_FINITE_FIX = (
    "the weights have diverged or overflowed. Lower the learning rate, enable max_grad_norm, or train in "
    "float32/bfloat16 instead of float16"
)


@dataclass
class Generated:
    completion_ids: list[list[int]]  # exact sampled ids, cut after the first EOS (EOS kept)
    truncated: list[bool]  # True where max_completion_length was hit before EOS


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a rollout: the generation config's EOS ids plus the tokenizer's."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token; set one")
    return sorted(ids)


def sampling_precision(model: Any, args: Any) -> contextlib.AbstractContextManager:
    """The autocast region training samples in, for code that samples outside the trainer (SD-Zero's self-revision
    stage, diagnose): accelerate's ``bf16``/``fp16`` autocast on the model's device, or none. One region around a
    whole sampling loop also keeps autocast's weight casts for all of it."""
    device = next(model.parameters()).device.type
    if getattr(args, "bf16", False):
        return torch.autocast(device, dtype=torch.bfloat16)
    if getattr(args, "fp16", False):
        return torch.autocast(device, dtype=torch.float16)
    return contextlib.nullcontext()


def sample_completions(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos: Sequence[int],
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    share_prefix: bool = True,
) -> Generated:
    """Sample one completion per prompt (prompts repeated G times upstream) with left padding.

    ``share_prefix``: prompts that share a beginning (the G copies of one prompt; the chat template's system
    prompt) prefill it once (:func:`selfdistill.sequences.run_shared_prefixes`) and ``generate`` decodes from its
    cache rows: float rounding only (~1e-5 in the logits), the same draws.
    """
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k else 0)
    shared = None
    if share_prefix:
        shared = run_shared_prefixes(model, prompt_ids, MIN_SHARED_PREFIX, device, keep_last=True, pad_id=pad_id)
    if shared is None:
        batch = splice(prompt_ids, [[] for _ in prompt_ids], pad_id)
        width = batch.context_width
        inputs = {"input_ids": batch.input_ids[:, :width].to(device),
                  "attention_mask": batch.attention_mask[:, :width].to(device)}
    else:  # the cache holds each row's prefix; generate runs the rows' suffixes (>= 1 token each) on top
        suffix_ids, suffix_mask = left_pad(shared.suffixes, max(len(x) for x in shared.suffixes), pad_id)
        ids = torch.cat([shared.ids, suffix_ids.to(device)], dim=1)
        inputs = {"input_ids": ids, "attention_mask": torch.cat([shared.mask, suffix_mask.to(device)], dim=1),
                  CACHE_KEY: shared.cache}
        width = ids.shape[1]
    try:
        out = model.generate(**inputs, pad_token_id=pad_id, eos_token_id=list(eos), **kwargs)
        new = out[:, width:].tolist()
    except RuntimeError as err:
        if "probability tensor contains" in str(err):
            message = f"the student produced NaN/inf logits while sampling rollouts; {NON_FINITE_FIX}"
            raise NonFiniteLogits(message) from err
        raise
    eos_set = set(eos)
    completions, truncated = [], []
    for row in new:
        cut = next((i for i, tok in enumerate(row) if tok in eos_set), None)
        if cut is None:
            completions.append(row[:max_new_tokens])
            truncated.append(True)
        else:
            completions.append(row[: cut + 1])
            truncated.append(False)
    return Generated(completions, truncated)


def take_rows(dataset: Any, n: int | None) -> list[dict[str, Any]]:
    """The first ``n`` rows of a dataset (all when ``n`` is None) as dicts."""
    return dataset.to_list() if n is None else dataset.select(range(min(n, len(dataset)))).to_list()


def reward_name(func: Callable) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


class VerifierTimeout(TimeoutError):
    """A reward function did not return within the configured time."""


def _call(func: Callable, timeout: float | None, kwargs: dict[str, Any], setting: str = "reward_timeout",
          error: type[TimeoutError] = VerifierTimeout) -> Any:
    """``func(**kwargs)``, abandoned after ``timeout`` seconds with ``error`` naming the ``setting`` that sets the
    limit (a Python thread cannot be killed: a hung call keeps its thread, but the caller goes on)."""
    if not timeout:
        return func(**kwargs)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = func(**kwargs)
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name=f"timed-{reward_name(func)}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise error(f"did not return within {timeout:g} s ({setting})")
    if "error" in box:
        raise box["error"]
    return box["value"]


class RewardFunctionError(RuntimeError):
    """A reward function failed on every rollout of a batch: a broken verifier, not a malformed completion."""


class _BadShape(Exception):
    """A reward function's return that no retry can fix: not a list, or a list of the wrong length."""


def _values(func: Callable, timeout: float | None, kwargs: dict[str, Any], n: int) -> tuple[list[float], int]:
    """The function's rewards (None, TRL's "no reward for this one", and returned NaN/inf as NaN) and how many it
    returned non-finite; a bad shape raises :class:`_BadShape`."""
    values = _call(func, timeout, kwargs)
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        shown = "None" if values is None else f"{type(values).__name__} {str(values)[:80]!r}"
        raise _BadShape(f"returned {shown} instead of a list with one float (or None) per completion")
    values = list(values)
    if len(values) != n:
        raise _BadShape(f"returned {len(values)} rewards for {n} completions")
    try:
        floats = [None if v is None else float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise _BadShape(f"returned a value that is not a number ({err})") from err
    nonfinite = sum(v is not None and not math.isfinite(v) for v in floats)
    return [v if v is not None and math.isfinite(v) else math.nan for v in floats], nonfinite


def score_rollouts(
    reward_funcs: Sequence[Callable],
    weights: Sequence[float],
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    rows: list[dict[str, Any]],
    timeout: float | None = None,
) -> tuple[list[float], dict[str, list[float]], int]:
    """Weighted sum of the reward functions per rollout, the per-function values and the count of failures.

    Functions follow TRL's convention ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``.
    A verifier must never kill a long run: when a batch call raises, each rollout is retried alone, so one
    malformed completion costs only its own reward; a call that raises or exceeds ``timeout`` seconds gives NaN
    for the rollouts it covered and each of them is counted as a failure, as is a NaN or inf it returns (with a
    warning). A function that fails on *every* rollout of the batch (raises, hangs, returns NaN) is broken, and so is
    one whose return has the wrong shape (not a list, the wrong length): :class:`RewardFunctionError` names it and the
    fix. None (TRL: no reward from this function for this rollout) and failed values are left out of the weighted sum
    (a rollout with no finite reward gets NaN).
    """
    columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    columns.pop("prompt", None)
    per_func: dict[str, list[float]] = {}
    failures = 0
    n = len(completions)
    for index, func in enumerate(reward_funcs):
        name = reward_name(func)
        if name in per_func:  # two functions with one name (lambdas, partials) keep separate metrics
            name = f"{name}_{index}"
        kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        failed, first_error, nonfinite = 0, None, 0
        try:
            values, nonfinite = _values(func, timeout, kwargs, n)
        except _BadShape as err:
            # Not a malformed completion but a broken function: retrying rollout by rollout would hide it (a function
            # that always returns one value passes every one-rollout call).
            raise RewardFunctionError(
                f"reward function {name!r} {err}. It is called as f(prompts, completions, completion_ids, "
                "**dataset_columns) and must return a list with one float (or None) per completion."
            ) from err
        except VerifierTimeout as err:
            # Retrying item by item could cost n timeouts; the whole batch is given up instead.
            failed, first_error = n, err
            values = [math.nan] * n
        except Exception as err:
            logger.warning("reward function %s failed on a batch (%s: %s); retrying rollout by rollout", name,
                           type(err).__name__, err)
            values = []
            for i in range(n):
                one = {key: value[i : i + 1] for key, value in kwargs.items()}
                try:
                    one_value, one_nonfinite = _values(func, timeout, one, 1)
                    values.extend(one_value)
                    nonfinite += one_nonfinite
                except Exception as item_err:
                    failed += 1
                    first_error = first_error or item_err
                    logger.warning("reward function %s failed on rollout %d (%s: %s); counted as a failure", name,
                                   i, type(item_err).__name__, item_err)
                    values.append(math.nan)
        if nonfinite:
            failed += nonfinite
            first_error = first_error or FloatingPointError(f"it returned NaN or inf for {nonfinite} of {n}")
            logger.warning("reward function %s returned %d non-finite reward(s) (NaN/inf) in a batch of %d; counted "
                           "as failures and left out of the reward", name, nonfinite, n)
        if n and failed >= n:
            # One malformed completion costs its own reward; a function that fails on all of them is broken, and
            # training on without its rewards would be silent garbage.
            raise RewardFunctionError(
                f"reward function {name!r} failed on all {n} rollouts of a batch ({type(first_error).__name__}: "
                f"{first_error}). Fix it: it is called as f(prompts, completions, completion_ids, **dataset_columns) "
                "and returns a list with one float (or None) per completion. If it is only slow, raise "
                "reward_timeout; or leave it out of reward_funcs (recipe: rewards)."
            ) from first_error
        failures += failed
        per_func[name] = values
    columns_by_func = list(per_func.values())
    totals = []
    for i in range(n):
        parts = [w * values[i] for values, w in zip(columns_by_func, weights)]
        finite = [p for p in parts if not math.isnan(p)]
        totals.append(sum(finite) if finite else math.nan)
    return totals, per_func, failures


@dataclass
class Verified:
    """Decoded completions and their verdicts: ``rewards`` holds None where no verifier gave a finite value."""

    texts: list[str]
    rewards: list[float | None]
    per_func: dict[str, list[float]]
    failures: int


def verify_completions(
    tokenizer: Any,
    reward_funcs: Sequence[Callable],
    weights: Sequence[float],
    prompts: list[Any],
    completion_ids: list[list[int]],
    rows: list[dict[str, Any]],
    timeout: float | None = None,
) -> Verified:
    """Decode sampled ids and score them with :func:`score_rollouts` (no reward functions: every reward None)."""
    from selfdistill.rewards import as_completions

    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    if not reward_funcs:
        return Verified(texts, [None] * len(texts), {}, 0)
    totals, per_func, failures = score_rollouts(reward_funcs, weights, prompts, as_completions(prompts, texts),
                                                completion_ids, list(rows), timeout=timeout)
    return Verified(texts, [None if math.isnan(r) else r for r in totals], per_func, failures)


class EpochRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler, with each epoch's shuffle drawn from (seed, epoch) instead of from one generator that
    advances epoch by epoch: a run resumed in epoch e then draws epoch e's order, as the uninterrupted run did (a
    fresh generator would replay epoch 0's). The first epoch's order is RepeatSampler's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by transformers/accelerate at the start of every epoch
        self.epoch = int(epoch)

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + 1_000_003 * self.epoch)
        return super().__iter__()
