"""Launched by tests/test_distributed.py under accelerate or torchrun: `selfdistill train` on a recipe, plus what
each rank saw, written to <output_dir>/rank<N>.json.

Adds a stateful test source ``counting`` (OPSD's reference source that also remembers every rollout it observed), so
the test can check that every rank observed every rank's rollouts and holds the same state.
"""

import faulthandler
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import selfdistill.tracking as tracking_module
import selfdistill.trainer as trainer_module
from selfdistill.distributed import gathered, leave_process_group, release_zero3, weights_checksum
from selfdistill.recipes import load_recipe
from selfdistill.run import run_train
from selfdistill.sources import SOURCES, ReferenceSolution
from selfdistill.trainer import SelfDistillTrainer


class CountingSource(ReferenceSolution):
    def __init__(self, column: str = "solution"):
        super().__init__(column=column)
        self.seen: list[str] = []

    def observe(self, rollouts):
        self.seen += [r.row["solution"] + "|" + r.completion for r in rollouts]

    def state_dict(self):
        return {"seen": len(self.seen), "digest": hashlib.sha256("\n".join(self.seen).encode()).hexdigest()}

    def load_state_dict(self, state):
        self.loaded = state


SOURCES["counting"] = CountingSource
record: dict = {"prompts": [], "teacher": None}
original = SelfDistillTrainer._make_rollouts


def spy(self, rows, mode, n_micro):
    if mode == "train":
        record["prompts"] += [row["prompt"][-1]["content"] for row in rows]
        bank = getattr(self.privileged, "bank", None)
        if os.environ.get("WORKER_SEED_SKILLS") and bank is not None and not len(bank):
            # Skills in the bank from the first step (the same on every rank), so every rollout's teacher shows some
            # and the feedback credits them.
            for text in ("Guess two first, then move up or down by one.", "Start in the middle and halve the range."):
                bank.add(rows[0]["task"], text, step=0)
    record["trainer"] = self
    return original(self, rows, mode, n_micro)


record["credited"] = 0
source_feedback = trainer_module.source_feedback


def source_feedback_spy(source, inputs, logp_gap, counts, accelerator):
    # Skill credits this rank's own rollouts earn: one per shown skill of a rollout with a non-zero advantage.
    for ids, advantage in zip(inputs.get("view_tags") or [], inputs.get("advantages") or []):
        if ids and advantage:
            record["credited"] += len(list(ids))
    return source_feedback(source, inputs, logp_gap, counts, accelerator)


trainer_module.source_feedback = source_feedback_spy


SelfDistillTrainer._make_rollouts = spy
record["reduced"] = []
record["leak"] = []
teacher_pass = SelfDistillTrainer._teacher_pass
PROBE_IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


@torch.no_grad()
def teacher_pass_spy(self, model, inputs, head):
    # The student's logits right before and right after the teacher pass must be identical: no teacher weights may
    # outlive the pass (under ZeRO-3, gathered copies of the teacher's partitions).
    unwrapped = self.accelerator.unwrap_model(model)
    before = unwrapped(input_ids=PROBE_IDS).logits
    out = teacher_pass(self, model, inputs, head)
    after = unwrapped(input_ids=PROBE_IDS).logits
    record["leak"].append(float((after - before).abs().max()))
    return out


SelfDistillTrainer._teacher_pass = teacher_pass_spy
reduce_original = tracking_module.reduce_metrics


def reduce_spy(accelerator, metrics):
    out = reduce_original(accelerator, metrics)
    record["reduced"].append({"local": dict(metrics), "global": out})
    return out


tracking_module.reduce_metrics = reduce_spy

@torch.no_grad()
def teacher_probe(trainer, model, teacher_state):
    """Logits of the teacher pass (the real swap, ZeRO-3 partitions included) against a plain model loaded with the
    gathered teacher state, and of the student against its gathered weights."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with trainer.teacher.scoring(model, release=release_zero3(trainer.model_wrapped)) as scorer:
        teacher_logits = scorer(input_ids=ids).logits
    student_logits = model(input_ids=ids).logits
    with gathered(model):
        student_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = type(model)(model.config)  # the constructor, not from_config: no zero.Init partitioning
    plain.load_state_dict({**student_state, **teacher_state}, strict=False)
    reference_teacher = plain(input_ids=ids).logits
    plain.load_state_dict(student_state, strict=False)
    reference_student = plain(input_ids=ids).logits
    local = sum(t.numel() for t in trainer.teacher.params.values())
    return {
        "teacher_matches_state": torch.allclose(teacher_logits, reference_teacher, atol=1e-5),
        "student_matches_weights": torch.allclose(student_logits, reference_student, atol=1e-5),
        "teacher_differs": not torch.allclose(teacher_logits, student_logits, atol=1e-4),
        "teacher_local_fraction": local / sum(t.numel() for t in teacher_state.values()),
    }


if __name__ == "__main__":
    if os.environ.get("WORKER_WATCHDOG"):  # print every thread's stack and exit if a run hangs
        faulthandler.dump_traceback_later(float(os.environ["WORKER_WATCHDOG"]), exit=True)
    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    results = run_train(recipe, progress=False)
    trainer = record["trainer"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    teacher = trainer.teacher.state_dict(model) if trainer.teacher.keeps_copy else {}
    rank = trainer.accelerator.process_index
    probe = teacher_probe(trainer, model, teacher)
    out = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "prompts": record["prompts"],
        "weights": weights_checksum(model),
        "teacher": [float(sum(t.double().sum() for t in teacher.values()))] if teacher else None,
        "source_state": trainer.privileged.state_dict(),
        "steps": trainer.state.global_step,
        "logged_steps": [h["step"] for h in trainer.state.log_history if "loss" in h],
        "rollouts_generated": trainer.rollouts_generated,
        "credited": record["credited"],
        "reduced": record["reduced"],
        "leak": record["leak"],
        "probe": probe,
        "log_history": trainer.state.log_history,
    }
    Path(recipe.training["output_dir"], f"rank{rank}.json").write_text(json.dumps(out))
    leave_process_group(trainer.accelerator)  # as `selfdistill train` ends: no teardown race at exit
