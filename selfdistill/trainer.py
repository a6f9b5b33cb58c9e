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

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import IterableDataset
from transformers import PreTrainedModel, Trainer, TrainerCallback
from trl.trainer.utils import selective_log_softmax

from selfdistill.checkpoints import CheckpointMixin
from selfdistill.checks import check_dataset_prompt_lengths, check_sharding, check_stream_rows, check_trainer_inputs
from selfdistill.config import SelfDistillConfig
from selfdistill.distributed import (
    observe_everywhere,
    release_zero3,
    zero_stage,
)
from selfdistill.fused import fused_token_losses, output_head
from selfdistill.grpo import rollout_advantages
from selfdistill.heatmap import HeatmapCallback
from selfdistill.loading import DataMixin, prepare_for_streams
from selfdistill.losses import summarize
from selfdistill.modeling import ensure_pad_token, load_model, load_tokenizer
from selfdistill.rollout import (
    NON_FINITE_FIX,
    NonFiniteLogits,
    eos_ids,
    verify_completions,
)
from selfdistill.sampling import SamplingMixin, without_embedding_noise
from selfdistill.sequences import render_context, score_completions, splice, teacher_contexts
from selfdistill.sources.base import PrivilegedSource, Rollout
from selfdistill.step import (
    check_finite,
    digit_share,
    digit_tokens,
    micro_batches,
    policy_gradient_term,
    repeat_per_token,
    sampling_logps,
    scored_counts,
    set_normalizers,
    source_feedback,
    teacher_outputs,
)
from selfdistill.teacher import TeacherUpdate, TeacherWeights
from selfdistill.tracking import MetricsRecorder, show_samples


def _collate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows


