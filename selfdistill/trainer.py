"""`SelfDistillTrainer`: on-policy self-distillation as a `transformers.Trainer` subclass.

One optimizer step, as data flows (docs/architecture.md):
  dataset rows -> student rollouts (``generate``) -> rewards (optional) -> privileged source (teacher views)
  -> teacher sequences (context ids ++ the exact completion ids) -> teacher pass (no grad, teacher weights)
  -> student pass -> loss (divergence x support x clip x ratio, / global token count) -> backward
  -> optimizer -> teacher update (ema / sync) -> metrics, checkpoint (teacher and source state included).

The trainer wires these parts and holds no method-specific logic: a method is a `PrivilegedSource`.
Rollouts are generated once per ``steps_per_generation`` micro-batches (TRL's GRPO layout), so the number of
completion tokens of each optimizer step is known before its first backward and the loss is normalised by it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, selective_log_softmax

from selfdistill.checkpoints import CheckpointMixin
from selfdistill.checks import check_trainer_inputs
from selfdistill.config import SelfDistillConfig
from selfdistill.distributed import (
    feedback_everywhere,
    observe_everywhere,
    release_zero3,
    zero_stage,
)
from selfdistill.fused import fused_token_losses, output_head
from selfdistill.grpo import policy_gradient_losses, rollout_advantages
from selfdistill.heatmap import HeatmapCallback
from selfdistill.losses import summarize
from selfdistill.modeling import ensure_pad_token, load_model, load_tokenizer
from selfdistill.rollout import (
    NON_FINITE_FIX,
    EpochRepeatSampler,
    Generated,
    NonFiniteLogits,
    eos_ids,
    sample_completions,
    verify_completions,
)
from selfdistill.sequences import completion_logits, render_context, score_completions, splice, teacher_contexts
from selfdistill.sources.base import PrivilegedSource, Rollout
from selfdistill.teacher import TeacherWeights
from selfdistill.tracking import MetricsRecorder, show_samples


def _collate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows


class _TeacherUpdate(TrainerCallback):
    def __init__(self, trainer: SelfDistillTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if self.trainer.teacher.update(model, state.global_step):
            self.trainer._record("train", "teacher/updates", 1.0, 1.0, reduce="sum")


class SelfDistillTrainer(CheckpointMixin, Trainer):
    """Trains a model to match itself conditioned on privileged information, on its own rollouts.

    Args:
        model: a model name or path (``"smollm2-135m-instruct"`` is the embedded default), a ``PreTrainedModel`` or
            a ``PeftModel``.
        args: a :class:`SelfDistillConfig`.
        train_dataset: a ``datasets.Dataset`` with a ``prompt`` column (chat messages or a string) and the columns
            the privileged source reads.
        eval_dataset: optional, same format; evaluation reports the distillation loss on fresh rollouts.
        processing_class: the tokenizer (loaded from the model when omitted).
        privileged: the privileged-information source, e.g. ``ReferenceSolution(column="solution")``.
        reward_funcs: callables in TRL's convention ``f(prompts, completions, completion_ids, **columns)``; their
            weighted sum is logged and handed to the source (a reviser needs it).
        reward_weights: one weight per reward function (default 1.0 each).
        callbacks, optimizers: as in ``transformers.Trainer``.
        peft_config: a ``peft`` config; the model is wrapped with ``get_peft_model``.
        environment_factory: builds one :class:`selfdistill.envs.Environment` per rollout; rollouts are then
            multi-turn episodes (``selfdistill.agent``), each row's fields go to ``env.reset``, the episode's reward is
            ``env.get_reward()`` (plus any reward_funcs) and the loss covers the model's tokens only.
    """

    _tag_names = ["selfdistill", "self-distillation"]
    # compute_loss already divides by the global token count of the whole optimizer step.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: str | PreTrainedModel | torch.nn.Module,
        args: SelfDistillConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        privileged: PrivilegedSource | None = None,
        reward_funcs: Callable | Sequence[Callable] | None = None,
        reward_weights: Sequence[float] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
        environment_factory: Callable[[], Any] | None = None,
    ):
        if args is None:
            args = SelfDistillConfig(output_dir="selfdistill-output")
        # Everything that needs no model is checked first, so bad input is named before any weights load.
        self.reward_funcs, self.reward_weights = check_trainer_inputs(
            args, privileged, reward_funcs, reward_weights, train_dataset, eval_dataset, environment_factory
        )
        if isinstance(model, str):
            name = model
            model = load_model(name, args.model_init_kwargs)
            if processing_class is None:
                processing_class = load_tokenizer(name)
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path)
        ensure_pad_token(processing_class)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.environment_factory = environment_factory
        self.privileged = privileged
        # A source that learns from feedback (Skill-SD's credits) gets every rank's, so all ranks call it in step.
        self._gathers_feedback = type(privileged).feedback is not PrivilegedSource.feedback
        super().__init__(
            model=model,
            args=args,
            data_collator=_collate_rows,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.loss_spec = args.loss_spec()
        self.pad_id = processing_class.pad_token_id
        self.eos = eos_ids(self.model, processing_class)
        self.max_teacher_length = args.max_teacher_length or getattr(
            self.model.config, "max_position_embeddings", None
        ) or 2048
        zero3 = zero_stage(self.accelerator) == 3
        if zero3 and args.fused_loss:
            raise ValueError(
                "fused_loss=True reads the output head's weight outside its forward, which DeepSpeed ZeRO-3 keeps "
                "partitioned; set fused_loss=False or use ZeRO-2"
            )
        self.teacher = TeacherWeights(
            self.accelerator.unwrap_model(self.model),
            policy=args.teacher_policy,
            ema_rate=args.teacher_ema_rate,
            update_every=args.teacher_update_every,
            defer=zero3,  # the copy is taken from the partitions deepspeed.initialize makes, never a full copy
        )
        self._zero3 = zero3
        # Two forwards (shared prefix, then the rows) before one backward: only for a bare module.
        self._share_student = args.share_prompt_prefix and not (
            args.gradient_checkpointing or self.is_deepspeed_enabled or self.is_fsdp_enabled
            or self.accelerator.num_processes > 1
        )
        if self.is_fsdp_enabled and self.teacher.keeps_copy:
            # FSDP gathers from its own flat shard storage, so a swapped-in copy would silently not be used.
            raise ValueError(
                f"teacher_policy={args.teacher_policy!r} keeps a copy of the trainable weights, which cannot be "
                "swapped into FSDP's sharded storage; use DeepSpeed ZeRO-3 (recipes/accelerate/deepspeed_zero3.yaml), "
                "or teacher_policy='live', or LoRA with teacher_policy='initial' (the adapter disabled)"
            )
        self.vllm = None
        if args.use_vllm:
            from selfdistill.vllm_rollouts import VLLMRollouts

            self.vllm = VLLMRollouts(self.model, self.accelerator, processing_class, args)
        self.add_callback(_TeacherUpdate(self))
        self.heatmaps = HeatmapCallback(self)  # per-token divergence heatmaps every heatmap_steps (selfdistill.heatmap)
        self.add_callback(self.heatmaps)
        self._step: int | None = None  # micro-steps trained (set at the first one, so a resumed run counts on)
        self._buffered: list[dict[str, Any]] | None = None
        self.recorder = MetricsRecorder()  # what the step's passes measure, reduced over ranks at log time
        self._samples: list[dict[str, Any]] = []
        self._clock = 0.0
        self.rollouts_generated = 0  # training rollouts sampled on this rank
        self.tokens_generated = 0  # their completion tokens (the model's own, under an environment)
        self.turn_template = None
        if environment_factory is not None:
            from selfdistill.agent import TurnTemplate

            self.turn_template = TurnTemplate(processing_class)
        if privileged.needs_generation:
            privileged.attach(self.generate_text)

    # ----------------------------------------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def _rollout_batch_size(self) -> int:
        return self._train_batch_size * self.args.steps_per_generation

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("SelfDistillTrainer needs a train_dataset to train")
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._rollout_batch_size(),
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        # Each prompt appears G times in a row; one block of prompts is served num_iterations x
        # steps_per_generation times, which the buffer in _prepare_inputs turns into micro-batches.
        dataset = dataset if dataset is not None else self.train_dataset
        global_rollouts = self._rollout_batch_size() * self.accelerator.num_processes
        return EpochRepeatSampler(
            data_source=dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=global_rollouts // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=True,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(
            data_source=eval_dataset,
            mini_repeat_count=self.args.num_generations,
            seed=self.args.seed,
            shuffle=False,
        )

    # ------------------------------------------------------------------------------------------- rollouts
    def _prepare_inputs(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        if self.model.training:
            every = self.args.steps_per_generation * self.args.num_iterations
            if self._step is None:  # first step of this process: count from where a resumed run stands
                self._step = self.state.global_step * self.args.gradient_accumulation_steps
            if self._buffered is None or self._step % every == 0:
                self._buffered = self._make_rollouts(batch, "train", self.args.steps_per_generation)
            return self._buffered[self._step % self.args.steps_per_generation]
        return self._make_rollouts(batch, "eval", 1)[0]

    def _make_rollouts(self, rows: list[dict[str, Any]], mode: str, n_micro: int) -> list[dict[str, Any]]:
        """Sample, score and build teacher contexts for a generation batch; split it into micro-batches."""
        tokenizer = self.processing_class
        prompts = [row["prompt"] for row in rows]
        prompt_ids = [render_context(tokenizer, p) for p in prompts]
        limit = self.args.max_prompt_length
        for row, ids in zip(rows, prompt_ids):
            if limit is not None and len(ids) > limit:
                raise ValueError(
                    f"a prompt has {len(ids)} tokens > max_prompt_length={limit}: {str(row['prompt'])[:120]!r}...; "
                    "raise max_prompt_length or filter long prompts from the dataset"
                )

        start = time.perf_counter()
        sampler_logps = None  # vLLM's log-probs of the sampled tokens (pi_old of the importance ratio)
        episodes = None  # multi-turn rollouts, when an environment is given
        if self.environment_factory is not None:
            episodes, generated = self._play_episodes(rows)
            prompts = [e.prompt for e in episodes]
            prompt_ids = [e.prompt_ids for e in episodes]
        elif self.vllm is not None:
            generated, sampler_logps = self.vllm.sample(prompt_ids, self.eos, self.state.global_step)
        else:
            # Under DDP: generate on the unwrapped model; under ZeRO-3 the parameters are gathered for the call.
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
                generated = sample_completions(
                    unwrapped,
                    prompt_ids,
                    pad_id=self.pad_id,
                    eos=self.eos,
                    max_new_tokens=self.args.max_completion_length,
                    temperature=self.args.temperature,
                    top_p=self.args.top_p,
                    top_k=self.args.top_k,
                    share_prefix=self.args.share_prompt_prefix,
                    skinny=self.args.skinny_decode,
                )
        elapsed = time.perf_counter() - start
        self._clock += elapsed
        self._record(mode, "time/generation", elapsed, reduce="sum")

        verified = verify_completions(tokenizer, self.reward_funcs, self.reward_weights, prompts,
                                      generated.completion_ids, rows, timeout=self.args.reward_timeout)
        texts, rewards = verified.texts, verified.rewards
        if episodes is not None:  # the environment's score plus any reward functions'
            texts = [e.transcript() for e in episodes]
            rewards = [e.reward + (r or 0.0) for e, r in zip(episodes, rewards)]
            self._record_episodes(mode, episodes)
        if self.reward_funcs:
            for name, values in verified.per_func.items():
                finite = [v for v in values if not math.isnan(v)]
                if finite:
                    self._record(mode, f"rewards/{name}/mean", sum(finite) / len(finite), len(finite))
            finite = [r for r in rewards if r is not None]
            if finite:
                self._record(mode, "reward", sum(finite) / len(finite), len(finite))
            self._record(mode, "reward_failures", verified.failures, 1.0, reduce="sum")

        g = self.args.num_generations
        rollouts = [
            Rollout(row=row, prompt=prompt, completion=text, completion_ids=ids, reward=reward, group=i // g,
                    finished=not cut, extras={} if episodes is None else {"env_mask": episodes[i].env_mask,
                                                                          "success": episodes[i].success})
            for i, (row, prompt, text, ids, reward, cut) in enumerate(
                zip(rows, prompts, texts, generated.completion_ids, rewards, generated.truncated)
            )
        ]
        views = self.privileged.views(rollouts)
        if mode == "train":
            observe_everywhere(self.privileged, rollouts, self.accelerator)  # every rank's rollouts, one state
        teacher = teacher_contexts(tokenizer, self.privileged, rollouts, views, self.max_teacher_length,
                                   self.args.pi_overflow)
        teacher_ids, teacher_completions = teacher.ids, teacher.scored
        view_names, view_tags, truncated_pi = teacher.names, teacher.tags, teacher.truncated_pi
        if mode == "train":
            for key, value in self.privileged.metrics().items():
                self._record(mode, key, value)

        # The loss covers the model's own tokens: all of a single-turn completion, the replies of an episode.
        loss_masks = [e.env_mask for e in episodes] if episodes is not None else None
        lengths = [sum(m) for m in loss_masks] if loss_masks else [len(c) for c in generated.completion_ids]
        n = len(rows)
        if mode == "train":
            self.rollouts_generated += n
            self.tokens_generated += sum(lengths)
        self._record(mode, "completions/mean_length", sum(lengths) / n, n)
        self._record(mode, "completions/clipped_ratio", sum(generated.truncated) / n, n)
        self._record(mode, "completions/empty", sum(1 for x in lengths if x == 0), 1.0, reduce="sum")
        self._record(mode, "pi_truncated", truncated_pi, 1.0, reduce="sum")
        self._samples = [
            {"prompt": p, "completion": t, "reward": r} for p, t, r in zip(prompts, texts, rewards)
        ][: (self.args.num_completions_to_print or 4) if self.args.log_completions else 0]

        old_logps = None
        if mode == "train" and sampler_logps is not None and self.args.vllm_importance_sampling:
            old_logps = sampler_logps  # the sampler is another engine: correct for its mismatch (and staleness)
        elif mode == "train" and self.args.reuses_rollouts:
            old_logps = self._sampling_logps(prompt_ids, generated.completion_ids)

        # For the GRPO term and the sources' feedback (feedback runs in training only).
        advantages = None
        if mode == "train" or self.args.grpo_weight > 0:
            advantages = rollout_advantages(rewards, self.args.num_generations, self.args.scale_rewards)

        micro = []
        size = math.ceil(n / n_micro)
        for k in range(n_micro):
            sl = slice(k * size, (k + 1) * size)
            micro.append({
                "prompt_ids": prompt_ids[sl],
                "completion_ids": generated.completion_ids[sl],
                "teacher_ids": teacher_ids[sl],
                "teacher_completion_ids": teacher_completions[sl],
                "old_logps": None if old_logps is None else old_logps[sl],
                "rewards": rewards[sl],
                "view_names": view_names[sl],
                "view_tags": view_tags[sl],
                "loss_masks": None if loss_masks is None else loss_masks[sl],
                "advantages": None if advantages is None else advantages[sl],
                "tokens": sum(lengths[sl]),
            })
        self._set_normalizers(micro, mode)
        return micro

    def _play_episodes(self, rows: list[dict[str, Any]]) -> tuple[list[Any], Generated]:
        """Multi-turn rollouts: one episode per row against a fresh environment."""
        from selfdistill.agent import run_episodes

        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
            episodes = run_episodes(
                unwrapped, self.processing_class, rows, self.environment_factory, pad_id=self.pad_id, eos=self.eos,
                max_new_tokens=self.args.max_completion_length, max_turns=self.args.max_turns,
                max_episode_length=self.args.max_episode_length or self.max_teacher_length // 2,
                temperature=self.args.temperature,
                top_p=self.args.top_p, top_k=self.args.top_k, template=self.turn_template,
                env_timeout=self.args.env_timeout,
            )
        return episodes, Generated([e.completion_ids for e in episodes], [not e.done for e in episodes])

    def _record_episodes(self, mode: str, episodes: list[Any]) -> None:
        from selfdistill.agent import episode_stats

        stats, n = episode_stats(episodes), len(episodes)
        self._record(mode, "env/success", stats["success"], n)
        self._record(mode, "env/turns", stats["mean_turns"], n)
        self._record(mode, "env/invalid_actions", stats["invalid_action_rate"], stats["turns"])
        self._record(mode, "env/unfinished", stats["unfinished"], 1.0, reduce="sum")

    @torch.no_grad()
    def generate_text(self, prompts: list[Any], max_new_tokens: int) -> list[str]:
        """Greedy replies of the current weights to chat prompts (a source writing skills uses this)."""
        start = time.perf_counter()
        ids = [render_context(self.processing_class, p) for p in prompts]
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
            out = sample_completions(unwrapped, ids, pad_id=self.pad_id, eos=self.eos, max_new_tokens=max_new_tokens,
                                     do_sample=False)
        elapsed = time.perf_counter() - start
        self._clock += elapsed
        self._record("train", "time/source_generation", elapsed, reduce="sum")
        return self.processing_class.batch_decode(out.completion_ids, skip_special_tokens=True)

    def _set_normalizers(self, micro: list[dict[str, Any]], mode: str) -> None:
        """Each micro-batch's loss is divided by the completion-token count of its whole optimizer step."""
        window = self.args.gradient_accumulation_steps if mode == "train" else 1
        counts = []
        for start in range(0, len(micro), window):
            counts.append(sum(m["tokens"] for m in micro[start : start + window]))
        counts_t = torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)
        global_counts = counts_t
        if self.accelerator.num_processes > 1:
            global_counts = self.accelerator.gather(counts_t[None]).sum(0)
        for i, m in enumerate(micro):
            total = float(global_counts[i // window])
            if total == 0:
                raise ValueError(
                    "every rollout of this optimizer step has zero completion tokens; check max_completion_length "
                    "and that the EOS token is not forced at the first position"
                )
            # DDP averages gradients over ranks, so each rank divides by its share of the global count.
            m["normalizer"] = total / self.accelerator.num_processes

    @torch.no_grad()
    def _sampling_logps(self, prompt_ids: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
        """log pi_old(y_t) of each rollout under the weights that sampled it (for the importance ratio)."""
        model = self.accelerator.unwrap_model(self.model)
        out = []
        step = max(self.args.per_device_train_batch_size, 1)
        for i in range(0, len(prompt_ids), step):
            batch = splice(prompt_ids[i : i + step], completions[i : i + step], self.pad_id).to(self.accelerator.device)
            logits = completion_logits(model, batch).float()
            logps = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None])[..., 0]
            for row, comp in zip(logps, completions[i : i + step]):
                out.append(row[: len(comp)].cpu())
        return out

    # ---------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("SelfDistillTrainer.compute_loss does not return model outputs")
        mode = "train" if model.training else "eval"
        device = self.accelerator.device
        # The fused loss takes hidden states and applies the head itself, chunk by chunk: no [N, V] logits.
        head = output_head(self.accelerator.unwrap_model(model)) if self.args.fused_loss else None

        # Under an environment only the model's own tokens are trained; `keep` selects them among the completions'.
        keep = None
        if inputs.get("loss_masks") is not None:
            keep = torch.tensor([m for row in inputs["loss_masks"] for m in row], dtype=torch.bool, device=device)
        distill = self.args.distill_weight > 0
        teacher_out = teacher_head = None
        if distill:
            start = time.perf_counter()
            teacher_out, teacher_head = self._teacher_pass(model, inputs, head)
            elapsed = time.perf_counter() - start
            self._clock += elapsed
            self._record(mode, "time/teacher", elapsed, reduce="sum")
            if keep is not None:
                teacher_out = teacher_out[:, keep]

        student_batch = splice(inputs["prompt_ids"], inputs["completion_ids"], self.pad_id).to(device)
        mask = student_batch.completion_mask.bool()
        student_out = score_completions(model, student_batch, inputs["prompt_ids"], self._share_student, head)[mask]
        _check_finite(student_out, "student")
        tokens = student_batch.completion_ids[mask]
        old = None
        if inputs.get("old_logps") is not None and mode == "train":
            old = torch.cat(inputs["old_logps"]).to(device)
        if keep is not None:
            student_out, tokens = student_out[keep], tokens[keep]
            old = None if old is None else old[keep]

        per_token, metrics = None, {}
        total = torch.zeros((), device=device)
        if distill:
            if head is not None:
                per_token = fused_token_losses(student_out, head.weight, teacher_out[0], teacher_head, tokens,
                                               self.loss_spec, old_logps=old, chunk_size=self.args.loss_chunk_size)
                metrics = summarize(per_token)
            else:  # one view, or the source's combination of several (AVSD)
                per_token, metrics = self.privileged.token_losses(student_out, teacher_out, tokens, self.loss_spec,
                                                                  inputs["view_names"][0], old_logps=old)
            total = self.args.distill_weight * per_token.loss
        counts = self._scored_counts(inputs)
        if self.args.grpo_weight > 0:
            logp = selective_log_softmax(student_out.float(), tokens)
            # No rollout of the batch was scored (every verifier failed): no policy-gradient signal.
            advantages = torch.tensor(inputs["advantages"] or [0.0] * len(counts), dtype=logp.dtype, device=device)
            advantages = advantages.repeat_interleave(torch.tensor(counts, device=device))
            pg, pg_clipped = policy_gradient_losses(logp, advantages, old, self.args.epsilon,
                                                    self.args.epsilon_high)
            total = total + self.args.grpo_weight * pg
            if pg.numel():
                metrics.update({"grpo/loss": pg.detach().mean().item(), "grpo/clip_fraction": pg_clipped.mean().item(),
                                "grpo/advantage_abs": advantages.abs().mean().item()})
        # Normalised by the completion-token count of the whole optimizer step (see _set_normalizers).
        loss = total.sum() / inputs["normalizer"]
        if not torch.isfinite(loss):  # finite logits can still give one (e.g. NaN old log-probs, an inf advantage)
            raise NonFiniteLogits(
                f"the loss of step {self.state.global_step + 1} is {loss.item()} although the logits were finite: a "
                f"NaN or inf entered through the sampling log-probs, the rewards or the advantages; {NON_FINITE_FIX}"
            )
        n = float(tokens.numel())
        for key, value in metrics.items():
            self._record(mode, key, value, n)
        if per_token is not None and mode == "train":
            self._source_feedback(inputs, per_token.logp_gap, counts)
            if self.heatmaps.due(self.state.global_step + 1):
                divergence = per_token.divergence
                if keep is not None:  # environment tokens show as 0
                    divergence = torch.zeros(keep.shape, dtype=divergence.dtype, device=device).masked_scatter(
                        keep, divergence)
                self.heatmaps.capture(inputs, divergence)
        return loss

    @staticmethod
    def _scored_counts(inputs: dict[str, Any]) -> list[int]:
        """Tokens the loss covers in each rollout of the micro-batch."""
        if inputs.get("loss_masks") is not None:
            return [sum(m) for m in inputs["loss_masks"]]
        return [len(c) for c in inputs["completion_ids"]]

    def _source_feedback(self, inputs: dict[str, Any], logp_gap: torch.Tensor, counts: list[int]) -> None:
        """Hand each view's tag back to the source with its rollout's outcome (e.g. to credit skills)."""
        tags = inputs.get("view_tags") or []
        if not self._gathers_feedback or (self.accelerator.num_processes == 1 and not any(tags)):
            return
        advantages = inputs.get("advantages") or [None] * len(counts)
        signals = []
        for gap, reward, advantage in zip(torch.split(logp_gap.detach().float(), counts), inputs["rewards"],
                                          advantages):
            signals.append({"reward": reward, "advantage": advantage,
                            "logp_gap": gap.mean().item() if gap.numel() else 0.0})
        feedback_everywhere(self.privileged, tags, signals, self.accelerator)

    def _teacher_pass(
        self, model: torch.nn.Module, inputs: dict[str, Any], head: torch.nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher outputs at the valid completion positions: ``[M, N, V]`` logits (``[M, N, H]`` hidden states and
        the teacher's head weight under the fused loss), for the M views of every rollout of the micro-batch."""
        device = self.accelerator.device
        unwrapped = self.accelerator.unwrap_model(model)
        # Rollout r's view v is sequence v * B + r: all views of a micro-batch go through the teacher together
        # (one forward over M x B sequences) unless teacher_batch_views is off.
        n_views = len(inputs["teacher_ids"][0])
        contexts = [ids[v] for v in range(n_views) for ids in inputs["teacher_ids"]]
        scored = [comp[v] for v in range(n_views) for comp in inputs["teacher_completion_ids"]]
        group = len(contexts) if self.args.teacher_batch_views else len(inputs["teacher_ids"])
        pieces = []
        # model_wrapped: the DeepSpeed engine in training and evaluation alike (model may be the bare module).
        with self.teacher.scoring(unwrapped, release=release_zero3(self.model_wrapped)) as teacher_model:
            for i in range(0, len(contexts), group):
                batch = splice(contexts[i : i + group], scored[i : i + group], self.pad_id).to(device)
                out = score_completions(teacher_model, batch, contexts[i : i + group], self.args.share_teacher_prefix,
                                        head)
                pieces.append(out[batch.completion_mask.bool()])
            # Inside the context the head holds the teacher's weights; detach() keeps that storage, no copy.
            teacher_head = None if head is None else head.weight.detach()
        teacher_out = torch.cat(pieces).view(n_views, -1, pieces[0].shape[-1])
        _check_finite(teacher_out, "teacher")
        return teacher_out, teacher_head

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        self._clock = 0.0  # generation and teacher seconds spent inside this call
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        # What is left of the call's wall time is the student's forward and backward (and the optimizer).
        self._record("train", "time/student", max(time.perf_counter() - start - self._clock, 0.0), reduce="sum")
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------- metrics
    def _record(self, mode: str, key: str, value: float, weight: float = 1.0, reduce: str = "mean") -> None:
        self.recorder.record(mode, key, value, weight, reduce)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        logs = {**logs, **self.recorder.flush(mode, self.state.global_step, self.accelerator)}
        super().log(logs, start_time)
        if mode == "train" and self.is_world_process_zero():
            show_samples(self._samples, self.args.report_to, self.state.global_step, table="loss" in logs)


def _check_finite(logits: torch.Tensor, side: str) -> None:
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(-1).sum().item()
        raise NonFiniteLogits(
            f"the {side} pass produced NaN/inf logits at {bad} completion tokens; {NON_FINITE_FIX}"
        )
