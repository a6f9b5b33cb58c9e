"""Recipe validation, the shipped recipes, and a CLI smoke run on a tiny model."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model

from selfdistill.cli import main
from selfdistill.recipes import RecipeError, apply_overrides, list_recipes, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        recipe = load_recipe(path, hardware_checks=False)
        assert recipe.description, f"{path.name} needs a description"
    assert {Path(p).name for p, _ in list_recipes()} >= {p.name for p in recipes}


@pytest.mark.parametrize("raw, message", [
    ({"modle": "x"}, "unknown top-level key 'modle'. Did you mean 'model'"),
    ({"training": {"learning_rat": 1e-5}}, "training.learning_rat. Did you mean 'learning_rate'"),
    ({"training": {"max_steps": "ten"}}, "training.max_steps: expected int, got str"),
    ({"training": {"per_device_train_batch_size": 3, "num_generations": 2}}, "not divisible by num_generations"),
    ({"training": {"teacher_policy": "frozen"}}, "teacher_policy='frozen' is not valid"),
    ({"data": {"n_trian": 5}}, "data.n_trian. Did you mean 'n_train'"),
    ({"eval": {"before": "yes"}}, "eval.before: expected bool"),
    ({"method": "magic"}, "method='magic' is not available"),
    ({"data": {"task": None}}, "give a built-in task"),
    ({"peft": {"r": 8, "lora_alfa": 16}}, "lora_alfa"),
    ({"rewards": [3]}, "rewards: expected a list"),
])
def test_bad_recipes_name_the_fix(raw, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(raw)


def test_overrides_are_dotted_and_typed():
    raw = apply_overrides({"training": {"max_steps": 5}}, ["training.max_steps=7", "training.learning_rate=3e-5",
                                                            "data.n_train=10", "eval.before=false"])
    assert raw == {"training": {"max_steps": 7, "learning_rate": 3e-5}, "data": {"n_train": 10},
                   "eval": {"before": False}}
    with pytest.raises(RecipeError, match="not key=value"):
        apply_overrides({}, ["training.max_steps"])


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    assert main(["check", str(bad)]) == 2


def test_cli_smoke_run_writes_complete_results(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny"
    build_model(tokenizer, max_position_embeddings=1024).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = {
        "description": "smoke",
        "model": str(model_dir),
        "data": {"task": "arithmetic", "n_train": 16, "n_test": 8, "digits": 1},
        "rewards": ["arithmetic"],
        "eval": {"n": 8, "batch_size": 8, "max_new_tokens": 4, "pass_k": 2, "every_steps": 1, "curve_n": 4},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "num_generations": 2, "max_completion_length": 4, "logging_steps": 1, "use_cpu": True,
                     "save_strategy": "no", "disable_tqdm": True},
    }
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ["method", "model", "steps", "rollouts", "generated_tokens", "train_seconds", "wall_seconds",
                "eval_before", "eval_after", "learning_curve"]:
        assert key in results, key
    assert results["steps"] == 2 and results["rollouts"] == 8
    assert 0 <= results["eval_after"]["greedy_accuracy"] <= 1 and "pass@2" in results["eval_after"]
    assert [p["step"] for p in results["learning_curve"]] == [0, 1, 2]
    assert [h["step"] for h in results["train_log"]] == [1, 2] and "completions/mean_length" in results["train_log"][0]
    assert (tmp_path / "out" / "learning_curve.png").exists()
    assert (tmp_path / "out" / "final" / "config.json").exists()
    assert "greedy accuracy" in capsys.readouterr().out

    assert main(["eval", str(path), "--model", str(tmp_path / "out" / "final"), "--no-progress",
                 "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 8


def test_bf16_training_is_evaluated_in_the_weights_own_precision(tmp_path, tokenizer, monkeypatch):
    """bf16 autocast (accelerate wraps the model's forward) speeds training on CPU; the evaluation after training, like
    the one before, must run without that wrapper."""
    import selfdistill.run as run_module

    monkeypatch.setenv("SELFDISTILL_CPU_BF16", "1")  # keep bf16 on a CPU without native bfloat16 too
    model_dir = tmp_path / "tiny"
    build_model(tokenizer, max_position_embeddings=1024).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    wrapped = {}
    real = run_module.evaluate

    def spy(model, *args, desc="eval", **kwargs):
        wrapped[desc] = "_original_forward" in vars(model)  # accelerate's autocast wrapper is on
        return real(model, *args, desc=desc, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", spy)
    monkeypatch.setattr("selfdistill.evaluation.evaluate", spy)
    recipe = {
        "model": str(model_dir),
        "data": {"task": "arithmetic", "n_train": 16, "n_test": 4, "digits": 1},
        "rewards": ["arithmetic"],
        "eval": {"n": 4, "batch_size": 4, "max_new_tokens": 4, "every_steps": 1, "curve_n": 4},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 4,
                     "num_generations": 2, "max_completion_length": 4, "use_cpu": True, "bf16": True,
                     "save_strategy": "no", "disable_tqdm": True},
    }
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--no-progress"]) == 0
    assert wrapped["eval before"] is False and wrapped["eval after"] is False
    assert wrapped["eval"] is True  # the learning curve, during training: the wrapper was there to remove


@pytest.mark.parametrize("native, forced, expected", [(False, False, False), (False, True, True), (True, False, True)])
def test_cpu_bf16_falls_back_to_float32_without_native_bfloat16(monkeypatch, native, forced, expected):
    import selfdistill.recipes as recipes_module

    monkeypatch.setattr(recipes_module, "cpu_has_native_bf16", lambda: native)
    if forced:
        monkeypatch.setenv(recipes_module.CPU_BF16_ENV, "1")
    else:
        monkeypatch.delenv(recipes_module.CPU_BF16_ENV, raising=False)
    recipes_module._warn_cpu_bf16.cache_clear()
    training = {"output_dir": "out", "use_cpu": True, "bf16": True}
    if expected:
        config = recipes_module.build_config(training)
    else:
        with pytest.warns(UserWarning, match="no native bfloat16.*SELFDISTILL_CPU_BF16=1"):
            config = recipes_module.build_config(training)
    assert config.bf16 is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_recipe_on_a_machine_without_one_says_what_to_change():
    from selfdistill.recipes import build_config

    with pytest.raises(RecipeError, match="no GPU is visible.*training.use_cpu=true"):
        build_config({"output_dir": "out", "bf16": True})


def test_a_trl_style_flat_config_parses_with_trls_own_parser(tmp_path):
    """A TRL user's script: TrlParser over SelfDistillConfig with a flat YAML and command-line flags."""
    from trl import TrlParser

    from selfdistill import SelfDistillConfig

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "learning_rate": 3e-5,
                                      "num_generations": 2, "per_device_train_batch_size": 4, "epsilon": 0.3,
                                      "reward_weights": [1.0, 0.5], "teacher_policy": "ema", "use_cpu": True}))
    (args,) = TrlParser((SelfDistillConfig,)).parse_args_and_config(["--config", str(config), "--max_steps", "7"])
    assert isinstance(args, SelfDistillConfig)
    assert (args.learning_rate, args.max_steps, args.epsilon, args.reward_weights, args.teacher_policy) == (
        3e-5, 7, 0.3, [1.0, 0.5], "ema")
    # The same validation as SelfDistillConfig(...) itself.
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "num_generations": 3,
                                      "per_device_train_batch_size": 4, "use_cpu": True}))
    with pytest.raises(ValueError, match="not divisible by num_generations=3"):
        TrlParser((SelfDistillConfig,)).parse_args_and_config(["--config", str(config)])


def test_overrides_may_follow_the_options_and_anything_else_unknown_is_refused(capsys):
    from selfdistill.cli import _parse

    args = _parse(["train", "r.yaml", "training.seed=1", "--no-progress", "training.max_steps=4"])
    assert args.overrides == ["training.seed=1", "training.max_steps=4"] and args.no_progress
    args = _parse(["diagnose", "r.yaml", "--prompts", "8", "training.max_steps=4"])
    assert args.overrides == ["training.max_steps=4"] and args.prompts == 8
    with pytest.raises(SystemExit) as stop:
        _parse(["train", "r.yaml", "--no-progress", "--bogus", "x=1"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # `recipes` takes no overrides
        _parse(["recipes", "training.max_steps=4"])
