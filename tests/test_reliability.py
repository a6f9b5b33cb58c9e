"""Crashes and restarts lose nothing: kill -9 and resume, a crash mid-save, the same seed giving the same run.

The kill test runs real subprocesses (tests/workers/kill_resume.py) and really kills them with SIGKILL at a step drawn
at random, then resumes them in a new process and compares the end state with an uninterrupted run of the same
configuration: every teacher policy, with and without LoRA, and Skill-SD with its skill bank and credits.
"""

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_trainer import make_trainer, params

import selfdistill.trainer as trainer_module
from selfdistill.checkpoints import BUFFER_STATE, CHECKPOINT_INFO, STAGING_DIR

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "workers" / "kill_resume.py"
SCENARIOS = ("live", "initial", "ema", "sync", "lora-live", "lora-initial", "lora-ema", "lora-sync", "skillsd")
STEPS = 6  # as in the worker
TOLERANCE = 1e-6


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT / "tests") + os.pathsep + str(ROOT))
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _launch(root: Path, *args: str) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"worker-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(root), *args], stdout=f, stderr=subprocess.STDOUT,
                                env=_env(), cwd=ROOT)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    code = proc.wait(timeout=timeout)
    if code:
        raise AssertionError(f"worker {proc.args[3:]} exited {code}; log: {proc.log.read_text()[-3000:]}")


def _kill_each_after(procs: dict[str, subprocess.Popen], checkpoints: dict[str, Path], timeout: float = 300) -> None:
    """SIGKILL each process as soon as its checkpoint has been published (checkpoints appear whole: see the
    trainer), watching all of them at once."""
    deadline = time.monotonic() + timeout
    waiting = dict(procs)
    while waiting:
        for name, proc in list(waiting.items()):
            if checkpoints[name].exists():
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL, f"{name} finished before the kill"
                del waiting[name]
            elif proc.poll() is not None:
                raise AssertionError(f"{name} ended (exit {proc.returncode}) before {checkpoints[name].name}: "
                                     f"{proc.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            for proc in waiting.values():
                proc.kill()
            raise AssertionError(f"checkpoints never appeared for {', '.join(waiting)}")
        time.sleep(0.01)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[n].double() - b[n].double()).abs().max()) for n in a), default=0.0)


def test_kill_9_at_a_random_step_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    rng = random.Random()  # a new draw every run; the steps drawn are in the report and in any failure message
    kill_at = {scenario: rng.randint(1, STEPS - 2) for scenario in SCENARIOS}
    die_in_save = rng.randint(2, STEPS - 1)
    straight = _launch(tmp_path / "straight", *SCENARIOS)
    killed = {s: _launch(tmp_path / "killed", s, "--step-delay", "0.5") for s in SCENARIOS}
    # One more: killed inside the save of a checkpoint (model written, optimizer not), by itself.
    died = _launch(tmp_path / "died", "ema", "--die-in-save", str(die_in_save))
    _kill_each_after(killed, {s: tmp_path / "killed" / s / f"checkpoint-{kill_at[s]}" for s in SCENARIOS})
    assert died.wait(timeout=600) == -signal.SIGKILL
    died_dir = tmp_path / "died" / "ema"
    assert not (died_dir / f"checkpoint-{die_in_save}").exists(), "a half-written checkpoint was published"
    assert (died_dir / STAGING_DIR / f"checkpoint-{die_in_save}").exists()
    assert (died_dir / f"checkpoint-{die_in_save - 1}" / CHECKPOINT_INFO).exists()

    resumed = [_launch(tmp_path / "killed", *SCENARIOS, "--resume"), _launch(tmp_path / "died", "ema", "--resume")]
    for proc in (straight, *resumed):
        _finish(proc)

    report = {}
    for scenario, root in [*((s, "killed") for s in SCENARIOS), ("ema (killed mid-save)", "died")]:
        name = scenario.split(" ")[0]
        ref = torch.load(tmp_path / "straight" / name / "final.pt", weights_only=True)
        got = torch.load(tmp_path / root / name / "final.pt", weights_only=True)
        report[scenario] = {
            "killed after step": kill_at.get(scenario, die_in_save - 1),
            "weights": _max_diff(ref["params"], got["params"]),
            "teacher": _max_diff(ref["teacher"], got["teacher"]),
            "losses": max(abs(a - b) for a, b in zip(ref["losses"], got["losses"], strict=True)),
        }
        assert got["step"] == ref["step"] == STEPS
        assert got["source"] == ref["source"], f"{scenario}: source state differs after resume"
        if scenario == "skillsd":
            skills = ref["source"]["bank"]["skills"]
            assert skills and any(s["uses"] for s in skills), "the test needs credited skills to compare"
    print("\nmax |difference| resumed vs uninterrupted:\n" + json.dumps(report, indent=1))
    for scenario, diffs in report.items():
        for key in ("weights", "teacher", "losses"):
            assert diffs[key] <= TOLERANCE, f"{scenario} ({diffs['killed after step']=}): {key} differ by {diffs[key]}"


