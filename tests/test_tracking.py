"""report_to: wandb, offline (no key, no network): config, metrics, the sample-rollout table and the heatmaps."""

import json
from pathlib import Path

import pytest
from conftest import build_dataset, build_model

from selfdistill import ReferenceSolution, SelfDistillConfig, SelfDistillTrainer
from selfdistill.tracking import log_rollout_table

wandb = pytest.importorskip("wandb", reason="wandb is a dev extra: pip install -e '.[dev]'")


def test_offline_wandb_run_holds_config_metrics_rollouts_and_heatmaps(tmp_path, tokenizer, monkeypatch):
    if wandb.run is not None:  # a run left open elsewhere in this process would receive our logs
        wandb.finish()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "selfdistill-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = SelfDistillConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             num_generations=2, max_completion_length=6, logging_steps=1, report_to=["wandb"],
                             save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                             log_completions=True, num_completions_to_print=3,
                             heatmap_steps=1, heatmap_samples=2, teacher_policy="ema", run_name="tracking-test")
    trainer = SelfDistillTrainer(model=build_model(tokenizer), args=args, train_dataset=build_dataset(),
                                 processing_class=tokenizer, privileged=ReferenceSolution())
    trainer.train()
    run = wandb.run
    # wandb keeps the first WANDB_DIR of a process for later runs, so the run folder is read from the run itself.
    files = Path(run.dir)  # .../offline-run-*/files
    assert files.parent.name.startswith("offline-run-")
    # What the run holds (offline, its binary log is written by wandb's service process, asynchronously).
    assert run.config["teacher_policy"] == "ema" and run.config["heatmap_steps"] == 1
    assert run.summary["train/divergence"] >= 0 and run.summary["train/teacher/updates"] == 1
    wandb.finish()
    tables = sorted((files / "media" / "table").glob("rollouts_*.table.json"))
    assert len(tables) == 2  # one per logging step (not with the end-of-training summary)
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward"] and len(table["data"]) == 3
    assert "What is" in table["data"][0][1]
    assert list((files / "media" / "html").glob("divergence_heatmap_*.html"))
    assert list((files / "media" / "images").glob("divergence_heatmap_png_*.png"))


def test_rollout_table_is_skipped_without_wandb_target():
    assert not log_rollout_table(["tensorboard"], [{"prompt": "p", "completion": "c", "reward": 1.0}], 1)
    assert not log_rollout_table(None, [], 1)