class SelfDistillTrainer(CheckpointMixin, DataMixin, SamplingMixin, Trainer):
    """Trains a model to match itself conditioned on privileged information, on its own rollouts.

    Args:
        model: a model name or path (``"smollm2-135m-instruct"`` is the embedded default), a ``PreTrainedModel`` or
            a ``PeftModel``.
        args: a :class:`SelfDistillConfig`.
        train_dataset: a ``datasets.Dataset`` (or a streamed ``IterableDataset``, with ``max_steps``) with a
            ``prompt`` column (chat messages or a string) and the columns the privileged source reads.
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
        prepare_for_streams(args, train_dataset, eval_dataset)
        if isinstance(model, str):
            name = model
            model = load_model(name, args.model_init_kwargs)
            if processing_class is None:
                processing_class = load_tokenizer(name)
        if processing_class is None:
            source = getattr(model.config, "_name_or_path", "")
            if not source:
                raise ValueError(
                    "processing_class= is needed: the model was built in code (its config names no folder or hub id "
                    "to load a tokenizer from); pass processing_class=AutoTokenizer.from_pretrained(...)"
                )
            processing_class = load_tokenizer(source)
        ensure_pad_token(processing_class)
        # What needs the model's window and the tokenizer, checked before any step: the configured lengths, and every
        # in-memory row's rendered prompt (streamed rows are checked as they are read, in _make_rollouts).
        args.check_context_window(getattr(model.config, "max_position_embeddings", None))
        evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
        for split, dataset in [("train_dataset", train_dataset), *evals]:
            check_dataset_prompt_lengths(processing_class, dataset, args.max_prompt_length, split)
        self._stream_rows = {"train": 0, "eval": 0}  # rows of a streamed dataset read so far, per mode
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
        self.teacher = TeacherWeights(
            self.accelerator.unwrap_model(self.model),
            policy=args.teacher_policy,
            ema_rate=args.teacher_ema_rate,
            update_every=args.teacher_update_every,
            defer=zero3,  # the copy is taken from the partitions deepspeed.initialize makes, never a full copy
        )
        self._zero3 = zero3
        # The packed student pass is one forward (gradient checkpointing takes it) but applies the head by hand,
        # outside the wrapped forward, which DDP (a parameter marked ready twice), DeepSpeed and FSDP do not allow;
        # the two-pass fallback runs two forwards before one backward, only on a bare module.
        self._pack_student = args.share_prompt_prefix and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled or self.accelerator.num_processes > 1
        )
        self._share_student = args.share_prompt_prefix and not (
            args.gradient_checkpointing or self.is_deepspeed_enabled or self.is_fsdp_enabled
            or self.accelerator.num_processes > 1
        )
        check_sharding(args, zero3, self.is_fsdp_enabled, self.teacher.keeps_copy)
        self.vllm = None
        if args.use_vllm:
            from selfdistill.vllm_rollouts import VLLMRollouts

            self.vllm = VLLMRollouts(self.model, self.accelerator, processing_class, args)
        self.add_callback(TeacherUpdate(self))
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
        dataset = self.train_dataset if mode == "train" else self.eval_dataset
        if isinstance(dataset, (IterableDataset, torch.utils.data.IterableDataset)):
            # a stream's rows are checked as they are first read (each comes num_generations times in a row)
            g = self.args.num_generations
            check_stream_rows(self.privileged, rows[::g], f"{mode}_dataset", self._stream_rows[mode],
                              lambda prompt: render_context(tokenizer, prompt), self.args.max_prompt_length)
            self._stream_rows[mode] += len(rows) // g
        prompt_ids = [render_context(tokenizer, p) for p in prompts]

        sampled = self._sample(rows, prompt_ids, mode)
        generated, episodes, sampler_logps = sampled.generated, sampled.episodes, sampled.sampler_logps
        if episodes is not None:
            prompts, prompt_ids = [e.prompt for e in episodes], [e.prompt_ids for e in episodes]

        verified = verify_completions(tokenizer, self.reward_funcs, self.reward_weights, prompts,
                                      generated.completion_ids, rows, timeout=self.args.reward_timeout)
        texts, rewards = verified.texts, verified.rewards
        if episodes is not None:  # the environment's score plus any reward functions'
            texts = [e.transcript() for e in episodes]
            rewards = [e.reward + (r or 0.0) for e, r in zip(episodes, rewards)]
            from selfdistill.agent import episode_stats

            self.recorder.record_episodes(mode, episode_stats(episodes), len(episodes))
        if self.reward_funcs:
            self.recorder.record_rewards(mode, verified.per_func, rewards, verified.failures)

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
        if mode == "train":
            for key, value in self.privileged.metrics().items():
                self._record(mode, key, value)

        # The loss covers the model's own tokens: all of a single-turn completion, the replies of an episode.
        loss_masks = [e.env_mask for e in episodes] if episodes is not None else None
        lengths = [sum(m) for m in loss_masks] if loss_masks else [len(c) for c in generated.completion_ids]
        view_trains = [[v.trains for v in vs] for vs in views]
        distills = [any(t) for t in view_trains]  # a rollout no view trains leaves the distillation
        n = len(rows)
        if mode == "train":
            self.rollouts_generated += n
            self.tokens_generated += sum(lengths)
            # Prompt and completion tokens of every rank's rollouts, as TRL counts them (logged as num_tokens).
            seen = torch.tensor(sum(map(len, prompt_ids)) + sum(map(len, generated.completion_ids)),
                                device=self.accelerator.device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(seen).sum())
        self.recorder.record_completions(mode, lengths, generated.truncated, teacher.truncated_pi)
        self._samples = [
            {"prompt": p, "completion": t, "reward": r} for p, t, r in zip(prompts, texts, rewards)
        ][: (self.args.num_completions_to_print or 4) if self.args.log_completions else 0]

        old_logps = None
        if mode == "train" and sampler_logps is not None and self.args.vllm_importance_sampling:
            old_logps = sampler_logps  # the sampler is another engine: correct for its mismatch (and staleness)
        elif mode == "train" and self.args.reuses_rollouts:
            with without_embedding_noise(self.model):  # the policy that sampled: clean embeddings under NEFTune
                old_logps = sampling_logps(self.accelerator.unwrap_model(self.model), prompt_ids,
                                           generated.completion_ids, self.pad_id, self.accelerator.device,
                                           self.args.per_device_train_batch_size)

        # For the GRPO term and the sources' feedback (feedback runs in training only).
        advantages = None
        if mode == "train" or self.args.grpo_weight > 0:
            advantages = rollout_advantages(rewards, self.args.num_generations, self.args.scale_rewards)
            if advantages is not None and self.args.mask_truncated_completions:
                advantages = [0.0 if cut else a for a, cut in zip(advantages, generated.truncated)]

        micro = micro_batches({
            "prompt_ids": prompt_ids, "completion_ids": generated.completion_ids, "teacher_ids": teacher.ids,
            "teacher_completion_ids": teacher.scored, "old_logps": old_logps, "rewards": rewards,
            "view_names": teacher.names, "view_tags": teacher.tags, "loss_masks": loss_masks, "advantages": advantages,
            "distills": distills, "view_trains": view_trains,
        }, lengths, n_micro, [n if d else 0 for n, d in zip(lengths, distills)])
        self._set_normalizers(micro, mode)
        return micro

    def _set_normalizers(self, micro: list[dict[str, Any]], mode: str) -> None:
        set_normalizers(micro, self.args.gradient_accumulation_steps if mode == "train" else 1, self.accelerator)

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
        rlsd = self.args.rlsd_lambda > 0  # the GRPO term's advantages weighted by the teacher's view (RLSD)
        shaping = self.privileged.shapes_advantages and self.args.grpo_weight > 0  # ... or by the source's (RLCSD)
        teacher_out = teacher_head = None
        if distill or rlsd or shaping:
            start = time.perf_counter()
            teacher_out, teacher_head = self._teacher_pass(model, inputs, head)
            elapsed = time.perf_counter() - start
            self._clock += elapsed
            self._record(mode, "time/teacher", elapsed, reduce="sum")
            if keep is not None:
                teacher_out = teacher_out[:, keep]

        student_batch = splice(inputs["prompt_ids"], inputs["completion_ids"], self.pad_id).to(device)
        mask = student_batch.completion_mask.bool()
        student_out = score_completions(model, student_batch, inputs["prompt_ids"], self._share_student, head,
                                        pack=self._pack_student, masked=True)
        check_finite(student_out, "student")
        tokens = student_batch.completion_ids[mask]
        old = None
        if inputs.get("old_logps") is not None and mode == "train":
            old = torch.cat(inputs["old_logps"]).to(device)
        if keep is not None:
            student_out, tokens = student_out[keep], tokens[keep]
            old = None if old is None else old[keep]

        per_token, metrics = None, {}
        counts = scored_counts(inputs)
        total = torch.zeros((), device=device)
        if distill:
            if head is not None:
                per_token = fused_token_losses(student_out, head.weight, teacher_out[0], teacher_head, tokens,
                                               self.loss_spec, old_logps=old, chunk_size=self.args.loss_chunk_size)
                metrics = summarize(per_token)
            else:  # one view, or the source's combination of several (AVSD)
                per_token, metrics = self.privileged.token_losses(student_out, teacher_out, tokens, self.loss_spec,
                                                                  inputs["view_names"][0], old_logps=old)
            loss_tokens = per_token.loss
            metrics.update(digit_share(per_token.divergence, tokens, self._digits()))
            distills = inputs.get("distills") or [True] * len(counts)
            if not all(distills):  # rollouts whose views carry nothing leave the distillation term
                loss_tokens = loss_tokens * repeat_per_token(distills, counts, device)
            # its own divisor: the step's tokens of rollouts a view trains (the same count when every view does)
            total = self.args.distill_weight * loss_tokens * (
                inputs["normalizer"] / inputs.get("distill_normalizer", inputs["normalizer"]))
        if self.args.grpo_weight > 0:
            shape = None
            shaped: list[Any] = []  # the source's Contrast (RLCSD), whose scale weights each token's loss
            if rlsd:
                from selfdistill.methods.rlsd import rlsd_advantages, rlsd_lambda_at

                teacher_logp = selective_log_softmax(teacher_out[0].float(), tokens)
                lam = rlsd_lambda_at(self.args.rlsd_lambda, self.state.global_step, self.args.rlsd_decay_steps)
                def shape(adv: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
                    shaped_adv, rlsd_metrics = rlsd_advantages(adv, teacher_logp, logp, lam, self.args.rlsd_epsilon)
                    # RLSD's per-token divergence is its teacher-student log-ratio on the sampled token
                    gap = (teacher_logp - logp.detach()).abs()
                    return shaped_adv, {**rlsd_metrics, **digit_share(gap, tokens, self._digits())}
            elif shaping:  # the source's own rule (RLCSD), with each token's loss weight (its two-path reduction)
                view_logp = torch.stack([selective_log_softmax(v.float(), tokens) for v in teacher_out])
                view_trains = repeat_per_token(inputs["view_trains"], counts, device).T

                def shape(adv: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
                    shaped.append(self.privileged.shape_advantages(adv, view_logp, view_trains))
                    return shaped[0].advantages, shaped[0].metrics

            pg, pg_metrics = policy_gradient_term(student_out, tokens, inputs["advantages"], counts, old,
                                                  self.args.epsilon, self.args.epsilon_high, shape)
            if shaped:
                pg = pg * shaped[0].scale.to(pg.dtype)
            total = total + self.args.grpo_weight * pg
            metrics.update(pg_metrics)
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
            if self._gathers_feedback:
                source_feedback(self.privileged, inputs, per_token.logp_gap, counts, self.accelerator)
            self.heatmaps.maybe_capture(inputs, per_token.divergence, keep)
        return loss

    def _digits(self) -> torch.Tensor:
        """Which token ids spell a digit (built once; the digit share of the per-token divergence)."""
        if getattr(self, "_digit_ids", None) is None:
            self._digit_ids = digit_tokens(self.processing_class)
        return self._digit_ids

    def _teacher_pass(
        self, model: torch.nn.Module, inputs: dict[str, Any], head: torch.nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`selfdistill.step.teacher_outputs` with the teacher's weights in place."""
        # model_wrapped: the DeepSpeed engine in training and evaluation alike (model may be the bare module).
        # Under torch_compile the unwrapped model is the compiled module: the teacher's weights are swapped into the
        # bare module it wraps (parameter names without "_orig_mod."), and the teacher pass runs compiled too.
        compiled = self.accelerator.unwrap_model(model)
        bare = getattr(compiled, "_orig_mod", compiled)
        with self.teacher.scoring(bare, release=release_zero3(self.model_wrapped)) as teacher_model, \
                without_embedding_noise(bare):
            runner = compiled if teacher_model is bare else teacher_model
            return teacher_outputs(runner, inputs, head, self.pad_id, self.accelerator.device,
                                   self.args.share_teacher_prefix, self.args.teacher_batch_views)

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

    def _track_num_input_tokens(self, inputs):
        pass  # counted per generation batch in _make_rollouts: a batch here is rows, not input_ids

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        logs = {**logs, **self.recorder.flush(mode, self.state.global_step, self.accelerator)}
        if mode == "train":
            logs["num_tokens"] = float(self.state.num_input_tokens_seen)
        super().log(logs, start_time)
        if mode == "train" and self.is_world_process_zero():
            show_samples(self._samples, self.args.report_to, self.state.global_step, table="loss" in logs)
