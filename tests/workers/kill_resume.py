"""Launched by tests/test_reliability.py: train a tiny model in one configuration ("scenario") with a checkpoint after
every step, then write the final weights, teacher tensors, source state and logged losses to <root>/<scenario>/final.pt.

    python kill_resume.py ROOT SCENARIO [SCENARIO ...] [--resume] [--step-delay S] [--die-in-save N]

--resume continues each scenario from the last checkpoint in its folder (``resume_from_checkpoint=True``);
--step-delay sleeps after every step so the test has time to kill the process between two steps;
--die-in-save N has the process SIGKILL itself while transformers writes checkpoint N (weights written, optimizer not).
"""

import argparse
import functools
import os
import signal
import sys
import time
from pathlib import Path

import torch
from conftest import build_dataset, build_model, build_tokenizer
from datasets import Dataset
from transformers import TrainerCallback

from selfdistill import ReferenceSolution, SelfDistillConfig, SelfDistillTrainer
from selfdistill.envs import GuessNumber
from selfdistill.sources import Skills

STEPS = 6
POLICIES = ("live", "initial", "ema", "sync")
SCENARIOS = (*POLICIES, *(f"lora-{p}" for p in POLICIES), "skillsd")


def parity_reward(prompts, completions, **kwargs):
    """A reward that differs within a group, so GRPO advantages and Skill-SD's skill credits are not all zero."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t) % 2) for t in texts]


def build(scenario: str, out: Path) -> SelfDistillTrainer:
    if scenario not in SCENARIOS:
        raise SystemExit(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    tokenizer = build_tokenizer()
    policy = scenario.removeprefix("lora-")
    settings = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=6, logging_steps=1, report_to=[], save_strategy="steps", save_steps=1,
                    save_total_limit=2, learning_rate=3e-3, use_cpu=True, seed=0, disable_tqdm=True,
                    teacher_policy=policy, teacher_ema_rate=0.5, teacher_update_every=2)
    if scenario == "skillsd":
        settings.update(teacher_policy="sync", max_completion_length=4, max_turns=3, support="sampled", clip="none",
                        grpo_weight=0.5, num_iterations=2, ratio_clip=2.0)
        rows = GuessNumber.make_rows(8, seed=0, split="train", low=1, high=4, max_turns=3)
        source = Skills(summaries_per_step=1)
        trainer = SelfDistillTrainer(
            model=build_model(tokenizer, max_position_embeddings=1024), args=SelfDistillConfig(**settings),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, privileged=source,
            reward_funcs=[parity_reward],
            environment_factory=functools.partial(GuessNumber, low=1, high=4, max_turns=3))
        # Skills in the bank from the start, so every step retrieves some and credits them.
        for text in ("Guess two first, then move up or down by one.", "Start in the middle and halve the range."):
            source.bank.add(rows[0]["task"], text, step=0)
        return trainer
    peft_config = None
    if scenario.startswith("lora-"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        settings["learning_rate"] = 5e-2
    return SelfDistillTrainer(model=build_model(tokenizer), args=SelfDistillConfig(**settings),
                              train_dataset=build_dataset(), processing_class=tokenizer,
                              privileged=ReferenceSolution(column="solution"), reward_funcs=[parity_reward],
                              peft_config=peft_config)


class _Delay(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def final_state(trainer: SelfDistillTrainer) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "teacher": {n: t.detach().clone() for n, t in trainer.teacher.params.items()},
        "source": trainer.privileged.state_dict(),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "step": trainer.state.global_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("scenarios", nargs="+")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--die-in-save", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.die_in_save is not None:
        save_optimizer = SelfDistillTrainer._save_optimizer_and_scheduler

        def dying_save(self, output_dir):
            if self.state.global_step == args.die_in_save:
                os.kill(os.getpid(), signal.SIGKILL)
            return save_optimizer(self, output_dir)

        SelfDistillTrainer._save_optimizer_and_scheduler = dying_save
    for scenario in args.scenarios:
        out = args.root / scenario
        trainer = build(scenario, out)
        if args.step_delay:
            trainer.add_callback(_Delay(args.step_delay))
        trainer.train(resume_from_checkpoint=True if args.resume else None)
        torch.save(final_state(trainer), out / "final.pt")
        print(f"{scenario}: done at step {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
