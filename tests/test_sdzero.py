"""SD-Zero: the reviser's teacher layout, self-revision training, the two-stage recipe, sync, heatmaps."""

import json
import textwrap
import time

import pytest
import torch
import yaml
from conftest import build_dataset, build_model
from test_trainer import make_args

from selfdistill import SelfDistillTrainer
from selfdistill.cli import main
from selfdistill.heatmap import TokenHeat, render_html, render_png
from selfdistill.methods.sdzero.srt import RevisionConfig, collect_revisions, self_revision_training
from selfdistill.recipes import RecipeError, parse_recipe
from selfdistill.rollout import RewardFunctionError, score_rollouts
from selfdistill.sequences import completion_logits, fit_view, render_context, splice
from selfdistill.sources import Reviser, Rollout


def _rollout(tokenizer, text="12 + 3 = 15", reward=1.0, finished=True):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if finished else [])
    prompt = [{"role": "user", "content": "What is 12 + 3?"}]
    return Rollout(row={"prompt": prompt}, prompt=prompt, completion=text, completion_ids=ids, reward=reward,
                   finished=finished)


def test_teacher_sequence_is_task_response_cue_response(tokenizer):
    reviser = Reviser()
    rollout = _rollout(tokenizer, reward=0.0)
    [[view]] = reviser.views([rollout])
    ids, cut = fit_view(tokenizer, view, len(rollout.completion_ids), 256)
    cue = tokenizer(reviser.cues["wrong"], add_special_tokens=False)["input_ids"]
    first = rollout.completion_ids[:-1]  # the first copy drops its EOS so the cue continues the assistant turn
    assert not cut and view.name == "reviser_wrong"
    assert ids == render_context(tokenizer, rollout.prompt) + first + cue


def test_only_the_second_copy_is_scored(tokenizer):
    model = build_model(tokenizer).eval()
    rollout = _rollout(tokenizer, reward=1.0)
    [[view]] = Reviser().views([rollout])
    context, _ = fit_view(tokenizer, view, len(rollout.completion_ids), 256)
    y = rollout.completion_ids
    batch = splice([context], [y], tokenizer.pad_token_id)
    scored = completion_logits(model, batch)[batch.completion_mask.bool()]
    assert scored.shape[0] == len(y)
    # Brute force: one forward over the whole sequence; the logits predicting y_t sit at len(context) - 1 + t.
    full = torch.tensor([context + y])
    logits = model(full).logits[0]
    expected = logits[len(context) - 1 : len(context) - 1 + len(y)]
    torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)
    # The first copy is context: another first copy changes the teacher's scores of the same second copy.
    other = Rollout(**{**rollout.__dict__, "completion_ids": tokenizer("99", add_special_tokens=False)["input_ids"]})
    [[view2]] = Reviser().views([other])
    context2, _ = fit_view(tokenizer, view2, len(y), 256)
    batch2 = splice([context2], [y], tokenizer.pad_token_id)
    scored2 = completion_logits(model, batch2)[batch2.completion_mask.bool()]
    assert batch2.completion_ids[batch2.completion_mask.bool()].tolist() == y
    assert not torch.allclose(scored, scored2)


@pytest.mark.parametrize("reward, verdict", [(1.0, "correct"), (0.0, "wrong"), (None, "unverified"), (0.49, "wrong")])
def test_cue_follows_the_verdict(tokenizer, reward, verdict):
    reviser = Reviser(cues={"wrong": "\nNo. Again:\n"})
    [[view]] = reviser.views([_rollout(tokenizer, reward=reward)])
    assert view.name == f"reviser_{verdict}" and view.continuation[1] == reviser.cues[verdict]
    assert reviser.cues["correct"] == Reviser().cues["correct"]  # unspecified cues keep the paper's defaults


def test_truncated_rollout_keeps_every_token_in_the_first_copy(tokenizer):
    rollout = _rollout(tokenizer, finished=False)
    [[view]] = Reviser().views([rollout])
    assert view.continuation[0] == rollout.completion_ids


