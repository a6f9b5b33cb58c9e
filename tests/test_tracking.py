"""report_to: wandb, offline (no key, no network): config, metrics, the sample-rollout table and the heatmaps."""

import json

import pytest
from conftest import build_dataset, build_model

from selfdistill import ReferenceSolution, SelfDistillConfig, SelfDistillTrainer
from selfdistill.tracking import log_rollout_table

wandb = pytest.importorskip("wandb", reason="wandb is a dev extra: pip install -e '.[dev]'")


def test_offline_wandb_run_holds_config_metrics_rollouts_and_heatmaps(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "selfdistill-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = SelfDistillConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             num_generations=2, max_completion_length=6, logging_steps=1, report_to=["wandb"],
                             save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, log_completions=3,
                             heatmap_steps=1, heatmap_samples=2, teacher_policy="ema", run_name="tracking-test")
    trainer = SelfDistillTrainer(model=build_model(tokenizer), args=args, train_dataset=build_dataset(),
                                 processing_class=tokenizer, privileged=ReferenceSolution())
    trainer.train()
    run_dir = wandb.run.dir  # .../offline-run-*/files
    wandb.finish()
    files = tmp_path / "wandb"
    runs = list(files.glob("offline-run-*"))
    assert len(runs) == 1
    # Offline, config, history and summary live in the run's binary log (synced later with `wandb sync`).
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"teacher_policy", b"train/divergence", b"train/teacher/updates", b"divergence_heatmap"):
        assert key in record, key
    tables = sorted((runs[0] / "files" / "media" / "table").glob("rollouts_*.table.json"))
    assert len(tables) == 2  # one per logging step (not with the end-of-training summary)
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward"] and len(table["data"]) == 3
    assert "What is" in table["data"][0][1]
    assert list((runs[0] / "files" / "media" / "html").glob("divergence_heatmap_*.html"))
    assert list((runs[0] / "files" / "media" / "images").glob("divergence_heatmap_png_*.png"))
    assert run_dir.startswith(str(runs[0]))


def test_rollout_table_is_skipped_without_wandb_target():
    assert not log_rollout_table(["tensorboard"], [{"prompt": "p", "completion": "c", "reward": 1.0}], 1)
    assert not log_rollout_table(None, [], 1)
