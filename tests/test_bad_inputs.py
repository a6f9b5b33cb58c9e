"""Bad input through the CLI and the Python API: one clear error that names the problem and the fix, raised before
any model loads where the input allows it. docs/reliability.md lists every case with its test (here or elsewhere).
"""

import functools
import json
import math
import time

import pytest
import torch
import yaml
from conftest import build_dataset, build_model
from datasets import Dataset
from test_trainer import exact_reward, make_args, make_trainer

import selfdistill.losses as losses_module
import selfdistill.run as run_module
import selfdistill.trainer as trainer_module
from selfdistill import ReferenceSolution, SelfDistillTrainer
from selfdistill.agent import EnvironmentFailure
from selfdistill.checkpoints import CHECKPOINT_INFO, CheckpointMismatch
from selfdistill.cli import main
from selfdistill.envs import GuessNumber
from selfdistill.recipes import ALLOW_CODE_ENV, RecipeError, load_recipe, parse_recipe
from selfdistill.rollout import RewardFunctionError
from selfdistill.sources import Skills
from selfdistill.trainer import NonFiniteLogits

BASE = {"data": {"task": "arithmetic", "n_train": 16, "n_test": 4}, "rewards": ["arithmetic"],
        "training": {"use_cpu": True}}


def _cli(tmp_path, capsys, raw, *overrides, flags=()) -> str:
    """Run ``selfdistill train`` on a recipe whose model path does not exist: an error about anything else proves the
    check came before the model load. Returns stderr; the exit code must be 2 (a named error, no traceback)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    assert main(["train", str(path), *overrides, "--no-progress", *flags]) == 2
    return capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was named")

    monkeypatch.setattr(run_module, "load_model", refuse)
    monkeypatch.setattr(run_module, "load_tokenizer", refuse)


# ------------------------------------------------------------------------------------------------ recipes, CLI
@pytest.mark.parametrize("override, message", [
    ("training.num_generations=0", "num_generations=0 must be >= 1"),
    ("training.max_completion_length=0", "max_completion_length=0 must be >= 1"),
    ("training.per_device_train_batch_size=0", "per_device_train_batch_size=0 must be >= 1"),
    ("training.per_device_train_batch_size=-4", "per_device_train_batch_size=-4 must be >= 1"),
    ("training.max_steps=0", "max_steps=0 trains nothing"),
    ("training.divergence=kl", "divergence='kl' is not valid; choose one of"),
    ("training.support=top64", "support='top64' is not valid; choose one of"),
    ("training.clip=hard", "clip='hard' is not valid; choose one of"),
])
def test_bad_sizes_and_names_through_the_cli(tmp_path, capsys, no_model_load, override, message):
    err = _cli(tmp_path, capsys, BASE, override)
    assert "recipe error" in err and message in err, err


def test_a_python_object_tag_is_refused_by_the_safe_loader(tmp_path, capsys, no_model_load):
    marker = tmp_path / "pwned"
    raw = f"training:\n  output_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    err = _cli(tmp_path, capsys, raw)
    assert "is not valid YAML" in err and "python/object" in err
    assert not marker.exists()
    with pytest.raises(RecipeError, match="not a YAML scalar"):  # the same tag in an override
        load_recipe(_write(tmp_path, BASE), ["training.output_dir=!!python/object/apply:os.system [ls]"])


def test_an_override_value_that_is_not_yaml_names_the_override(tmp_path):
    with pytest.raises(RecipeError, match=r"override 'training.max_steps=\[': the value is not a YAML"):
        load_recipe(_write(tmp_path, BASE), ["training.max_steps=["])


def test_an_unknown_source_type_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError, match="source.type='refrence' is not available. Did you mean 'reference'"):
        parse_recipe({**BASE, "source": {"type": "refrence"}})


def test_code_named_by_a_recipe_needs_consent(tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.delenv(ALLOW_CODE_ENV, raising=False)
    raw = {**BASE, "rewards": ["os.system"]}
    err = _cli(tmp_path, capsys, raw)
    assert "'os.system' would import and run code from module 'os'" in err and "--allow-code os" in err
    views = {**BASE, "method": "avsd", "source": {"views": ["full_solution", "json.loads"]}}
    with pytest.raises(RecipeError, match="source.views: 'json.loads' would import"):
        parse_recipe(views)
    with pytest.raises(RecipeError, match="trust_remote_code runs Python files"):
        parse_recipe({**BASE, "training": {"use_cpu": True, "model_init_kwargs": {"trust_remote_code": True}}})
    # Consent by flag or environment variable; built-in rewards never need it.
    parse_recipe(views, allow_code=["json"])
    monkeypatch.setenv(ALLOW_CODE_ENV, "json")
    parse_recipe(views)
    parse_recipe(BASE, allow_code=[])


def test_a_reward_that_is_neither_built_in_nor_a_path(tmp_path):
    with pytest.raises(RecipeError, match="reward 'exact' is neither built in"):
        parse_recipe({**BASE, "rewards": ["exact"]})


def test_an_allowed_reward_that_cannot_be_imported(tmp_path, capsys, no_model_load):
    err = _cli(tmp_path, capsys, {**BASE, "rewards": ["no_such_pkg.rewards.f"]}, flags=["--allow-code", "no_such_pkg"])
    assert "cannot import 'f' from 'no_such_pkg.rewards'" in err


def test_a_model_path_that_does_not_exist(tmp_path, capsys):
    err = _cli(tmp_path, capsys, {**BASE, "model": str(tmp_path / "nowhere"), "eval": {"before": False}})
    assert "is a path, and no folder exists there" in err


def test_a_missing_privileged_column_in_data_files_is_named_before_the_model_loads(tmp_path, capsys, no_model_load):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(8)))
    raw = {"data": {"task": None, "train_files": str(rows)}, "rewards": ["arithmetic"],
           "training": {"use_cpu": True, "per_device_train_batch_size": 4, "num_generations": 2}}
    err = _cli(tmp_path, capsys, raw)
    assert "column 'solution' missing from the dataset; ReferenceSolution reads it" in err


def test_too_few_prompts_for_one_generation_batch(tmp_path, capsys, no_model_load):
    raw = {**BASE, "data": {"task": "arithmetic", "n_train": 2, "n_test": 2},
           "training": {"use_cpu": True, "per_device_train_batch_size": 8, "num_generations": 2}}
    err = _cli(tmp_path, capsys, raw)
    assert "train_dataset has 2 prompts; one generation batch takes 4 distinct prompts" in err


def _write(tmp_path, raw):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------------------- Python API
def test_a_model_built_in_code_without_a_tokenizer_is_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="processing_class= is needed: the model was built in code"):
        SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path), train_dataset=build_dataset(),
                           privileged=ReferenceSolution())


def test_an_empty_dataset(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="train_dataset has 0 prompts"):
        make_trainer(tmp_path, tokenizer, dataset=build_dataset().select([]))


def test_prompts_as_strings_or_messages_both_train_and_other_types_are_named(tmp_path, tokenizer):
    as_text = build_dataset().map(lambda row: {"prompt": row["prompt"][0]["content"]})
    for dataset in (build_dataset(), as_text):
        trainer = make_trainer(tmp_path, tokenizer, dataset=dataset, max_steps=1)
        trainer.train()
        assert trainer.state.global_step == 1
    numbers = Dataset.from_list([{**row, "prompt": 7} for row in build_dataset().to_list()])
    with pytest.raises(TypeError, match="train_dataset row 0: the prompt is int 7; a prompt is a string"):
        make_trainer(tmp_path, tokenizer, dataset=numbers)


def test_a_reward_function_returning_none(tmp_path, tokenizer):
    trainer = SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path, max_steps=1),
                                 train_dataset=build_dataset(), processing_class=tokenizer,
                                 privileged=ReferenceSolution(), reward_funcs=[lambda prompts, completions, **kw: None])
    with pytest.raises(RewardFunctionError, match="returned None instead of a list with one float"):
        trainer.train()


def test_a_non_finite_loss_from_finite_logits(tmp_path, tokenizer, monkeypatch):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    real = losses_module.token_losses

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss[0] = math.nan
        return out

    monkeypatch.setattr(losses_module, "token_losses", poisoned)
    with pytest.raises(NonFiniteLogits, match="the loss of step 1 is nan although the logits were finite"):
        trainer.train()


class _Exploding(GuessNumber):
    def step(self, action):
        if self.turns >= 1:
            raise RuntimeError("board state corrupted")
        return super().step(action)


class _Hanging(GuessNumber):
    def step(self, action):
        time.sleep(2)
        return super().step(action)


def _env_trainer(tmp_path, tokenizer, env_cls, **overrides):
    rows = GuessNumber.make_rows(4, seed=0, split="train", low=1, high=4, max_turns=3)
    args = make_args(tmp_path, max_steps=1, max_completion_length=4, max_turns=3, support="sampled", clip="none",
                     **overrides)
    return SelfDistillTrainer(model=build_model(tokenizer, max_position_embeddings=1024), args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              privileged=Skills(summaries_per_step=0),
                              environment_factory=functools.partial(env_cls, low=1, high=4, max_turns=3))


def test_an_environment_that_raises_mid_episode(tmp_path, tokenizer):
    trainer = _env_trainer(tmp_path, tokenizer, _Exploding)
    with pytest.raises(EnvironmentFailure, match=r"environment _Exploding: step failed at turn 2 \(RuntimeError: "
                                                 r"board state corrupted\) on the task \{'secret'"):
        trainer.train()


def test_an_environment_that_hangs(tmp_path, tokenizer):
    trainer = _env_trainer(tmp_path, tokenizer, _Hanging, env_timeout=0.2)
    start = time.perf_counter()
    with pytest.raises(EnvironmentFailure, match=r"step failed at turn 1 \(TimeoutError: did not return within 0.2 s "
                                                 r"\(env_timeout\)\).*raise env_timeout"):
        trainer.train()
    assert time.perf_counter() - start < 30


def test_a_zero_checkpoint_from_another_world_size_is_refused_before_loading(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / CHECKPOINT_INFO).write_text(
        json.dumps({"world_size": 4, "deepspeed": True, "zero_stage": 2, "step": 2}))
    trainer.is_deepspeed_enabled = True  # as under `accelerate launch --use_deepspeed` on one process
    with pytest.raises(CheckpointMismatch, match="ZeRO-2 on 4 processes and this run has 1.*--num_processes 4"
                                                 ".*zero_to_fp32.py"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0


def test_reward_weights_and_non_callables(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="2 reward_weights for 1 reward_funcs"):
        SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path), train_dataset=build_dataset(),
                           processing_class=tokenizer, privileged=ReferenceSolution(), reward_funcs=[exact_reward],
                           reward_weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="is not callable"):
        SelfDistillTrainer(model=build_model(tokenizer), args=make_args(tmp_path), train_dataset=build_dataset(),
                           processing_class=tokenizer, privileged=ReferenceSolution(), reward_funcs=["exact"])


def test_nothing_is_lost_on_a_bad_input_mid_run(tmp_path, tokenizer):
    """A run stopped by a bad input keeps its last checkpoint: the error never deletes or half-writes one."""
    trainer = make_trainer(tmp_path, tokenizer, max_steps=4, save_strategy="steps", save_steps=1)
    real = losses_module.token_losses
    calls = []

    def fails_at_step_3(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) >= 3:  # one call per step: step 3
            out.loss[0] = torch.inf
        return out

    trainer_module_patch = pytest.MonkeyPatch()
    trainer_module_patch.setattr(losses_module, "token_losses", fails_at_step_3)
    try:
        with pytest.raises(NonFiniteLogits):
            trainer.train()
    finally:
        trainer_module_patch.undo()
    saved = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert saved and all((tmp_path / "out" / name / CHECKPOINT_INFO).exists() for name in saved)


def test_held_out_evaluation_gives_a_hanging_verifier_the_same_time_limit(tokenizer):
    from selfdistill.evaluation import evaluate

    def hangs(prompts, completions, **kwargs):
        time.sleep(2)
        return [1.0] * len(completions)

    start = time.perf_counter()
    with pytest.raises(RewardFunctionError, match="'hangs' failed on all 4 rollouts.*reward_timeout"):
        evaluate(build_model(tokenizer), tokenizer, build_dataset(4), hangs, max_new_tokens=2, progress=False,
                 reward_timeout=0.2)
    assert time.perf_counter() - start < 1.8


def test_the_python_api_names_bad_input_before_it_loads_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(KeyError, match="column 'solution' missing"):
        SelfDistillTrainer(model="smollm2-135m-instruct", args=make_args(tmp_path),
                           train_dataset=build_dataset().remove_columns("solution"), privileged=ReferenceSolution())
    with pytest.raises(ValueError, match="Reviser needs rewards"):
        from selfdistill.sources import Reviser

        SelfDistillTrainer(model="smollm2-135m-instruct", args=make_args(tmp_path), train_dataset=build_dataset(),
                           privileged=Reviser())
    # the wrong containers: rows as a list, every split at once, keyword dicts for the config
    from datasets import DatasetDict
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="train_dataset is a list; pass a datasets.Dataset .*Dataset.from_list"):
        SelfDistillTrainer(model="smollm2-135m-instruct", args=make_args(tmp_path),
                           train_dataset=build_dataset().to_list(), privileged=ReferenceSolution())
    with pytest.raises(TypeError, match="train_dataset is a DatasetDict \\(splits: train, test\\); pass one split, "
                                        "e.g. train_dataset=dataset\\['train'\\]"):
        SelfDistillTrainer(model="smollm2-135m-instruct", args=make_args(tmp_path), privileged=ReferenceSolution(),
                           train_dataset=DatasetDict(train=build_dataset(), test=build_dataset()))
    with pytest.raises(TypeError, match="got dict; build one with SelfDistillConfig\\(\\*\\*args\\)"):
        SelfDistillTrainer(model="smollm2-135m-instruct", args={"output_dir": str(tmp_path)},
                           train_dataset=build_dataset(), privileged=ReferenceSolution())
    with pytest.raises(TypeError, match="got TrainingArguments; .*takes the TrainingArguments fields as well"):
        SelfDistillTrainer(model="smollm2-135m-instruct", args=TrainingArguments(output_dir=str(tmp_path)),
                           train_dataset=build_dataset(), privileged=ReferenceSolution())
    # a recipe's source name instead of a source object
    with pytest.raises(TypeError, match="privileged= takes a privileged-information source object, got str 'reference'"
                                        ".*'reference': selfdistill.methods.opsd.ReferenceSolution"):
        SelfDistillTrainer(model="smollm2-135m-instruct", args=make_args(tmp_path), train_dataset=build_dataset(),
                           privileged="reference")


def test_recipe_files_that_cannot_be_read_are_named(tmp_path, capsys, no_model_load):
    from selfdistill.cli import main

    dup = tmp_path / "dup.yaml"
    dup.write_text("method: opsd\nmodel: x\nmethod: sdzero\n")
    for command in (["train"], ["check"], ["diagnose"]):
        assert main([*command, str(dup)]) == 2
        err = capsys.readouterr().err
        assert "recipe error" in err and "'method' is given twice, on lines 1 and 3" in err, err
    dup.write_text("model: x\ntraining:\n  max_steps: 2\n  max_steps: 3\n")  # inside a section too
    assert main(["check", str(dup)]) == 2
    assert "'max_steps' is given twice, on lines 3 and 4" in capsys.readouterr().err
    folder = tmp_path / "a_folder"
    folder.mkdir()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    listed = tmp_path / "list.yaml"
    listed.write_text("- method: opsd\n")
    for path, message in [(folder, "is a folder"), (binary, "cannot be read"), (listed, "got a list")]:
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert "recipe error" in err and message in err and "Traceback" not in err, err


def test_eval_on_a_folder_without_a_model_is_named(tmp_path, capsys):
    from selfdistill.cli import main

    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert main(["eval", str(_write(tmp_path, BASE)), "--model", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "holds no model (no config.json; it has: notes.txt)" in err and "checkpoint-N" in err


def test_a_wrong_length_or_non_list_reward_is_a_broken_function_not_a_retry():
    from selfdistill.rollout import score_rollouts

    args = (["p"] * 3, ["a", "b", "c"], [[1], [2], [3]], [{"prompt": "p"}] * 3)
    one_value = lambda prompts, completions, **kw: [1.0]  # noqa: E731 - passes every one-rollout retry
    with pytest.raises(RewardFunctionError, match="returned 1 rewards for 3 completions"):
        score_rollouts([one_value], [1.0], *args)
    with pytest.raises(RewardFunctionError, match="returned float .1.0. instead of a list"):
        score_rollouts([lambda prompts, completions, **kw: 1.0], [1.0], *args)


def test_non_finite_rewards_are_counted_failures_and_a_whole_batch_of_them_stops(caplog):
    from selfdistill.rollout import score_rollouts

    args = (["p"] * 3, ["a", "b", "c"], [[1], [2], [3]], [{"prompt": "p"}] * 3)
    some = lambda prompts, completions, **kw: [1.0, math.nan, math.inf]  # noqa: E731
    with caplog.at_level("WARNING"):
        totals, per_func, failures = score_rollouts([some], [1.0], *args)
    assert failures == 2 and totals[0] == 1.0 and math.isnan(totals[1]) and math.isnan(totals[2])
    assert "returned 2 non-finite reward(s)" in caplog.text
    nothing = lambda prompts, completions, **kw: [None, None, None]  # noqa: E731 - TRL's "not mine": no failure
    assert score_rollouts([nothing], [1.0], *args)[2] == 0
    with pytest.raises(RewardFunctionError, match="failed on all 3 rollouts"):
        score_rollouts([lambda prompts, completions, **kw: [math.nan] * 3], [1.0], *args)


def test_every_row_is_checked_before_the_model_loads(tmp_path, capsys, no_model_load):
    rows = [{"prompt": f"What is {i} + 1?", "solution": f"{i + 1}", "answer": str(i + 1)} for i in range(100)]
    rows[70]["prompt"], rows[90]["prompt"] = "   ", [{"role": "user", "content": ""}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {**BASE, "data": {"task": None, "train_files": str(data)}, "source": {"type": "reference"},
              "training": {"use_cpu": True, "output_dir": str(tmp_path / "out")}}
    err = _cli(tmp_path, capsys, recipe)
    assert "2 of 100 rows (rows 70, 90) have an empty prompt" in err and "dataset.filter" in err, err
    rows[70]["prompt"], rows[90]["prompt"] = "ok?", "ok?"
    rows[80]["solution"] = None
    data.write_text("\n".join(json.dumps(r) for r in rows))
    err = _cli(tmp_path, capsys, recipe)
    assert "column 'solution', which ReferenceSolution shows the teacher, is empty or None in 1 of 100 rows (row 80)" \
        in err, err


def test_an_output_dir_that_cannot_be_written_is_named_before_the_model_loads(tmp_path, capsys, no_model_load,
                                                                               tokenizer):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in [(a_file, "is a file, not a folder"), (a_file / "sub", "cannot be written")]:
        err = _cli(tmp_path, capsys, {**BASE, "training": {"use_cpu": True, "output_dir": str(out)}})
        assert "recipe error" in err and message in err, err
    with pytest.raises(ValueError, match="is a file, not a folder"):
        make_trainer(tmp_path, tokenizer, output_dir=str(a_file))


@pytest.mark.parametrize("field, value, message", [
    ("temperature", math.nan, "temperature=nan is not a finite number"),
    ("learning_rate", math.inf, "learning_rate=inf is not a finite number"),
    ("distill_weight", math.nan, "distill_weight=nan is not a finite number"),
    ("reward_weights", [1.0, math.nan], "reward_weights=[1.0, nan] is not a finite number"),
    ("learning_rate", -1e-3, "learning_rate=-0.001 must be >= 0"),
    ("jsd_beta", 1.5, "jsd_beta=1.5 must be in [0, 1]"),
    ("top_k", -1, "top_k=-1 must be >= 0"),
    ("support_top_k", 0, "support_top_k=0 must be >= 1"),
    ("max_prompt_length", 0, "max_prompt_length=0 must be >= 1"),
    ("max_teacher_length", -5, "max_teacher_length=-5 must be >= 1"),
])
def test_numeric_config_fields_are_checked_at_construction(tmp_path, field, value, message):
    with pytest.raises(ValueError) as err:
        make_args(tmp_path, **{field: value})
    assert message in str(err.value), err.value


def test_lengths_beyond_the_models_context_window_are_named_before_the_first_step(tmp_path, tokenizer):
    model = build_model(tokenizer, max_position_embeddings=128)
    with pytest.raises(ValueError, match=r"100 \+ max_completion_length=64 = 164 tokens exceeds the model's context "
                                         r"window of 128 \(max_position_embeddings\)"):
        make_trainer(tmp_path, tokenizer, model=model, max_prompt_length=100, max_completion_length=64)
    with pytest.raises(ValueError, match="max_teacher_length=512 exceeds the model's context window of 128"):
        make_trainer(tmp_path, tokenizer, model=model, max_prompt_length=64, max_teacher_length=512)


def test_every_prompt_length_is_checked_before_the_first_step(tmp_path, tokenizer, monkeypatch):
    rows = build_dataset(8).to_list()
    for i in (1, 4, 6):
        rows[i]["prompt"] = [{"role": "user", "content": "What is " + " + ".join(["1"] * (10 + i)) + "?"}]
    monkeypatch.setattr(SelfDistillTrainer, "_make_rollouts", lambda *a: pytest.fail("a step ran"))
    with pytest.raises(ValueError) as err:
        make_trainer(tmp_path, tokenizer, dataset=Dataset.from_list(rows), max_prompt_length=40)
    message = str(err.value)
    assert "train_dataset: 3 of 8 rows (rows 1, 4, 6) have a prompt longer than max_prompt_length=40" in message
    assert "row 6; counted after the chat template). Raise max_prompt_length to" in message, message
    make_trainer(tmp_path, tokenizer, dataset=Dataset.from_list(rows), max_prompt_length=None)  # no limit: fine


def test_a_streamed_dataset_is_checked_as_its_rows_are_read(tmp_path, tokenizer):
    """A stream cannot be read ahead: each row is checked when a step first reads it, with the in-memory message
    and the row's position in the stream; the steps before it train."""
    import re

    for bad, message in [({"solution": None}, "column 'solution', which ReferenceSolution shows the teacher, is empty "
                                              r"or None in 1 of the 2 streamed rows \(row (\d+)\)"),
                         ({"prompt": [{"role": "user", "content": "  "}]},
                          r"train_dataset: 1 of the 2 streamed rows \(row (\d+)\) have an empty prompt"),
                         ({"prompt": [{"role": "user", "content": "What is " + "1 + " * 40 + "1?"}]},
                          r"train_dataset: 1 of the 2 streamed rows \(row (\d+)\) have a prompt longer than "
                          "max_prompt_length=40")]:
        rows = build_dataset(8).to_list()
        rows[5].update(bad)
        trainer = make_trainer(tmp_path, tokenizer, dataset=Dataset.from_list(rows).to_iterable_dataset(),
                               max_steps=4, max_prompt_length=40)
        with pytest.raises(ValueError) as err:
            trainer.train()
        found = re.search(message, str(err.value))
        assert found and "in the order the trainer read them" in str(err.value), err.value
        # the steps before the one reading the bad row trained (2 prompts a step, read in the stream's shuffled order)
        assert trainer.state.global_step == int(found.group(1)) // 2
