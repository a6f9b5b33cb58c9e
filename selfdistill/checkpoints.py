"""Checkpoints that are written whole or not at all, and what a checkpoint records about the run that wrote it.

SelfDistillTrainer saves transformers' checkpoint plus its own files (the names below) into a staging folder and
publishes the folder with one rename (:func:`publish_checkpoint`); docs/reliability.md has the whole story.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

TEACHER_STATE = "teacher_state.pt"
SOURCE_STATE = "privileged_source.json"
CHECKPOINT_INFO = "selfdistill_checkpoint.json"  # world size and ZeRO stage of the run that wrote it
BUFFER_STATE = "rollout_buffer_rank{}.pt"  # rollouts the next steps still train on, when a checkpoint falls mid-reuse
STAGING_DIR = ".partial"  # checkpoints being written; never matched by transformers' checkpoint-N pattern


class CheckpointMismatch(RuntimeError):
    """A checkpoint that this run cannot resume (e.g. ZeRO partitions written by another number of processes)."""


def checkpoint_info(checkpoint: str) -> dict[str, Any]:
    """What the run that wrote a checkpoint recorded about itself; {} for plain transformers' checkpoints."""
    info_file = os.path.join(checkpoint, CHECKPOINT_INFO)
    if not os.path.exists(info_file):
        return {}
    with open(info_file) as f:
        return json.load(f)


def publish_checkpoint(staged: str, final: str) -> None:
    """Move a completely written checkpoint folder into place with one atomic rename (same filesystem). A folder
    already at ``final`` (the same step saved again) is renamed aside first and removed after."""
    _fsync_tree(staged)
    old = None
    if os.path.exists(final):
        old = f"{staged}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # empty now, unless another save is staged
        os.rmdir(os.path.dirname(staged))


def _fsync_tree(folder: str) -> None:
    """Flush every file of ``folder`` to disk, so the rename never publishes data that is still in the page cache."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
