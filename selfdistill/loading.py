"""How `SelfDistillTrainer` reads its datasets: every prompt num_generations times in a row, one block of prompts per
generation batch, served num_iterations x steps_per_generation times (the trainer's buffer turns it into micro-batches).

A mixin of the trainer (like :class:`selfdistill.checkpoints.CheckpointMixin`): map-style datasets take TRL's repeat
samplers (the training one re-seeded per epoch, :class:`selfdistill.rollout.EpochRepeatSampler`); a stream
(``datasets.IterableDataset``) cannot take a sampler, so its rows are repeated in the same order.
"""

from __future__ import annotations

import logging
from typing import Any

from datasets import IterableDataset
from trl.trainer.utils import RepeatSampler, repeat_iterable_dataset

from selfdistill.rollout import EpochRepeatSampler

logger = logging.getLogger(__name__)


def prepare_for_streams(args: Any, train_dataset: Any, eval_dataset: Any) -> None:
    """Settings a stream (``datasets.IterableDataset``) needs, as TRL's GRPOTrainer sets them: each process reads its
    own slice of the stream (accelerate's ``dispatch_batches=False``; dispatching would make the main process collate
    the string prompts of every rank), and one dataloader worker reads it, so a prompt's G copies stay together."""
    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    if not any(isinstance(ds, IterableDataset) for ds in [train_dataset, *evals]):
        return
    if args.accelerator_config.dispatch_batches:
        raise ValueError("a streamed dataset (IterableDataset) needs accelerator_config.dispatch_batches=False; "
                         "leave it unset or set it to False")
    args.accelerator_config.dispatch_batches = False
    if isinstance(train_dataset, IterableDataset) and args.dataloader_num_workers:
        logger.warning(f"a streamed train_dataset is read by one dataloader worker, so that each prompt's "
                       f"num_generations copies stay together; dataloader_num_workers={args.dataloader_num_workers} "
                       "is set to 0")
        args.dataloader_num_workers = 0


def repeat_stream(stream: Any, num_generations: int, prompts_per_batch: int, repeats: int, seed: int | None,
                  shuffle: bool) -> Any:
    """A stream cannot take a sampler, so its rows are repeated in the order the sampler gives a map-style dataset's
    (G copies of each prompt, a batch of prompts served ``repeats`` times: TRL's ``repeat_iterable_dataset``); the
    shuffle is the stream's buffered one."""
    if shuffle:
        stream = stream.shuffle(seed=seed)
    return repeat_iterable_dataset(stream, mini_repeat_count=num_generations, batch_size=prompts_per_batch,
                                   repeat_count=repeats)


class DataMixin:
    """The trainer's dataloaders; mixed in before ``transformers.Trainer``, whose methods it extends."""

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def _rollout_batch_size(self) -> int:
        return self._train_batch_size * self.args.steps_per_generation

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("SelfDistillTrainer needs a train_dataset to train")
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._rollout_batch_size(),
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        if isinstance(dataset, IterableDataset):  # a stream takes no sampler: repeat its rows as the samplers would
            rollouts = self._rollout_batch_size() * self.accelerator.num_processes if is_training else batch_size
            repeats = self.args.num_iterations * self.args.steps_per_generation if is_training else 1
            dataset = repeat_stream(dataset, self.args.num_generations, max(rollouts // self.args.num_generations, 1),
                                    repeats, self.args.seed, shuffle=is_training)
        return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)

    def _get_train_sampler(self, dataset=None):
        # Each prompt appears G times in a row; one block of prompts is served num_iterations x
        # steps_per_generation times, which the buffer in _prepare_inputs turns into micro-batches.
        dataset = dataset if dataset is not None else self.train_dataset
        global_rollouts = self._rollout_batch_size() * self.accelerator.num_processes
        return EpochRepeatSampler(
            data_source=dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=global_rollouts // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=True,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(
            data_source=eval_dataset,
            mini_repeat_count=self.args.num_generations,
            seed=self.args.seed,
            shuffle=False,
        )
