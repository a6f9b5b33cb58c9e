"""How `SelfDistillTrainer` samples: transformers ``generate``, a vLLM engine, or multi-turn episodes.

A mixin of the trainer (like :class:`selfdistill.checkpoints.CheckpointMixin`): it reads the trainer's config,
model, accelerator and recorder. Generation seconds are taken off the student's clock (``time/generation``).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from trl.models.utils import unwrap_model_for_generation

from selfdistill.rollout import Generated, sample_completions
from selfdistill.sequences import render_context


@contextmanager
def without_embedding_noise(model: Any) -> Iterator[None]:
    """NEFTune (``neftune_noise_alpha``) adds noise to the input embeddings while they are in training mode. Only the
    student pass should see it: while active, the sampler and the teacher read clean embeddings (a noisy teacher would
    be a noisy target). Does nothing without NEFTune."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    noisy = getattr(embeddings, "neftune_noise_alpha", None) is not None and embeddings.training
    if noisy:
        embeddings.training = False
    try:
        yield
    finally:
        if noisy:
            embeddings.training = True


@contextmanager
def _quiet_deprecated_checkpointing_flag() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


@contextmanager
def unwrapped_for_generation(model_wrapped: Any, accelerator: Any) -> Iterator[Any]:
    """TRL's ``unwrap_model_for_generation``, quiet: TRL reads transformers' deprecated ``is_gradient_checkpointing``
    (a ``FutureWarning`` on every run, from TRL's call, not the user's). Only that warning, and only while TRL's
    context enters and exits, is silenced; the body (the user's generation) warns as usual."""
    context = unwrap_model_for_generation(model_wrapped, accelerator)
    with _quiet_deprecated_checkpointing_flag():
        unwrapped = context.__enter__()
    try:
        yield unwrapped
    except BaseException:
        with _quiet_deprecated_checkpointing_flag():
            if not context.__exit__(*sys.exc_info()):
                raise
    else:
        with _quiet_deprecated_checkpointing_flag():
            context.__exit__(None, None, None)


@contextmanager
def generation_model(model_wrapped: Any, accelerator: Any) -> Iterator[Any]:
    """The model to sample from (TRL's ``unwrap_model_for_generation``), inside one autocast region for the call.

    Under ``bf16``/``fp16`` accelerate wraps every forward in its own autocast region, and autocast forgets its
    cast weights when the outermost region ends: each decoding step would cast every float32 weight again (on the
    CPU that is more bytes than the low-precision product it feeds). One enclosing region keeps the casts for the
    whole ``generate`` call; they are the same casts, so the tokens are the same. Without mixed precision this is
    ``unwrap_model_for_generation`` alone (and, under NEFTune, clean embeddings: :func:`without_embedding_noise`).
    """
    with unwrapped_for_generation(model_wrapped, accelerator) as unwrapped, accelerator.autocast(), \
            without_embedding_noise(unwrapped):
        yield unwrapped


@dataclass
class Sampled:
    generated: Generated
    episodes: list[Any] | None = None  # multi-turn rollouts, when an environment is given
    sampler_logps: list[torch.Tensor] | None = None  # vLLM's log-probs of the sampled tokens (pi_old)


class SamplingMixin:
    def _sample(self, rows: list[dict[str, Any]], prompt_ids: list[list[int]], mode: str) -> Sampled:
        """One rollout per row (rows arrive repeated G times)."""
        args = self.args
        start = time.perf_counter()
        if self.environment_factory is not None:
            episodes, generated = self._play_episodes(rows)
            sampled = Sampled(generated, episodes=episodes)
        elif self.vllm is not None:
            generated, logps = self.vllm.sample(prompt_ids, self.eos, self.state.global_step)
            sampled = Sampled(generated, sampler_logps=logps)
        else:
            # Under DDP: generate on the unwrapped model; under ZeRO-3 the parameters are gathered for the call.
            with generation_model(self.model_wrapped, self.accelerator) as unwrapped:
                sampled = Sampled(sample_completions(
                    unwrapped, prompt_ids, pad_id=self.pad_id, eos=self.eos, max_new_tokens=args.max_completion_length,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    share_prefix=args.share_prompt_prefix,
                ))
        elapsed = time.perf_counter() - start
        self._clock += elapsed
        self.recorder.record(mode, "time/generation", elapsed, reduce="sum")
        return sampled

    def _play_episodes(self, rows: list[dict[str, Any]]) -> tuple[list[Any], Generated]:
        """Multi-turn rollouts: one episode per row against a fresh environment."""
        from selfdistill.agent import run_episodes

        args = self.args
        with generation_model(self.model_wrapped, self.accelerator) as unwrapped:
            episodes = run_episodes(
                unwrapped, self.processing_class, rows, self.environment_factory, pad_id=self.pad_id, eos=self.eos,
                max_new_tokens=args.max_completion_length, max_turns=args.max_turns,
                max_episode_length=args.max_episode_length or self.max_teacher_length // 2,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, template=self.turn_template,
                env_timeout=args.env_timeout,
            )
        return episodes, Generated([e.completion_ids for e in episodes], [not e.done for e in episodes])

    @torch.no_grad()
    def generate_text(self, prompts: list[Any], max_new_tokens: int) -> list[str]:
        """Greedy replies of the current weights to chat prompts (a source writing skills uses this)."""
        start = time.perf_counter()
        ids = [render_context(self.processing_class, p) for p in prompts]
        with generation_model(self.model_wrapped, self.accelerator) as unwrapped:
            out = sample_completions(unwrapped, ids, pad_id=self.pad_id, eos=self.eos, max_new_tokens=max_new_tokens,
                                     do_sample=False, share_prefix=self.args.share_prompt_prefix)
        elapsed = time.perf_counter() - start
        self._clock += elapsed
        self.recorder.record("train", "time/source_generation", elapsed, reduce="sum")
        return self.processing_class.batch_decode(out.completion_ids, skip_special_tokens=True)
