"""Launched by tests/test_distributed.py under accelerate: two steps on a streamed dataset (IterableDataset), and the
prompts each rank trained on, written to <output_dir>/rank<N>.json."""

import gc
import json
import sys
from pathlib import Path

from conftest import build_dataset, build_model, build_tokenizer

from selfdistill import ReferenceSolution, SelfDistillConfig, SelfDistillTrainer
from selfdistill.distributed import leave_process_group

out = Path(sys.argv[1])
seen: list[str] = []
original = SelfDistillTrainer._make_rollouts


def spy(self, rows, mode, n_micro):
    if mode == "train":
        seen.extend(row["answer"] for row in rows)
    return original(self, rows, mode, n_micro)


SelfDistillTrainer._make_rollouts = spy
tokenizer = build_tokenizer()
args = SelfDistillConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                         max_completion_length=4, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
                         logging_steps=1)
trainer = SelfDistillTrainer(model=build_model(tokenizer), args=args, processing_class=tokenizer,
                             train_dataset=build_dataset(16).to_iterable_dataset(num_shards=1),
                             privileged=ReferenceSolution(column="solution"))
trainer.train()
rank = trainer.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps({"answers": seen, "steps": trainer.state.global_step,
                                                  "world_size": trainer.accelerator.num_processes}))
leave_process_group(trainer.accelerator)  # a rank exiting mid-teardown aborted its peer in ~1 run of 6
# Free the trainer (its DDP model holds the process group) now, not while the interpreter shuts down: left to the
# module's teardown, a rank aborted at exit ("terminate called without an active exception") in ~1 run of 7.
del trainer
gc.collect()
