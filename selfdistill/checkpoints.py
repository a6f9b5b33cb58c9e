"""Checkpoints that are written whole or not at all, and what a checkpoint records about the run that wrote it.

SelfDistillTrainer saves transformers' checkpoint plus its own files (the names below) into a staging folder and
publishes the folder with one rename (:func:`publish_checkpoint`); docs/reliability.md has the whole story.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from selfdistill.distributed import zero_stage
from selfdistill.export import follow_umask, write_model_card

logger = logging.getLogger(__name__)

TEACHER_STATE = "teacher_state.pt"
SOURCE_STATE = "privileged_source.json"
CHECKPOINT_INFO = "selfdistill_checkpoint.json"  # world size and ZeRO stage of the run that wrote it
BUFFER_STATE = "rollout_buffer_rank{}.pt"  # rollouts the next steps still train on, when a checkpoint falls mid-reuse
STAGING_DIR = ".partial"  # checkpoints being written; never matched by transformers' checkpoint-N pattern


class CheckpointMismatch(RuntimeError):
    """A checkpoint that this run cannot resume (e.g. ZeRO partitions written by another number of processes)."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose files differ from the sizes and checksums recorded when it was written."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(folder: str) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder`` but the record itself, by path relative to it."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != CHECKPOINT_INFO:
                out[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    return out


def damaged_files(checkpoint: str) -> list[str]:
    """The recorded files of a checkpoint that are missing or whose size or checksum changed ([] when all match,
    or when the checkpoint records none: one written before records existed, or by plain transformers)."""
    recorded = checkpoint_info(checkpoint).get("files") or {}
    bad = []
    for rel, record in recorded.items():
        path = os.path.join(checkpoint, rel)
        if not os.path.isfile(path):
            bad.append(f"{rel} (missing)")
        elif os.path.getsize(path) != record["size"]:
            bad.append(f"{rel} ({os.path.getsize(path)} bytes, {record['size']} written)")
        elif _sha256(path) != record["sha256"]:
            bad.append(f"{rel} (checksum differs: bytes changed since it was written)")
    return bad


def checkpoints_in(output_dir: str) -> list[str]:
    """The published checkpoint-N folders of ``output_dir``, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := pattern.match(name))
             and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The newest checkpoint of ``output_dir`` whose files match their records, and the newer ones that did not."""
    skipped = []
    for checkpoint in checkpoints_in(output_dir):
        bad = damaged_files(checkpoint)
        if not bad:
            return checkpoint, skipped
        skipped.append((checkpoint, bad))
    return None, skipped


def verify_checkpoint(checkpoint: str) -> None:
    """Raise :class:`CheckpointDamaged` naming the damaged files and the newest older checkpoint that is whole."""
    bad = damaged_files(checkpoint)
    if not bad:
        return
    parent = os.path.dirname(os.path.normpath(checkpoint))
    # newest first, and only until one is whole: each check hashes a checkpoint's files
    older = next((c for c in checkpoints_in(parent) if _step(c) < _step(checkpoint) and not damaged_files(c)), None)
    fallback = (f"resume from {older}, the newest complete one (training.resume_from_checkpoint={older})"
                if older else "no older complete checkpoint exists there: start afresh")
    raise CheckpointDamaged(
        f"checkpoint {checkpoint} is damaged: {'; '.join(bad)}. Its files no longer match what was written "
        f"(a truncated copy, a full disk, a bit flip); {fallback}."
    )


def _step(checkpoint: str) -> int:
    match = re.search(r"(\d+)$", os.path.normpath(checkpoint))
    return int(match.group(1)) if match else -1


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


class CheckpointMixin:
    """SelfDistillTrainer's checkpoints: written whole (staged, then renamed into place), with the teacher copy, the
    source state, the rollouts still in use and who wrote them; refused on resume when they cannot be read back. Mixed
    in before ``transformers.Trainer``, whose methods it extends through ``super()``."""

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N whole or not at all. Every file (transformers' own, the teacher copy, the source state)
        goes to ``<output_dir>/.partial/checkpoint-N`` first; the folder is renamed into place once complete, and only
        then are old checkpoints rotated out. A crash or kill mid-save leaves the previous checkpoint as the last.
        """
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staged):  # a save of this step that a crash cut short
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root  # _get_output_dir answers it while transformers writes its files
        try:
            super()._save_checkpoint(model, trial)
            self._point_best_at_published(run_dir, staged)
            # Full teacher tensors, whatever the number of ranks (under ZeRO-3 a collective: every rank takes part).
            state = {}
            if self.teacher.keeps_copy and (self.args.should_save or self._zero3):
                state = self.teacher.state_dict(self.accelerator.unwrap_model(self.model))
            if self.args.should_save:
                if state:
                    torch.save(state, os.path.join(staged, TEACHER_STATE))
                with open(os.path.join(staged, SOURCE_STATE), "w") as f:
                    json.dump(self.privileged.state_dict(), f, indent=1)
            every = self.args.steps_per_generation * self.args.num_iterations
            if self._buffered is not None and self._step is not None and self._step % every:
                # Rollouts the next step(s) still train on (steps_per_generation or num_iterations > 1): without them
                # a resumed run would sample new ones and part from the uninterrupted run. One file per rank.
                os.makedirs(staged, exist_ok=True)
                torch.save(self._buffered, os.path.join(staged, BUFFER_STATE.format(self.accelerator.process_index)))
            self.accelerator.wait_for_everyone()  # every rank's files are in the folder before they are recorded
            if self.args.should_save:
                # The card goes with the weights and names the folder they will be published as.
                write_model_card(self, staged, model_ref=final)
                with open(os.path.join(staged, CHECKPOINT_INFO), "w") as f:
                    json.dump({"world_size": self.accelerator.num_processes, "deepspeed": self.is_deepspeed_enabled,
                               "zero_stage": zero_stage(self.accelerator), "step": self.state.global_step,
                               # the whole run's counts so far, so a resumed run's totals cover all of it
                               "rollouts": self.rollouts_generated * self.accelerator.num_processes,
                               "generated_tokens": self.tokens_generated * self.accelerator.num_processes,
                               "files": file_records(staged)}, f, indent=1)
                follow_umask(staged)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staged, final)
            logger.info("saved %s", final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _point_best_at_published(self, run_dir: str, staged: str) -> None:
        """transformers names the best checkpoint (load_best_model_at_end, metric_for_best_model) in the folder it
        saves into, the staging one here: point it at the published checkpoint-N instead, in the state and in the
        staged trainer_state.json, whether the best step is this one or an earlier one."""
        best_step = self.state.best_global_step
        if not best_step:
            return
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best
            if self.args.should_save and os.path.isdir(staged):
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, output_dir: str | None = None) -> None:
        """A README.md model card in ``output_dir`` (default args.output_dir); see selfdistill.export. Written with
        every checkpoint, with the final model, and on push_to_hub."""
        if self.is_world_process_zero():
            write_model_card(self, output_dir or self.args.output_dir, model_name, dataset_name, tags)

    def _get_output_dir(self, trial):
        return getattr(self, "_staging_root", None) or super()._get_output_dir(trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint:
            self._check_resumable(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_resumable(self, checkpoint: str | bool) -> None:
        """Refuse, before any state loads, a DeepSpeed checkpoint whose partitions were written by another number of
        processes: ZeRO shards optimizer state (and, at stage 3, weights) per rank, so it cannot be read back on M."""
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if checkpoint is None:
                return  # transformers names the problem: no checkpoint in output_dir
        verify_checkpoint(str(checkpoint))
        info = checkpoint_info(str(checkpoint))
        saved, now = info.get("world_size"), self.accelerator.num_processes
        if info.get("deepspeed") and self.is_deepspeed_enabled and info.get("zero_stage", 0) > 0 and saved != now:
            raise CheckpointMismatch(
                f"{checkpoint} was written by DeepSpeed ZeRO-{info['zero_stage']} on {saved} processes and this run "
                f"has {now}: ZeRO partitions the optimizer state per process, so it cannot be resumed on {now}. "
                f"Resume with `accelerate launch --num_processes {saved} ...`, or turn the checkpoint into full "
                f"weights with DeepSpeed's zero_to_fp32.py (`python {checkpoint}/zero_to_fp32.py {checkpoint} OUT`) "
                "and start a new run from them (`model: OUT`)."
            )

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """transformers' warnings, less the tied weights: a checkpoint stores a tied output head once, under the
        embedding's name, so ``lm_head.weight`` is "missing" on every resume of a tied model (SmolLM2, Qwen) although
        the embedding it shares its tensor with was loaded. A key missing for any other reason still warns."""
        missing = list(getattr(load_result, "missing_keys", []) or [])
        if missing:
            by_tensor: dict[int, list[str]] = {}
            for name, param in self.model.named_parameters(remove_duplicate=False):
                by_tensor.setdefault(id(param), []).append(name)
            gone = set(missing)
            tied_and_loaded = {name for names in by_tensor.values() if any(n not in gone for n in names)
                               for name in names if name in gone}
            load_result = type(load_result)([k for k in missing if k not in tied_and_loaded],
                                            list(load_result.unexpected_keys))
        super()._issue_warnings_after_load(load_result)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # transformers calls this once per resume for every engine (plain, DDP, DeepSpeed, FSDP), after the model is
        # restored and prepared; _load_from_checkpoint is skipped under DeepSpeed, so the extra state loads here.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_selfdistill_state(checkpoint)

    def _load_selfdistill_state(self, resume_from_checkpoint: str) -> None:
        """Teacher copy and privileged-source state; both are full (rank-independent), so N ranks resume on M."""
        teacher_file = os.path.join(resume_from_checkpoint, TEACHER_STATE)
        if self.teacher.keeps_copy:
            if not os.path.exists(teacher_file):
                raise FileNotFoundError(
                    f"{teacher_file} is missing: the checkpoint has no teacher state for teacher_policy="
                    f"{self.args.teacher_policy!r}; resume from a checkpoint written by SelfDistillTrainer"
                )
            self.teacher.load_state_dict(torch.load(teacher_file, map_location="cpu", weights_only=True),
                                         self.accelerator.unwrap_model(self.model))
        info = checkpoint_info(resume_from_checkpoint)
        ranks = self.accelerator.num_processes
        self.rollouts_generated = int(info.get("rollouts", 0)) // ranks
        self.tokens_generated = int(info.get("generated_tokens", 0)) // ranks
        source_file = os.path.join(resume_from_checkpoint, SOURCE_STATE)
        if os.path.exists(source_file):
            with open(source_file) as f:
                self.privileged.load_state_dict(json.load(f))
        self._buffered = None
        buffer_file = os.path.join(resume_from_checkpoint, BUFFER_STATE.format(self.accelerator.process_index))
        if os.path.exists(buffer_file):
            saved_world = checkpoint_info(resume_from_checkpoint).get("world_size")
            if saved_world in (None, self.accelerator.num_processes):
                self._buffered = torch.load(buffer_file, map_location="cpu", weights_only=True)
            else:
                logger.warning(f"{resume_from_checkpoint} holds rollouts buffered on {saved_world} ranks; this run "
                               f"has {self.accelerator.num_processes}, so the next step samples new ones")