def test_a_crash_while_saving_leaves_the_previous_checkpoint_to_resume_from(tmp_path, tokenizer, monkeypatch):
    common = dict(max_steps=5, save_strategy="steps", save_steps=1, save_total_limit=1, teacher_policy="ema",
                  teacher_ema_rate=0.5)
    straight = make_trainer(tmp_path / "a", tokenizer, **common)
    straight.train()

    crashing = make_trainer(tmp_path / "b", tokenizer, **common)
    real_save = torch.save

    def save_then_crash(obj, path, *args, **kwargs):
        if crashing.state.global_step == 3 and str(path).endswith("teacher_state.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        crashing.train()
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    out = Path(crashing.args.output_dir)
    # save_total_limit=1 did not delete checkpoint-2 for a checkpoint-3 that never completed.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / STAGING_DIR / "checkpoint-3").exists()

    resumed = make_trainer(tmp_path / "b", tokenizer, **common)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 5
    assert not (out / STAGING_DIR).exists()
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, rtol=0, atol=TOLERANCE)


def test_resuming_between_two_iterations_on_one_batch_reuses_its_rollouts(tmp_path, tokenizer):
    common = dict(max_steps=4, save_strategy="steps", save_steps=1, num_iterations=2, ratio_clip=2.0,
                  teacher_policy="live")
    straight = make_trainer(tmp_path / "a", tokenizer, **common)
    straight.train()
    checkpoint = Path(straight.args.output_dir) / "checkpoint-3"
    # Step 3 trained on the first use of a batch that step 4 uses again: the checkpoint carries it.
    assert (checkpoint / BUFFER_STATE.format(0)).exists()
    assert not (Path(straight.args.output_dir) / "checkpoint-4" / BUFFER_STATE.format(0)).exists()

    resumed = make_trainer(tmp_path / "b", tokenizer, **common)
    calls = []
    original = resumed._make_rollouts
    resumed._make_rollouts = lambda *a, **k: calls.append(1) or original(*a, **k)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not calls, "the resumed run sampled new rollouts instead of reusing the saved ones"
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, rtol=0, atol=TOLERANCE)


def test_the_same_seed_gives_the_same_run(tmp_path, tokenizer):
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tmp_path / name, tokenizer, max_steps=4, teacher_policy="ema", teacher_ema_rate=0.5)
        trainer.train()
        runs.append((trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]))
    (first, first_losses), (second, second_losses) = runs
    assert first_losses == second_losses and len(first_losses) == 4
    for name, value in params(first.model).items():
        assert torch.equal(params(second.model)[name], value), name
    for name, value in first.teacher.params.items():
        assert torch.equal(second.teacher.params[name], value), name
    # and a different seed does give a different run (the test can fail)
    other = make_trainer(tmp_path / "c", tokenizer, max_steps=4, teacher_policy="ema", teacher_ema_rate=0.5, seed=1)
    other.train()
    assert [h["loss"] for h in other.state.log_history if "loss" in h] != first_losses


