"""SelfDistillTrainer end to end on a tiny model: steps, metrics, resume, LoRA, bad input."""

import json
import math

import pytest
import torch
from conftest import build_dataset, build_model

import selfdistill.sampling as sampling_module
import selfdistill.trainer as trainer_module
from selfdistill import ReferenceSolution, SelfDistillConfig, SelfDistillTrainer
from selfdistill.rollout import Generated, RewardFunctionError
from selfdistill.sequences import render_context
from selfdistill.sources.base import PrivilegedSource, TeacherView
from selfdistill.trainer import NonFiniteLogits


def make_args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        learning_rate=3e-3,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return SelfDistillConfig(**base)


def exact_reward(prompts, completions, answer, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]  # plain-text or conversational
    return [float(a in t) for t, a in zip(texts, answer)]


def make_trainer(tmp_path, tokenizer, model=None, dataset=None, privileged=None, **overrides):
    return SelfDistillTrainer(
        model=model if model is not None else build_model(tokenizer),
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else build_dataset(),
        processing_class=tokenizer,
        privileged=privileged or ReferenceSolution(column="solution"),
        reward_funcs=[exact_reward],
    )


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_three_steps_change_weights_and_log_metrics(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    before = params(trainer.model)
    trainer.train()
    after = params(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in ["loss", "divergence", "clip_fraction", "ratio_clip_fraction", "teacher_student_logp_gap",
                "completions/mean_length", "completions/clipped_ratio", "reward", "time/generation",
                "time/teacher", "time/student", "pi_truncated", "divergence/digit_token_fraction",
                "divergence/digit_share"]:
        assert key in logs[0], key
        assert math.isfinite(logs[0][key])
    # With a frozen initial teacher and a moving student, the divergence is what the loss minimises.
    assert logs[0]["loss"] == pytest.approx(min(logs[0]["divergence"], trainer.args.clip_tau), rel=1e-4)


def test_completion_lengths_and_token_counts_are_logged_as_trl_logs_them(tmp_path, tokenizer, monkeypatch):
    prompt_tokens = []
    real = SelfDistillTrainer._make_rollouts

    def spy(self, rows, mode, n_micro):
        prompt_tokens.append(sum(len(render_context(tokenizer, r["prompt"])) for r in rows))
        return real(self, rows, mode, n_micro)

    monkeypatch.setattr(SelfDistillTrainer, "_make_rollouts", spy)
    trainer = make_trainer(tmp_path, tokenizer, max_completion_length=12, include_num_input_tokens_seen=True)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    seen = 0
    for log, prompts in zip(logs, prompt_tokens):
        assert log["completions/min_length"] <= log["completions/mean_length"] <= log["completions/max_length"]
        if "completions/mean_terminated_length" in log:
            assert log["completions/min_terminated_length"] <= log["completions/mean_terminated_length"]
            assert log["completions/max_terminated_length"] <= log["completions/max_length"]
        seen += prompts + round(log["completions/mean_length"] * 4)  # 4 rollouts a step
        assert log["num_tokens"] == seen  # cumulative prompt + completion tokens (TRL's num_tokens)
    assert trainer.state.num_input_tokens_seen == seen
    assert logs[-1]["num_input_tokens_seen"] == seen  # transformers' own key reads the same count


class _RecordingSource(ReferenceSolution):
    def __init__(self):
        super().__init__(column="solution")
        self.seen = []

    def views(self, rollouts):
        self.seen.extend(rollouts)
        return super().views(rollouts)


def test_teacher_scores_exactly_the_student_completion_ids(tmp_path, tokenizer, monkeypatch):
    source = _RecordingSource()
    trainer = make_trainer(tmp_path, tokenizer, privileged=source, max_steps=1)
    captured = {}
    original = trainer_module.splice

    def spy(contexts, completions, pad_id):
        batch = original(contexts, completions, pad_id)
        captured.setdefault("calls", []).append((contexts, completions, batch))
        return batch

    import selfdistill.step as step_module

    monkeypatch.setattr(trainer_module, "splice", spy)  # the student pass
    monkeypatch.setattr(step_module, "splice", spy)  # the teacher pass
    trainer.train()
    teacher_contexts, teacher_completions, teacher_batch = captured["calls"][0]
    _, student_completions, student_batch = captured["calls"][1]
    assert teacher_completions == student_completions
    w = teacher_batch.context_width
    for i, comp in enumerate(teacher_completions):
        assert teacher_batch.input_ids[i, w : w + len(comp)].tolist() == comp
        assert student_batch.input_ids[i, student_batch.context_width :][: len(comp)].tolist() == comp
        # The teacher context really holds the reference solution.
        assert source.seen[i].row["solution"] in tokenizer.decode(teacher_contexts[i])


def test_resume_continues_as_if_never_interrupted(tmp_path, tokenizer):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, teacher_policy="ema", teacher_ema_rate=0.5)
    straight = make_trainer(tmp_path / "a", tokenizer, **common)
    straight.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    assert (checkpoint / "teacher_state.pt").exists()
    assert (checkpoint / "privileged_source.json").exists()

    resumed = make_trainer(tmp_path / "b", tokenizer, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, rtol=1e-5, atol=1e-6)
    for name, value in straight.teacher.params.items():
        torch.testing.assert_close(resumed.teacher.params[name], value, rtol=1e-5, atol=1e-6)


def test_initial_teacher_never_moves(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, teacher_policy="initial")
    start = params(trainer.model)
    trainer.train()
    for name, tensor in trainer.teacher.params.items():
        assert torch.equal(tensor, start[name])
    # and the swap put the student's weights back after each teacher pass
    assert any(not torch.equal(p, start[n]) for n, p in params(trainer.model).items())


def test_gradient_accumulation_normalises_by_the_step_token_count(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    micro = [{"tokens": 3}, {"tokens": 5}, {"tokens": 7}, {"tokens": 1}]
    trainer._set_normalizers(micro, "train")
    assert [m["normalizer"] for m in micro] == [8.0, 8.0, 8.0, 8.0]
    trainer._set_normalizers(micro[:2], "eval")
    assert [m["normalizer"] for m in micro[:2]] == [3.0, 5.0]


def test_lora_initial_teacher_is_the_base_model(tmp_path, tokenizer):
    from peft import LoraConfig

    trainer = SelfDistillTrainer(
        model=build_model(tokenizer),
        args=make_args(tmp_path, learning_rate=5e-2),
        train_dataset=build_dataset(),
        processing_class=tokenizer,
        privileged=ReferenceSolution(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert trainer.teacher.use_disabled_adapter and not trainer.teacher.params
    base = build_model(tokenizer)  # same seed: the weights the adapter started from
    ids = torch.tensor([[5, 6, 7, 8]])
    trainer.train()
    model = trainer.model
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with trainer.teacher.scoring(model) as teacher:
            teacher_logits = teacher(input_ids=ids).logits
        reference = base(input_ids=ids).logits
    torch.testing.assert_close(teacher_logits, reference)
    assert not torch.allclose(student, reference)


def test_missing_pi_column_names_the_fix(tmp_path, tokenizer):
    with pytest.raises(KeyError, match="column 'solutions' missing.*Did you mean 'solution'"):
        make_trainer(tmp_path, tokenizer, privileged=ReferenceSolution(column="solutions"))
    with pytest.raises(KeyError, match="no 'prompt' column"):
        make_trainer(tmp_path, tokenizer, dataset=build_dataset().rename_column("prompt", "question"))


def test_missing_source_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="privileged= is required"):
        SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path), train_dataset=build_dataset(),
                           processing_class=tokenizer)


def test_long_reference_is_truncated_and_counted_never_the_completion(tmp_path, tokenizer):
    long = build_dataset().map(lambda r: {"solution": r["solution"] + " and so on" * 80})
    trainer = make_trainer(tmp_path, tokenizer, dataset=long, max_teacher_length=400, max_steps=1)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["pi_truncated"] == 4  # every rollout of the step had its reference shortened

    strict = make_trainer(tmp_path, tokenizer, dataset=long, max_teacher_length=400, max_steps=1, pi_overflow="error")
    with pytest.raises(ValueError, match="raise max_teacher_length"):
        strict.train()


class _NoPISource(PrivilegedSource):
    def views(self, rollouts):
        return [[TeacherView(context=r.prompt + [{"role": "user", "content": "x " * 300}])] for r in rollouts]


def test_context_that_cannot_shrink_is_an_error(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, privileged=_NoPISource(), max_teacher_length=64, max_steps=1)
    with pytest.raises(ValueError, match="marks no privileged text"):
        trainer.train()


def test_empty_rollouts_are_counted_and_left_out(tmp_path, tokenizer, monkeypatch):
    real = sampling_module.sample_completions

    def with_one_empty(*args, **kwargs):
        out = real(*args, **kwargs)
        return Generated([[]] + out.completion_ids[1:], [False] + out.truncated[1:])

    monkeypatch.setattr(sampling_module, "sample_completions", with_one_empty)
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["completions/empty"] == 1
    assert math.isfinite(logs[0]["loss"])

    monkeypatch.setattr(sampling_module, "sample_completions", lambda *a, **k: Generated([[]] * 4, [False] * 4))
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    with pytest.raises(ValueError, match="zero completion tokens"):
        trainer.train()


def test_nan_logits_raise_a_named_error(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, teacher_policy="initial")
    trainer.teacher.params["lm_head.weight"][:] = float("nan")  # only the teacher's copy diverged
    with pytest.raises(NonFiniteLogits, match="teacher pass produced NaN"):
        trainer.train()

    model = build_model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight[:] = float("nan")
    trainer = make_trainer(tmp_path, tokenizer, model=model, max_steps=1)
    with pytest.raises(NonFiniteLogits, match="student produced NaN"):
        trainer.train()


def test_a_reward_function_that_always_raises_stops_the_run_with_the_fix(tmp_path, tokenizer):
    def broken(prompts, completions, **kwargs):
        raise RuntimeError("verifier crashed")

    trainer = SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path, max_steps=1),
                                 train_dataset=build_dataset(), processing_class=tokenizer,
                                 privileged=ReferenceSolution(), reward_funcs=[broken, exact_reward])
    with pytest.raises(RewardFunctionError, match="'broken' failed on all 4 rollouts.*verifier crashed"):
        trainer.train()


