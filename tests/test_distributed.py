"""Real multi-process runs: two CPU ranks over gloo (DDP, DeepSpeed ZeRO-3), launched as subprocesses.

Each test trains a tiny llama saved to disk with `selfdistill train` semantics (tests/workers/train_recipe.py) and
checks what only several processes can get wrong: every rank holds the same weights and teacher, ranks sample
different prompts, a stateful source sees every rank's rollouts and keeps one state, results.json is complete, and
a checkpoint written by two ranks resumes on one.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "workers" / "train_recipe.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cpu_flag: bool = True) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT / "tests") + os.pathsep + str(ROOT), SELFDISTILL_ALLOW_CODE="workers",
               WORKER_SEED_SKILLS="1")
    # DDP on CPU needs accelerate's CPU mode (else both processes train apart); DeepSpeed needs it off (it would
    # switch DeepSpeed off) and ddp_backend=gloo in the recipe instead.
    if cpu_flag:
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    return env


def _save_tiny_model(folder: Path) -> None:
    tokenizer = build_tokenizer()
    build_model(tokenizer, max_position_embeddings=1024).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _recipe(tmp: Path, model: Path, out: Path, **training) -> Path:
    raw = {
        "method": "opsd",
        "model": str(model),
        "data": {"task": "arithmetic", "n_train": 64, "n_test": 8, "seed": 0},
        "source": {"type": "counting"},
        "rewards": ["arithmetic"],
        "eval": {"before": True, "after": True, "n": 8, "batch_size": 8, "max_new_tokens": 6},
        "training": {
            "output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4, "num_generations": 2,
            "max_completion_length": 6, "learning_rate": 1e-2, "teacher_policy": "ema", "teacher_ema_rate": 0.5,
            "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "seed": 0, "report_to": [],
            "disable_tqdm": True, **training,
        },
    }
    path = tmp / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _launch(args: list[str], timeout: float = 240, cpu_flag: bool = True, fails: bool = False) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=_env(cpu_flag), capture_output=True, text=True, timeout=timeout)
    if (proc.returncode != 0) != fails:
        raise AssertionError(f"launch {'succeeded' if fails else 'failed'} ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def _accelerate(*extra: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *extra]


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _check_two_rank_run(out: Path, ranks: list[dict]) -> dict:
    assert [r["world_size"] for r in ranks] == [2, 2]
    results = json.loads((out / "results.json").read_text())
    for key in ("eval_before", "eval_after", "final_train_metrics", "distributed", "final_model"):
        assert results[key], key
    assert results["steps"] == 3 and results["rollouts"] == 3 * 2 * 4
    assert results["distributed"]["world_size"] == 2 and results["distributed"]["ranks_agree"]
    # Same weights and teacher on both ranks, down to the last bit of a float64 checksum.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["teacher"] == ranks[1]["teacher"] and ranks[0]["teacher"] is not None
    # Each rank sampled its own prompts in every generation round (G=2 copies of 2 prompts per rank and step).
    for step in range(3):
        own = [set(r["prompts"][4 * step : 4 * step + 4]) for r in ranks]
        assert own[0].isdisjoint(own[1]), (step, own)
    # The stateful source observed every rank's rollouts (2 ranks x 4 x 3 steps) and holds one state everywhere.
    assert ranks[0]["source_state"] == ranks[1]["source_state"]
    assert ranks[0]["source_state"]["seen"] == 24
    # Metrics are reduced over ranks at log time: the logged divergence of each step is the token-weighted mean
    # over both ranks' tokens, not rank 0's own mean (which differs: other prompts).
    logged = [h for h in ranks[0]["log_history"] if "loss" in h]
    train_calls = [c for c in ranks[0]["reduced"] if "divergence" in c["local"]][: len(logged)]
    assert len(train_calls) == 3
    for step, (log, call0, call1) in enumerate(zip(logged, train_calls, ranks[1]["reduced"])):
        (t0, w0), (t1, w1) = call0["local"]["divergence"], call1["local"]["divergence"]
        assert log["divergence"] == pytest.approx((t0 + t1) / (w0 + w1), rel=1e-9), step
        assert t0 / w0 != pytest.approx(t1 / w1)
        # Extremes are over both ranks' rollouts.
        for key, pick in (("completions/min_length|min", min), ("completions/max_length|max", max)):
            assert call0["global"][key][0] == pick(call0["local"][key][0], call1["local"][key][0]), (step, key)
    # num_tokens counts both ranks' prompt and completion tokens, cumulatively.
    counts = [h["num_tokens"] for h in logged]
    assert counts == sorted(counts) and counts[0] > 0
    return results


def test_two_rank_ddp_run_then_resume_on_one_rank(tmp_path):
    model = tmp_path / "model"
    _save_tiny_model(model)
    out = tmp_path / "ddp"
    _launch(_accelerate("--multi_gpu", str(WORKER), str(_recipe(tmp_path, model, out))))
    ranks = _ranks(out)
    results = _check_two_rank_run(out, ranks)
    assert results["distributed"]["distributed_type"] == "MULTI_CPU"
    _check_teacher_probe(ranks, partitioned=False)
    checkpoint = out / "checkpoint-2"
    teacher = torch.load(checkpoint / "teacher_state.pt", weights_only=True)
    assert set(teacher) == {n for n, _ in build_model(build_tokenizer()).named_parameters()}
    assert json.loads((checkpoint / "privileged_source.json").read_text())["seen"] == 16

    # A checkpoint written by 2 ranks resumes in 1 process: it continues at step 3 with the saved teacher.
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    recipe = _recipe(tmp_path, model, resumed, resume_from_checkpoint=str(resumed / "checkpoint-2"))
    _launch([sys.executable, str(WORKER), str(recipe), "eval.before=false", "eval.after=false"])
    single = json.loads((resumed / "rank0.json").read_text())
    assert single["world_size"] == 1 and single["steps"] == 3
    assert single["logged_steps"] == [1, 2, 3]  # steps 1-2 come from the checkpoint's log history
    # The whole run's rollouts: 16 from the two ranks' steps 1-2 (recorded in the checkpoint) and 4 from step 3 here
    assert single["rollouts_generated"] == 20
    assert single["source_state"]["seen"] == 4


def _check_teacher_probe(ranks: list[dict], partitioned: bool) -> None:
    for rank in ranks:
        probe = rank["probe"]
        # The teacher pass computes with exactly the (gathered) teacher state, the student with its own weights.
        assert probe["teacher_matches_state"] and probe["student_matches_weights"], probe
        assert probe["teacher_differs"], probe
        # The student's logits right after each teacher pass equal those right before it. Under ZeRO-3 this fails
        # (by ~2e-3 from step 2 on) when the gathered parameters are not released around the swap: DeepSpeed keeps
        # the teacher's gathered weights for the student's next forward.
        assert len(rank["leak"]) == 3 and max(rank["leak"]) == 0.0, rank["leak"]
        if partitioned:  # each rank keeps its ZeRO-3 partition of the teacher, not a full copy
            assert probe["teacher_local_fraction"] < 0.75, probe
        else:
            assert probe["teacher_local_fraction"] == 1.0, probe


def test_two_rank_deepspeed_zero3_run(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is a dev extra: pip install -e '.[dev]'")
    model = tmp_path / "model"
    _save_tiny_model(model)
    # Persistence threshold 100: the matrices are partitioned, the 16-element norms stay whole (both paths run).
    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    }))
    out = tmp_path / "zero3"
    recipe = _recipe(tmp_path, model, out, ddp_backend="gloo")
    # The first run on a machine compiles DeepSpeed's CPU comm op (~35 s, cached in ~/.cache/torch_extensions).
    _launch(_accelerate("--use_deepspeed", "--deepspeed_config_file", str(ds_config), str(WORKER), str(recipe)),
            timeout=420, cpu_flag=False)
    ranks = _ranks(out)
    results = _check_two_rank_run(out, ranks)
    assert results["distributed"]["distributed_type"] == "DEEPSPEED" and results["distributed"]["zero_stage"] == 3
    _check_teacher_probe(ranks, partitioned=True)
    # The checkpoint's teacher state is full (gathered from the partitions), so it loads on any number of ranks.
    teacher = torch.load(out / "checkpoint-2" / "teacher_state.pt", weights_only=True)
    shapes = {n: p.shape for n, p in build_model(build_tokenizer()).named_parameters()}
    assert {n: t.shape for n, t in teacher.items()} == shapes
    assert (out / "final" / "model.safetensors").exists()  # saved gathered (stage3_gather_16bit_weights_on_model_save)

    # Resumed on one process under DeepSpeed: refused before any state loads, with the two ways out.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    recipe = _recipe(tmp_path, model, resumed, ddp_backend="gloo", resume_from_checkpoint=str(resumed / "checkpoint-2"))
    log = _launch(_accelerate("--use_deepspeed", "--deepspeed_config_file", str(ds_config), str(WORKER), str(recipe),
                              "eval.before=false", processes=1), timeout=300, cpu_flag=False, fails=True)
    assert "CheckpointMismatch" in log and "written by DeepSpeed ZeRO-3 on 2 processes and this run has 1" in log, log
    assert "--num_processes 2" in log and "zero_to_fp32.py" in log


def test_skill_credits_come_from_every_rank_under_ddp(tmp_path):
    model = tmp_path / "model"
    _save_tiny_model(model)
    out = tmp_path / "skills"
    raw = yaml.safe_load(_recipe(tmp_path, model, out).read_text())
    raw.update(method="skillsd", env={"type": "guess_number", "low": 1, "high": 4, "max_turns": 2},
               source={"type": "skills", "summaries_per_step": 0, "max_per_task": 8},
               rewards=["workers.kill_resume.parity_reward"], data={"n_train": 32, "n_test": 4, "seed": 0},
               eval={"before": False, "after": False})
    raw["training"].update(max_completion_length=4, max_turns=2, support="sampled", clip="none", grpo_weight=0.5,
                           teacher_policy="sync", save_strategy="no")
    path = tmp_path / "skills.yaml"
    path.write_text(yaml.safe_dump(raw))
    _launch(_accelerate("--multi_gpu", str(WORKER), str(path)))
    ranks = _ranks(out)
    assert ranks[0]["source_state"] == ranks[1]["source_state"]  # one bank, credits included, on both ranks
    skills = ranks[0]["source_state"]["bank"]["skills"]
    uses = sum(s["uses"] for s in skills)
    # Every rank's credits are in it (rank 1's were lost before: each rank credited its own, then rank 0's state
    # was broadcast).
    assert ranks[0]["credited"] > 0 and ranks[1]["credited"] > 0, [r["credited"] for r in ranks]
    assert uses == ranks[0]["credited"] + ranks[1]["credited"]


def test_two_ranks_read_their_own_slices_of_a_streamed_dataset(tmp_path):
    """A streamed dataset under DDP: each rank's rollouts come in num_generations copies of a prompt, and in every
    step the two ranks train on different prompts (each reads its own slice of the repeated stream)."""
    out = tmp_path / "stream"
    _launch(_accelerate("--multi_gpu", str(ROOT / "tests" / "workers" / "stream_ranks.py"), str(out)))
    ranks = _ranks(out)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [2, 2]
    for step in range(2):
        own = [r["answers"][4 * step : 4 * step + 4] for r in ranks]
        for a in own:  # 2 prompts x 2 copies, adjacent
            assert len(a) == 4 and a[0] == a[1] and a[2] == a[3] and a[0] != a[2]
        assert set(own[0]).isdisjoint(own[1]), (step, own)