def test_reviser_rejects_unknown_or_empty_cues():
    with pytest.raises(ValueError, match="unknown cue"):
        Reviser(cues={"right": "x"})
    with pytest.raises(ValueError, match="empty"):
        Reviser(cues={"wrong": "  "})


def test_teacher_context_too_long_names_the_fix(tokenizer):
    from selfdistill.sequences import TeacherContextTooLong

    rollout = _rollout(tokenizer, text="1 + 1 = 2. " * 20)
    [[view]] = Reviser().views([rollout])
    with pytest.raises(TeacherContextTooLong, match="raise max_teacher_length"):
        fit_view(tokenizer, view, len(rollout.completion_ids), 64)


def test_trainer_needs_a_verifier_for_the_reviser(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs rewards"):
        SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path), train_dataset=build_dataset(),
                           processing_class=tokenizer, privileged=Reviser())


def _answer_reward(prompts, completions, answer, **kwargs):
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer)]


def test_reviser_trains_with_sync_on_the_configured_step(tmp_path, tokenizer):
    trainer = SelfDistillTrainer(
        model=build_model(tokenizer), args=make_args(tmp_path, max_steps=3, teacher_policy="sync",
                                                     teacher_update_every=2, learning_rate=3e-2),
        train_dataset=build_dataset(), processing_class=tokenizer, privileged=Reviser(),
        reward_funcs=[_answer_reward],
    )
    snapshots = []
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({n: p.clone() for n, p in trainer.teacher.params.items()})

    trainer.add_callback(Snapshot())
    trainer.train()
    student = dict(trainer.model.named_parameters())
    name = next(iter(trainer.teacher.params))
    # Snapshot runs after the teacher update callback: step 1 no copy, step 2 copy, step 3 no copy.
    assert not torch.equal(snapshots[0][name], snapshots[1][name])
    assert torch.equal(snapshots[1][name], snapshots[2][name])
    assert not torch.equal(snapshots[2][name], student[name].detach())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert sum(h.get("teacher/updates", 0.0) for h in logs) == 1.0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_self_revision_collects_only_accepted_revisions(tokenizer):
    model = build_model(tokenizer)
    rows = build_dataset(4).to_list()
    calls, lengths = [], []

    def accept_second_call(prompts, completions, completion_ids, **kwargs):
        calls.append(len(completions))
        lengths.extend(len(ids) for ids in completion_ids)
        return [0.0 if len(calls) == 1 else 1.0 for _ in completions]  # initial all wrong, revisions all right

    config = RevisionConfig(prompts=4, revisions=2, max_new_tokens=4, batch_size=4, max_per_prompt=1,
                            keep_truncated=True)
    examples, stats = collect_revisions(model, tokenizer, rows, Reviser(), [accept_second_call], config,
                                        progress=False)
    assert calls == [4, 8]
    assert stats["initial_wrong"] == 4 and stats["revisions_after_wrong"] == 8
    assert stats["generated_tokens"] == sum(lengths) > 0  # both phases' tokens: the budget comparisons count them
    cue = tokenizer(Reviser().cues["wrong"], add_special_tokens=False)["input_ids"]
    for example in examples:
        labels = example["labels"]
        first_label = next(i for i, t in enumerate(labels) if t != -100)
        assert example["input_ids"][first_label - len(cue) : first_label] == cue  # the revision follows the cue
        assert all(t == -100 for t in labels[:first_label])
        assert labels[first_label:] == example["input_ids"][first_label:]
    assert len(examples) <= 4  # at most max_per_prompt per prompt