def test_resuming_in_a_later_epoch_draws_that_epochs_prompts(tmp_path, tokenizer):
    # 8 prompts x 2 generations in batches of 4 rollouts: 4 steps an epoch, so checkpoint-5 lies in the second epoch.
    common = dict(max_steps=6, save_strategy="steps", save_steps=1)
    straight = make_trainer(tmp_path / "a", tokenizer, **common)
    seen = []
    original = straight._make_rollouts
    straight._make_rollouts = lambda rows, *a: seen.append([r["answer"] for r in rows]) or original(rows, *a)
    straight.train()
    assert seen[4:] != seen[:2]  # the second epoch is shuffled anew

    resumed = make_trainer(tmp_path / "b", tokenizer, **common)
    again = []
    original = resumed._make_rollouts
    resumed._make_rollouts = lambda rows, *a: again.append([r["answer"] for r in rows]) or original(rows, *a)
    resumed.train(resume_from_checkpoint=str(Path(straight.args.output_dir) / "checkpoint-5"))
    assert again == seen[5:], "the resumed run trained on other prompts than the uninterrupted one"
    for name, value in params(straight.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("greater_is_better", [False, True])
def test_the_best_checkpoint_is_the_published_one(tmp_path, tokenizer, greater_is_better):
    """load_best_model_at_end with staged saves: transformers names the best checkpoint in the folder it saves into
    (the staging one); it must name the published checkpoint-N, whether the best step is the last or an earlier one,
    keep it through save_total_limit, and load it at the end (before the fix: FileNotFoundError on .partial/).
    The eval loss rises in some steps and falls in others, so across the two directions the best is an earlier
    step at least once."""
    from conftest import build_dataset, build_model
    from test_trainer import exact_reward, make_args

    from selfdistill import ReferenceSolution, SelfDistillTrainer

    trainer = SelfDistillTrainer(
        model=build_model(tokenizer),
        args=make_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                       save_steps=1, save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="loss",
                       greater_is_better=greater_is_better, per_device_eval_batch_size=4),
        train_dataset=build_dataset(), eval_dataset=build_dataset(4), processing_class=tokenizer,
        privileged=ReferenceSolution(column="solution"), reward_funcs=[exact_reward],
    )
    trainer.train()
    out = Path(trainer.args.output_dir)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    best_step = 1 + (evals.index(max(evals)) if greater_is_better else evals.index(min(evals)))
    assert trainer.state.best_global_step == best_step
    best = out / f"checkpoint-{best_step}"
    assert trainer.state.best_model_checkpoint == str(best) and best.is_dir()
    assert not (out / STAGING_DIR).exists()
    # The last checkpoint's own state names the published best too (a resumed run reads it from there).
    last = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert last["best_model_checkpoint"] == str(best)
    kept = {best.name, "checkpoint-4"} if best_step != 4 else {"checkpoint-3", "checkpoint-4"}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(kept)
    assert best_step < 4 or not greater_is_better


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_named_with_the_previous_complete_one(tmp_path, tokenizer, damage):
    from test_trainer import make_trainer

    from selfdistill.checkpoints import CheckpointDamaged, checkpoint_info, last_complete_checkpoint

    trainer = make_trainer(tmp_path, tokenizer, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    out = tmp_path / "out"
    recorded = checkpoint_info(str(out / "checkpoint-2"))["files"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(recorded)
    assert last_complete_checkpoint(str(out)) == (str(out / "checkpoint-2"), [])
    weights = out / "checkpoint-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:  # the same size, one byte changed
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    fresh = make_trainer(tmp_path, tokenizer, max_steps=3, save_strategy="steps", save_steps=1)
    with pytest.raises(CheckpointDamaged, match=r"model\.safetensors.*checkpoint-1") as err:
        fresh.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert ("bytes" in str(err.value)) if damage == "truncate" else ("checksum" in str(err.value))
    last, skipped = last_complete_checkpoint(str(out))
    assert last == str(out / "checkpoint-1") and skipped[0][0] == str(out / "checkpoint-2")
    with pytest.raises(CheckpointDamaged):  # resume_from_checkpoint=True takes the last one, checked the same way
        make_trainer(tmp_path, tokenizer, max_steps=3).train(resume_from_checkpoint=True)


def _tiny_recipe(tmp_path, tokenizer, steps=200):
    import yaml
    from conftest import build_model

    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        build_model(tokenizer, max_position_embeddings=1024).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    recipe = {
        "model": str(model_dir), "method": "opsd",
        "data": {"task": "arithmetic", "n_train": 64, "n_test": 4, "digits": 1},
        "source": {"type": "reference", "column": "solution"}, "rewards": ["arithmetic"],
        "eval": {"before": False, "after": False},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": steps, "per_device_train_batch_size": 2,
                     "num_generations": 1, "max_completion_length": 4, "use_cpu": True, "save_strategy": "steps",
                     "save_steps": 1, "logging_steps": 1, "disable_tqdm": True, "report_to": "none"},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_run_in_one_line_and_the_rerun_resumes(tmp_path, tokenizer, sig, code):
    recipe = _tiny_recipe(tmp_path, tokenizer)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "selfdistill", "train", str(recipe), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "checkpoint-2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("selfdistill: stopped at step")]
    assert len(line) == 1 and "last complete checkpoint" in line[0] and f"selfdistill train {recipe}" in line[0]
    # a checkpoint cut short stays in .partial; every published one is whole
    from selfdistill.checkpoints import damaged_files

    assert all(not damaged_files(str(p)) for p in out.glob("checkpoint-*"))
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    # rerunning the same command resumes from the last complete checkpoint and says so
    done = subprocess.run([*cmd[:4], str(recipe), f"training.max_steps={last + 1}", "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {out / f'checkpoint-{last}'} (step {last})" in done.stderr
    assert (out / f"checkpoint-{last + 1}").exists()


def test_restart_moves_checkpoints_aside_and_a_damaged_last_one_is_skipped(tmp_path, tokenizer):
    recipe = _tiny_recipe(tmp_path, tokenizer, steps=2)
    out = tmp_path / "out"
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    first = run([sys.executable, "-m", "selfdistill", "train", str(recipe), "--no-progress"])
    assert first.returncode == 0, first.stderr[-2000:]
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    again = run([sys.executable, "-m", "selfdistill", "train", str(recipe), "training.max_steps=3", "--no-progress"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipping damaged checkpoint" in again.stderr and "model.safetensors" in again.stderr
    assert f"resuming from {out / 'checkpoint-1'} (step 1)" in again.stderr
    fresh = run([sys.executable, "-m", "selfdistill", "train", str(recipe), "--restart", "--no-progress"])
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "--restart: moved" in fresh.stderr and "resuming" not in fresh.stderr
    [aside] = list(out.glob("restarted-*"))
    assert (aside / "checkpoint-1").exists() and (out / "checkpoint-2").exists()
    none = run([sys.executable, "-m", "selfdistill", "train", str(recipe), "training.resume_from_checkpoint=true",
                f"training.output_dir={tmp_path / 'empty'}"])
    assert none.returncode == 2 and "holds no checkpoint yet" in none.stderr and "Traceback" not in none.stderr


def test_a_resumed_run_counts_the_rollouts_and_tokens_of_the_whole_run(tmp_path, tokenizer):
    whole = make_trainer(tmp_path / "whole", tokenizer, max_steps=3)
    whole.train()
    first = make_trainer(tmp_path / "cut", tokenizer, max_steps=3, save_strategy="steps", save_steps=1)
    first.train()
    resumed = make_trainer(tmp_path / "cut", tokenizer, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    assert resumed.rollouts_generated == whole.rollouts_generated == 3 * whole.args.per_device_train_batch_size
    assert resumed.tokens_generated == whole.tokens_generated


def test_a_run_is_quiet_by_default(tmp_path, tokenizer):
    """No warning from a library the run does not use (DeepSpeed's accelerator detection, reached through accelerate),
    no deprecated call of ours or of the TRL helpers we call (activation checkpointing's old names), through the
    SRT stage's SFT trainer too; one line per save."""
    import yaml

    path = _tiny_recipe(tmp_path, tokenizer, steps=2)
    (tmp_path / "lenient.py").write_text("def every_other(prompts, completions, **kw):\n"
                                         "    return [float(i % 2) for i in range(len(completions))]\n")
    recipe = yaml.safe_load(path.read_text())
    recipe.update(method="sdzero", rewards=["lenient.every_other"], source={"type": "reviser"},
                  srt={"prompts": 4, "revisions": 1, "max_new_tokens": 4, "epochs": 1, "train_batch_size": 2,
                       "keep_truncated": True})
    recipe["training"].update(per_device_train_batch_size=2, num_generations=2)
    del recipe["training"]["disable_tqdm"]  # as in the shipped recipes: --no-progress alone hides the trainer's bar
    path.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-m", "selfdistill", "train", str(path), "--no-progress", "--allow-code",
                           "lenient"], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["srt"]["sft_steps"] >= 1  # SFT ran
    noise = [x for x in (done.stderr + done.stdout).splitlines()
             if "Warning" in x or "WARNING" in x or "deprecated" in x]
    assert not noise, "\n".join(noise)
    assert "it/s]" not in done.stderr and "s/it]" not in done.stderr  # --no-progress hides transformers' bars too
    saves = [x for x in done.stderr.splitlines() + done.stdout.splitlines() if "checkpoint-" in x]
    assert len(saves) <= 2, saves  # save_steps=1, max_steps=2: at most one line per save


def test_resuming_a_tied_model_does_not_call_its_output_head_missing(tmp_path, tokenizer, monkeypatch):
    """A checkpoint stores a tied head once, under the embedding's name; transformers' Trainer then warns
    "missing keys ... ['lm_head.weight']" on every resume. The head was restored with the embedding: no warning.
    A key missing for any other reason still warns."""
    import transformers.trainer as hf_trainer
    from conftest import build_model
    from torch.nn.modules.module import _IncompatibleKeys

    common = dict(max_steps=2, save_strategy="steps", save_steps=1)
    make_trainer(tmp_path, tokenizer, model=build_model(tokenizer, tie_word_embeddings=True), **common).train()
    warned = []
    monkeypatch.setattr(hf_trainer.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    resumed = make_trainer(tmp_path, tokenizer, model=build_model(tokenizer, seed=1, tie_word_embeddings=True),
                           **{**common, "max_steps": 3})
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert not [w for w in warned if "missing keys" in w], warned
    assert resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight

    resumed._issue_warnings_after_load(_IncompatibleKeys(["model.norm.weight", "lm_head.weight"], []))
    assert any("['model.norm.weight']" in w for w in warned), warned


def test_a_resumed_run_keeps_its_learning_curve_and_its_evaluation_before_training(tmp_path, tokenizer):
    import yaml

    recipe = _tiny_recipe(tmp_path, tokenizer, steps=2)
    spec = yaml.safe_load(recipe.read_text())
    spec["eval"].update(every_steps=1, curve_n=4, max_new_tokens=4, batch_size=4, before=True)
    recipe.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    cmd = [sys.executable, "-m", "selfdistill", "train", str(recipe), "--no-progress"]
    first = run(cmd)
    assert first.returncode == 0, first.stderr[-2000:]
    curve_file = out / "learning_curve.json"
    saved = json.loads(curve_file.read_text())
    points = saved["points"]
    assert [p["step"] for p in points] == [0, 1, 2]
    # as if the run had measured step 3 and been killed before checkpoint-3 was written
    cut = points + [{**points[-1], "step": 3, "greedy_accuracy": 0.123}]
    curve_file.write_text(json.dumps({**saved, "points": cut}))

    resumed = run([*cmd, "training.max_steps=4"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "[curve] step 2" not in resumed.stdout  # not measured twice
    curve = json.loads((out / "results.json").read_text())["learning_curve"]
    assert [p["step"] for p in curve] == [0, 1, 2, 3, 4]
    assert curve[:3] == points and curve[3]["greedy_accuracy"] != 0.123  # step 3 measured again
    # the evaluation before training is the first run's (same model, rows and settings), not measured again
    assert "measured by the run this one resumes" in resumed.stdout
    before = json.loads((out / "results.json").read_text())["eval_before"]
    assert before["reused_from"] == str(out / "eval_before.json")
    assert {k: v for k, v in before.items() if k != "reused_from"} == json.loads(
        (out / "eval_before.json").read_text())["result"]

    # measured with other settings (here curve_n): not mixed into the resumed run's curve
    other = run([*cmd, "training.max_steps=5", "eval.curve_n=2"])
    assert other.returncode == 0, other.stderr[-2000:]
    assert [p["step"] for p in json.loads((out / "results.json").read_text())["learning_curve"]] == [4, 5]
    assert "measured by the run this one resumes" in other.stdout  # curve_n is not the before-evaluation's setting
    changed = run([*cmd, "training.max_steps=6", "eval.max_new_tokens=3"])
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "measured by the run this one resumes" not in changed.stdout
    assert "reused_from" not in json.loads((out / "results.json").read_text())["eval_before"]

    again = run([*cmd, "training.max_steps=1", "--restart"])
    assert again.returncode == 0, again.stderr[-2000:]
    [aside] = list(out.glob("restarted-*"))
    assert [p["step"] for p in json.loads((aside / "learning_curve.json").read_text())["points"]] == [5, 6]
    assert [p["step"] for p in json.loads(curve_file.read_text())["points"]] == [0, 1]


@pytest.mark.parametrize("command", ["diagnose", "eval"])
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_diagnose_and_eval_in_one_line(monkeypatch, capsys, command, sig, code):
    import selfdistill.premises as premises_module
    import selfdistill.run as run_module
    from selfdistill.cli import main

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), sig)  # the handler raises at once, inside the command
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(premises_module, "diagnose_recipe", interrupted)
    monkeypatch.setattr(run_module, "run_eval", interrupted)
    assert main([command, str(ROOT / "recipes" / "opsd_arithmetic.yaml"), "--no-progress"]) == code
    err = capsys.readouterr().err
    assert f"selfdistill: {command} stopped before its" in err and "nothing was written" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