def test_a_reward_function_failing_on_some_rollouts_is_counted(tmp_path, tokenizer):
    def picky(prompts, completions, answer, **kwargs):
        if "30" in answer:
            raise ValueError("cannot score the problem whose answer is 30")
        return [1.0] * len(answer)

    trainer = SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path, max_steps=4),
                                 train_dataset=build_dataset(), processing_class=tokenizer,
                                 privileged=ReferenceSolution(), reward_funcs=[picky])
    trainer.train()  # 4 steps x 2 prompts: every prompt once, the one with answer 30 in two rollouts
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert sum(h["reward_failures"] for h in logs) == 2
    assert all(h["reward"] == 1.0 for h in logs)


@pytest.mark.parametrize("overrides, message", [
    (dict(per_device_train_batch_size=3, num_generations=2), "not divisible by num_generations"),
    (dict(remove_unused_columns=True), "would drop the dataset columns"),
    (dict(num_iterations=2, ratio_clip=None), "set ratio_clip"),
    (dict(teacher_policy="frozen"), "teacher_policy='frozen' is not valid"),
    (dict(divergence="jsd", jsd_beta=0.0), "outside \\(0, 1\\)"),
    (dict(support="sampled", clip="entry"), "use clip='token'"),
    (dict(gradient_accumulation_steps=2, steps_per_generation=3), "multiple of gradient_accumulation_steps"),
])
def test_config_rejects_bad_combinations(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_rollout_reuse_uses_the_importance_ratio(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, num_iterations=2, max_steps=2, learning_rate=3e-2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    # the second step reused the first step's rollouts: no generation happened in it
    assert "time/generation" in logs[0] and "time/generation" not in logs[1]


def test_reward_functions_with_one_name_are_kept_apart():
    from selfdistill.rollout import score_rollouts

    funcs = [lambda prompts, completions, **kw: [1.0] * len(completions),
             lambda prompts, completions, **kw: [0.5] * len(completions)]
    totals, per_func, failures = score_rollouts(funcs, [1.0, 2.0], ["p"], ["c"], [[1]], [{"prompt": "p"}])
    assert totals == [2.0] and failures == 0
    assert list(per_func) == ["<lambda>", "<lambda>_1"]


def test_checkpoints_and_the_final_model_carry_a_model_card(tmp_path, tokenizer):
    from selfdistill.export import save_final_model

    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    # The card sits with the weights and names their folder; the run folder (no model in it) gets none.
    assert not (tmp_path / "out" / "README.md").exists()
    card = (tmp_path / "out" / "checkpoint-1" / "README.md").read_text()
    assert "selfdistill" in card and "OPSD" in card and "2601.18734" in card
    assert f'model="{tmp_path / "out" / "checkpoint-1"}"' in card and ".partial" not in card
    first = trainer.train_dataset[0]["prompt"][0]["content"]
    assert json.dumps(first) in card and "27 + 58" not in card  # the user's own first prompt
    save_final_model(trainer, tmp_path / "out" / "final")
    final = (tmp_path / "out" / "final" / "README.md").read_text()
    assert "library_name: transformers" in final and "on-policy-distillation" in final
    assert f'model="{tmp_path / "out" / "final"}"' in final


def test_saved_files_follow_the_umask(tmp_path, tokenizer):
    import os
    import stat

    from selfdistill.export import save_final_model

    old = os.umask(0o022)
    try:
        trainer = make_trainer(tmp_path, tokenizer, max_steps=1, save_strategy="steps", save_steps=1)
        trainer.train()
        save_final_model(trainer, tmp_path / "out" / "final")
    finally:
        os.umask(old)
    for folder in (tmp_path / "out" / "checkpoint-1", tmp_path / "out" / "final"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
        assert modes["model.safetensors"] == 0o644, modes  # transformers alone writes it 0600
        assert set(modes.values()) == {0o644}, modes


def test_bf16_generation_casts_each_weight_once_per_call_and_samples_the_same_tokens(tmp_path, tokenizer):
    """Under bf16 accelerate puts an autocast region around every forward, which casts every float32 weight again at
    each decoding step; one enclosing region (``generation_model``) casts each weight once per ``generate`` call and
    must draw the very same tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountWeightCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 \
                    and isinstance(args[0], torch.nn.Parameter):
                self.casts += 1
            return func(*args, **kwargs)

    trainer = make_trainer(tmp_path, tokenizer, bf16=True, max_completion_length=5)
    trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)  # what train() does: forward under autocast
    prompt_ids = [render_context(tokenizer, [{"role": "user", "content": f"What is {a} + 3?"}]) for a in (7, 21)]
    n_weights = sum(type(m) is torch.nn.Linear for m in trainer.model.modules())
    eos = [tokenizer.eos_token_id]

    def sample(context):
        counter = CountWeightCasts()
        with context(trainer.model_wrapped, trainer.accelerator) as model, counter:
            out = sampling_module.sample_completions(model, prompt_ids, pad_id=tokenizer.pad_token_id, eos=eos,
                                                     max_new_tokens=5, do_sample=False, share_prefix=False)
        return out, counter.casts

    once, casts_once = sample(sampling_module.generation_model)
    each_step, casts_each_step = sample(sampling_module.unwrap_model_for_generation)
    assert casts_once == n_weights                              # every linear weight cast once for the whole call
    assert casts_each_step >= 3 * n_weights                      # ... against once per forward without the region
    assert once.completion_ids == each_step.completion_ids


def test_torch_compile_trains_like_eager(tmp_path, tokenizer):
    """TrainingArguments' torch_compile: the student and teacher passes run through the compiled module, the initial
    teacher's weights are swapped into the bare module it wraps, and the losses are the eager run's to float
    rounding (before the fix the teacher pass looked its parameters up under the compiled "_orig_mod." names)."""
    from torch._dynamo.eval_frame import OptimizedModule

    eager = make_trainer(tmp_path / "eager", tokenizer, max_steps=2)
    eager.train()
    torch._dynamo.reset()
    try:
        compiled = make_trainer(tmp_path / "compiled", tokenizer, max_steps=2, torch_compile=True)
        start = params(compiled.model)
        compiled.train()
        assert isinstance(compiled.accelerator.unwrap_model(compiled.model_wrapped), OptimizedModule)
    finally:
        torch._dynamo.reset()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (eager, compiled)]
    assert len(losses[1]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-6)
    for name, tensor in compiled.teacher.params.items():  # the teacher stayed the initial weights
        assert torch.equal(tensor, start[name])
    assert any(not torch.equal(p, start[n]) for n, p in params(compiled.model).items())


@pytest.mark.parametrize("habit", [
    dict(lr_scheduler_type="cosine", warmup_steps=1),
    dict(optim="adafactor"),
    dict(optim="sgd", max_grad_norm=0.0),
    dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
    dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=1,
         load_best_model_at_end=True, metric_for_best_model="loss", eval_on_start=True),
    dict(auto_find_batch_size=True, include_num_input_tokens_seen=True, logging_first_step=True),
    dict(full_determinism=True, data_seed=3, dataloader_num_workers=1),
], ids=["cosine", "adafactor", "sgd-no-clip", "checkpointing", "eval-best-model", "auto-batch", "determinism"])
def test_trainer_habits_train_two_steps(tmp_path, tokenizer, habit):
    """TrainingArguments switches a transformers user sets out of habit train without a special case here."""
    trainer = SelfDistillTrainer(
        model=build_model(tokenizer), args=make_args(tmp_path, max_steps=2, per_device_eval_batch_size=4, **habit),
        train_dataset=build_dataset(), eval_dataset=build_dataset(4) if "eval_strategy" in habit else None,
        processing_class=tokenizer, privileged=ReferenceSolution(column="solution"), reward_funcs=[exact_reward],
    )
    start = params(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    if "eval_strategy" in habit:
        assert any("eval_loss" in h for h in trainer.state.log_history)
    assert any(not torch.equal(p, start[n]) for n, p in params(trainer.model).items())


def test_a_streamed_dataset_trains_with_each_prompt_repeated_num_generations_times(tmp_path, tokenizer, monkeypatch):
    """datasets.IterableDataset (streaming), as TRL's GRPOTrainer takes it: the rows are repeated as the samplers
    repeat a map-style dataset's (before: accelerate's batch dispatch failed on the string prompts)."""
    seen = []
    real = SelfDistillTrainer._make_rollouts

    def spy(self, rows, mode, n_micro):
        seen.append((mode, [r["answer"] for r in rows]))
        return real(self, rows, mode, n_micro)

    monkeypatch.setattr(SelfDistillTrainer, "_make_rollouts", spy)
    trainer = SelfDistillTrainer(
        model=build_model(tokenizer),
        args=make_args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4,
                       dataloader_num_workers=2),
        train_dataset=build_dataset().to_iterable_dataset(), eval_dataset=build_dataset(4).to_iterable_dataset(),
        processing_class=tokenizer, privileged=ReferenceSolution(column="solution"), reward_funcs=[exact_reward],
    )
    assert trainer.args.dataloader_num_workers == 0 and not trainer.args.accelerator_config.dispatch_batches
    trainer.train()
    assert trainer.state.global_step == 3
    train = [answers for mode, answers in seen if mode == "train"]
    assert len(train) == 3
    for a in train:  # 4 rollouts: 2 prompts x num_generations=2, the copies adjacent
        assert len(a) == 4 and a[0] == a[1] and a[2] == a[3] and a[0] != a[2]
    evals = [x for mode, answers in seen if mode == "eval" for x in answers]
    assert evals == [x for x in build_dataset(4)["answer"] for _ in range(2)]


def test_a_streamed_dataset_with_batch_dispatch_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="dispatch_batches=False"):
        make_trainer(tmp_path, tokenizer, dataset=build_dataset().to_iterable_dataset(),
                     accelerator_config={"dispatch_batches": True})


def test_a_streamed_run_resumes_as_if_never_interrupted(tmp_path, tokenizer, monkeypatch):
    """Resuming on a stream skips the batches already trained on (transformers reads past them), so the resumed run
    trains on the uninterrupted run's later prompts and ends with its weights."""
    seen = {}
    real = SelfDistillTrainer._make_rollouts

    def spy(self, rows, mode, n_micro):
        seen.setdefault(id(self), []).append([r["answer"] for r in rows])
        return real(self, rows, mode, n_micro)

    monkeypatch.setattr(SelfDistillTrainer, "_make_rollouts", spy)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, teacher_policy="ema", teacher_ema_rate=0.5)
    straight = make_trainer(tmp_path / "a", tokenizer, dataset=build_dataset(16).to_iterable_dataset(), **common)
    straight.train()
    resumed = make_trainer(tmp_path / "b", tokenizer, dataset=build_dataset(16).to_iterable_dataset(), **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert seen[id(resumed)] == seen[id(straight)][2:]
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, rtol=1e-5, atol=1e-6)


def test_neftune_noise_reaches_the_student_pass_only(tmp_path, tokenizer, monkeypatch):
    """neftune_noise_alpha (transformers' NEFTune hook on the input embeddings): the student's training forward gets
    the noise; sampling and the teacher pass (the target) read clean embeddings."""
    import transformers.integrations.neftune as neftune

    calls = []
    real = neftune.neftune_post_forward_hook

    def hook(module, args, output):
        calls.append((torch.is_grad_enabled(), module.training))
        return real(module, args, output)

    monkeypatch.setattr(neftune, "neftune_post_forward_hook", hook)
    trainer = make_trainer(tmp_path, tokenizer, max_steps=2, neftune_noise_alpha=5.0)
    trainer.train()
    noisy = [grad for grad, training in calls if training]
    assert noisy and all(noisy)  # noise only where gradients flow: the student pass
    assert any(not grad for grad, _ in calls)  # sampling and the teacher ran, clean


def test_recorded_extremes_are_over_the_whole_logging_window():
    """min / max metrics across several generation batches of one logging window (one process)."""
    from types import SimpleNamespace

    from selfdistill.tracking import MetricsRecorder

    recorder = MetricsRecorder()
    recorder.record_completions("train", [5, 9, 7], [False, True, False], 0)
    recorder.record_completions("train", [3, 6], [True, True], 0)
    out = recorder.flush("train", 2, SimpleNamespace(num_processes=1))
    assert out["completions/min_length"] == 3 and out["completions/max_length"] == 9
    assert out["completions/mean_length"] == pytest.approx(30 / 5)
    assert out["completions/min_terminated_length"] == 5 and out["completions/max_terminated_length"] == 7
    with pytest.raises(ValueError, match="use 'mean', 'sum', 'min' or 'max'"):
        recorder.record("train", "x", 1.0, reduce="median")


def test_a_stream_without_declared_columns_is_checked_on_its_first_row(tmp_path, tokenizer):
    """A generator-built stream declares no columns; the missing PI column is still named, not read as empty."""
    from datasets import IterableDataset

    rows = [{k: v for k, v in r.items() if k != "solution"} for r in build_dataset()]
    with pytest.raises(KeyError, match="column 'solution' missing from the dataset"):
        make_trainer(tmp_path, tokenizer, dataset=IterableDataset.from_generator(lambda: iter(rows)))


def test_a_rollout_no_view_trains_leaves_the_distillation_loss_and_its_count(tmp_path, tokenizer):
    """TeacherView(trains=False) (SDPO without a successful sibling): the rollout's tokens leave the distillation
    term and its divisor, which counts the tokens of the rollouts that do train."""
    import dataclasses

    class HalfSilent(ReferenceSolution):
        def views(self, rollouts):
            return [[dataclasses.replace(v[0], trains=i % 2 == 0)] for i, v in enumerate(super().views(rollouts))]

    trainer = make_trainer(tmp_path, tokenizer, privileged=HalfSilent(column="solution"))
    rows = [row for row in build_dataset(2).to_list() for _ in range(2)]
    inputs = trainer._make_rollouts(rows, "train", 1)[0]
    assert inputs["distills"] == [True, False, True, False]
    counts = [len(c) for c in inputs["completion_ids"]]
    assert inputs["normalizer"] == sum(counts) and inputs["distill_normalizer"] == counts[0] + counts[2]
    seen = []
    real = trainer.privileged.token_losses

    def spy(*args, **kwargs):
        per_token, metrics = real(*args, **kwargs)
        seen.append(per_token.loss.detach())
        return per_token, metrics

    trainer.privileged.token_losses = spy
    loss = trainer.compute_loss(trainer.model, inputs)
    per = torch.split(seen[0], counts)
    expected = (per[0].sum() + per[2].sum()) / (counts[0] + counts[2])
    torch.testing.assert_close(loss.detach(), expected)
    assert (seen[0].sum() / sum(counts) - expected).abs() > 1e-9  # the silent rollouts did carry a loss to drop


def test_the_digit_share_of_the_divergence_matches_a_brute_force_count(tokenizer):
    """Which tokens spell digits, from the tokenizer's own pieces; the share of a per-token divergence they carry."""
    from selfdistill.step import digit_share, digit_tokens

    is_digit = digit_tokens(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    digit_ids = [i for i, p in enumerate(pieces) if p and any(c.isdigit() for c in p)]
    other_ids = [i for i, p in enumerate(pieces) if p and not any(c.isdigit() for c in p)]
    assert digit_ids and other_ids and is_digit.sum().item() == len(digit_ids)
    tokens = torch.tensor([digit_ids[0], other_ids[0], digit_ids[-1], other_ids[1], other_ids[2]])
    values = torch.tensor([0.5, 1.0, 0.25, 0.0, 2.25], dtype=torch.float64)
    out = digit_share(values, tokens, is_digit)
    assert out["divergence/digit_share"] == pytest.approx((0.5 + 0.25) / 4.0)
    assert out["divergence/digit_token_fraction"] == pytest.approx(2 / 5)
    assert "divergence/digit_share" not in digit_share(torch.zeros(5), tokens, is_digit)  # no divergence, no share
    assert digit_share(torch.zeros(0), tokens[:0], is_digit) == {}