def test_self_revision_training_fine_tunes_the_model(tmp_path, tokenizer):
    model = build_model(tokenizer)
    before = {n: p.clone() for n, p in model.named_parameters()}

    def always_right(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    config = RevisionConfig(prompts=4, revisions=1, max_new_tokens=4, batch_size=4, epochs=1, learning_rate=1e-2,
                            train_batch_size=2, keep_truncated=True)
    stats = self_revision_training(model, tokenizer, build_dataset(4), Reviser(), [always_right], config,
                                   output_dir=str(tmp_path / "srt"), training_args=make_args(tmp_path), progress=False)
    assert stats["examples"] > 0 and stats["sft_steps"] >= 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    # SFTTrainer's own defaults (KV cache off, activation checkpointing on) must not leak into phase 2
    assert model.config.use_cache and not model.is_activation_checkpointing


@pytest.mark.parametrize("bf16", [False, True])
def test_self_revision_samples_in_the_precision_phase_two_samples_in(tmp_path, tokenizer, monkeypatch, bf16):
    """The stage's answers and revisions are drawn under the recipe's autocast (bf16 when it trains in bf16), as
    phase 2's rollouts are; without mixed precision, in the weights' own precision."""
    import selfdistill.methods.sdzero.srt as srt_module

    seen = []
    real = srt_module.sample_completions

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(srt_module, "sample_completions", spy)
    args = make_args(tmp_path, bf16=bf16)
    self_revision_training(build_model(tokenizer), tokenizer, build_dataset(4), Reviser(),
                           [lambda prompts, completions, **kw: [0.0] * len(completions)],
                           RevisionConfig(prompts=4, revisions=1, max_new_tokens=3),
                           output_dir=str(tmp_path / "srt"), training_args=args, progress=False)
    assert len(seen) == 2  # the answers, then the revisions
    assert all(on == bf16 for on, _ in seen)
    if bf16:
        assert all(dtype == torch.bfloat16 for _, dtype in seen)
    assert not torch.is_autocast_enabled("cpu")  # the region ends with the stage


def test_self_revision_with_nothing_accepted_skips_sft(tmp_path, tokenizer):
    model = build_model(tokenizer)
    stats = self_revision_training(model, tokenizer, build_dataset(4), Reviser(),
                                   [lambda prompts, completions, **kw: [0.0] * len(completions)],
                                   RevisionConfig(prompts=4, revisions=1, max_new_tokens=3),
                                   output_dir=str(tmp_path / "srt"), training_args=make_args(tmp_path), progress=False)
    assert stats["examples"] == 0 and stats["sft_steps"] == 0 and "warning" in stats


# ------------------------------------------------------------------------------------------------ verifiers
def test_raising_verifier_loses_only_the_bad_rollout():
    def picky(prompts, completions, **kwargs):
        if any(c == "boom" for c in completions):
            raise ValueError("cannot parse 'boom'")
        return [1.0] * len(completions)

    totals, per_func, failures = score_rollouts([picky], [1.0], ["p"] * 3, ["ok", "boom", "ok"], [[1]] * 3,
                                                [{"prompt": "p"}] * 3)
    assert failures == 1
    assert totals[0] == 1.0 and totals[2] == 1.0 and totals[1] != totals[1]  # NaN only for the bad one


def test_hanging_verifier_times_out_with_the_fix():
    def slow(prompts, completions, **kwargs):
        time.sleep(2)
        return [1.0] * len(completions)

    start = time.perf_counter()
    with pytest.raises(RewardFunctionError, match="'slow' failed on all 2 rollouts.*raise reward_timeout"):
        score_rollouts([slow], [1.0], ["p"] * 2, ["a", "b"], [[1]] * 2, [{"prompt": "p"}] * 2, timeout=0.2)
    assert time.perf_counter() - start < 1.5


# ---------------------------------------------------------------------------------------------- the recipe
def test_sdzero_recipe_validation():
    base = {"method": "sdzero", "rewards": ["arithmetic"], "training": {"use_cpu": True}}
    recipe = parse_recipe({**base, "source": {"cues": {"wrong": "No."}, "threshold": 0.5}, "srt": {"prompts": 8}})
    assert recipe.source.type == "reviser" and recipe.srt.prompts == 8
    with pytest.raises(RecipeError, match="Did you mean 'threshold'"):
        parse_recipe({**base, "source": {"treshold": 0.5}})
    with pytest.raises(RecipeError, match="needs a verifier"):
        parse_recipe({"method": "sdzero", "training": {"use_cpu": True}})
    with pytest.raises(RecipeError, match="needs source.type: reviser"):
        parse_recipe({"method": "opsd", "srt": {"prompts": 8}, "training": {"use_cpu": True}})
    with pytest.raises(RecipeError, match="srt.revisions"):
        parse_recipe({**base, "srt": {"revisions": 0}})
    with pytest.raises(RecipeError, match="unknown cue"):
        parse_recipe({**base, "source": {"cues": {"right": "x"}}})


def test_two_stage_recipe_end_to_end_with_a_dotted_path_verifier(tmp_path, tokenizer, monkeypatch):
    module = tmp_path / "my_verifiers.py"
    module.write_text(textwrap.dedent("""
        def lenient(prompts, completions, **kwargs):
            return [1.0 if i % 2 == 0 else 0.0 for i, _ in enumerate(completions)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model_dir = tmp_path / "tiny"
    build_model(tokenizer, max_position_embeddings=1024).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = {
        "method": "sdzero",
        "model": str(model_dir),
        "data": {"task": "arithmetic", "n_train": 16, "n_test": 8, "digits": 1},
        "rewards": ["my_verifiers.lenient"],
        "srt": {"prompts": 8, "revisions": 1, "max_new_tokens": 4, "epochs": 1, "learning_rate": 1e-3,
                "train_batch_size": 4, "keep_truncated": True},
        "eval": {"n": 8, "batch_size": 8, "max_new_tokens": 4},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "num_generations": 1, "max_completion_length": 4, "logging_steps": 1, "use_cpu": True,
                     "save_strategy": "no", "disable_tqdm": True, "heatmap_steps": 1, "heatmap_samples": 2},
    }
    path = tmp_path / "sdzero.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--no-progress", "--allow-code", "my_verifiers"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["method"] == "sdzero" and results["steps"] == 2
    assert results["srt"]["examples"] > 0 and results["srt"]["sft_steps"] >= 1
    assert results["eval_after_srt"]["n"] == 8 and results["eval_after"]["n"] == 8
    for step in (1, 2):
        assert (tmp_path / "out" / "heatmaps" / f"step-{step:06d}.png").stat().st_size > 0
        page = (tmp_path / "out" / "heatmaps" / f"step-{step:06d}.html").read_text()
        assert "reviser_" in page and "title='" in page


# ------------------------------------------------------------------------------------------------ heatmaps
def test_heatmap_renders_every_token_with_its_value(tmp_path):
    sample = TokenHeat(["The", " answer", " is", " <4>", "\n", "done"], [0.0, 0.1, 0.2, 2.5, 0.0, 0.3], "reward 0")
    page = render_html([sample])
    assert page.count("class='t'") == 6 and "title='2.5000'" in page and "&lt;4&gt;" in page
    assert "rgb(255,55,55)" in page  # the largest value is the reddest
    render_png([sample], tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="one value per token"):
        TokenHeat(["a"], [1.0, 2.0])


def test_heatmaps_reach_wandb_offline(tmp_path, tokenizer, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = SelfDistillTrainer(
        model=build_model(tokenizer), args=make_args(tmp_path, max_steps=1, heatmap_steps=1, report_to=["wandb"]),
        train_dataset=build_dataset(), processing_class=tokenizer, privileged=Reviser(), reward_funcs=[_answer_reward],
    )
    trainer.train()
    import wandb

    wandb.finish()
    media = [p.name for p in tmp_path.rglob("*") if "divergence_heatmap" in p.name]
    assert any(name.endswith(".html") for name in media) and any(name.endswith(".png") for name in media), media
