"""The ``selfdistill`` command: ``train``, ``eval``, ``diagnose``, ``recipes``, ``check`` and ``skills``.

Runs unchanged under ``accelerate launch -m selfdistill train RECIPE``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
from typing import Any

from selfdistill.modeling import ModelNotFound
from selfdistill.recipes import RecipeError, list_recipes, load_recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfdistill", description="On-policy self-distillation recipes.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="evaluate, train and evaluate a recipe; writes <output_dir>/results.json")
    train.add_argument("recipe", help="path to a recipe YAML (see `selfdistill recipes`)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.max_steps=10")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--restart", action="store_true",
                       help="start afresh even when output_dir holds checkpoints (they are moved aside, not deleted); "
                            "without it the run resumes from the last complete checkpoint there")
    ev = sub.add_parser("eval", help="greedy accuracy and pass@k of a model on the recipe's held-out split")
    ev.add_argument("recipe")
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--model", help="a trained model folder (default: the recipe's model)")
    ev.add_argument("--output", help="write the result as JSON here")
    ev.add_argument("--no-progress", action="store_true")
    diag = sub.add_parser("diagnose", help="before training: measure whether the task meets the method's premises; "
                                           "writes <output_dir>/diagnosis.json")
    diag.add_argument("recipe")
    diag.add_argument("overrides", nargs="*")
    diag.add_argument("--prompts", type=int, default=None,
                      help="training rows to roll out (default 64; max(4, 320 // max_turns**2) under an environment)")
    diag.add_argument("--samples", type=int, help="rollouts per prompt (default: max(num_generations, 4))")
    diag.add_argument("--skills", help="Skill-SD: a skill bank to measure (skills.json, or a run's folder)")
    diag.add_argument("--no-srt", action="store_true",
                      help="SD-Zero: measure the model as named, without the recipe's self-revision stage first")
    diag.add_argument("--no-progress", action="store_true")
    sub.add_parser("recipes", help="list the shipped recipes")
    check = sub.add_parser("check", help="validate recipes without loading a model (GPU-only settings included)")
    check.add_argument("recipes", nargs="+")
    for command in (train, ev, check, diag):
        command.add_argument("--allow-code", action="append", default=[], metavar="MODULE",
                             help="let the recipe name reward or view functions from MODULE (repeatable; '*': any "
                                  "module, and trust_remote_code). Without it only selfdistill's own run.")
    skills = sub.add_parser("skills", help="print a Skill-SD skill bank (a run's output dir, a checkpoint, or a JSON)")
    skills.add_argument("path", help="skills.json, a checkpoint's privileged_source.json, or a folder holding one")
    skills.add_argument("--task", help="only this task tag")
    return parser


class _Stopped(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM during a run: the exit code the shell expects (130 / 143). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way (a verifier's retry, a library's cleanup) swallows
    it: a first version derived from Exception, and a signal that arrived during a reward call was counted as a reward
    failure while the run went on."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT and SIGTERM into :class:`_Stopped` for the length of a run (the command is the process's entry
    point; the library itself installs no handler), then put the previous handlers back."""

    def stop(signum, _frame):
        raise _Stopped(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt as err:  # a SIGINT that arrived while another handler was in place
        raise _Stopped(130) from err
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def argv_text(args: argparse.Namespace) -> str:
    parts = ["selfdistill", "train", args.recipe, *args.overrides]
    return " ".join(shlex.quote(p) for p in parts)


def _interrupted_line(recipe: Any, command: str) -> str:
    from selfdistill.checkpoints import last_complete_checkpoint
    from selfdistill.run import ACTIVE

    trainer = ACTIVE.get("trainer")
    step = trainer.state.global_step if trainer is not None else 0
    out = recipe.training.get("output_dir", "")
    last, _ = last_complete_checkpoint(out) if out else (None, [])
    if last is None:
        return (f"selfdistill: stopped at step {step}; no complete checkpoint in {out} (set training.save_steps to "
                f"keep progress), so `{command}` starts afresh")
    return f"selfdistill: stopped at step {step}; last complete checkpoint {last}; resume with: {command}"


def resume_or_restart(recipe: Any, restart: bool) -> Any:
    """``selfdistill train``'s default: resume from the last complete checkpoint in output_dir, saying so (a newer
    damaged one is named and skipped); ``--restart`` moves the checkpoints aside and starts afresh."""
    import os
    import shutil
    import time

    from selfdistill.checkpoints import STAGING_DIR, checkpoints_in, last_complete_checkpoint

    training = recipe.training
    out = str(training.get("output_dir", ""))
    if training.get("resume_from_checkpoint") not in (None, False) or not out or not os.path.isdir(out):
        return recipe
    found = checkpoints_in(out)
    if restart:
        if int(os.environ.get("RANK", "0")) != 0:  # several processes: the first one moves, the others start afresh
            return recipe
        if found or os.path.isdir(os.path.join(out, STAGING_DIR)):
            aside = os.path.join(out, time.strftime("restarted-%Y%m%d-%H%M%S"))
            os.makedirs(aside)
            # with them the learning curve their run measured so far (a resumed run reads it back up to its step)
            for path in [*found, os.path.join(out, STAGING_DIR), os.path.join(out, "learning_curve.json")]:
                if os.path.exists(path):
                    shutil.move(path, os.path.join(aside, os.path.basename(path)))
            print(f"selfdistill: --restart: moved {len(found)} checkpoint(s) of {out} to {aside}; starting at step 0",
                  file=sys.stderr)
        return recipe
    if not found:
        return recipe
    last, skipped = last_complete_checkpoint(out)
    for checkpoint, bad in skipped:
        print(f"selfdistill: WARNING: skipping damaged checkpoint {checkpoint} ({'; '.join(bad)})", file=sys.stderr)
    if last is None:
        raise RecipeError(f"{out} holds checkpoints but none is complete; move them aside with --restart")
    step = last.rsplit("-", 1)[-1]
    print(f"selfdistill: resuming from {last} (step {step}); --restart starts afresh instead", file=sys.stderr)
    training["resume_from_checkpoint"] = last
    return recipe


def _quiet_deepspeed_detection() -> None:
    """accelerate imports DeepSpeed whenever it is installed (to unwrap a model), and DeepSpeed warns "Setting
    accelerator to CPU" when it finds no GPU, though the run does not use it. Where a process starts (here, not in the
    library) and no accelerator is present, name the CPU for it, as DeepSpeed's own DS_ACCELERATOR does; a value the
    user set wins."""
    import os

    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    if not (torch.cuda.is_available() or (mps is not None and mps.is_available())
            or (xpu is not None and xpu.is_available())):
        os.environ["DS_ACCELERATOR"] = "cpu"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``key=value`` overrides may also come after the options (``train r.yaml --no-progress
    training.max_steps=4``), where argparse alone would refuse them."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _quiet_deepspeed_detection()
    if getattr(args, "no_progress", False):  # transformers' own bars too (loading weights, writing shards)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "recipes":
            for path, description in list_recipes():
                print(f"{path}\n    {description}")
            return 0
        if args.command == "skills":
            from selfdistill.methods.skillsd.bank import SkillBank

            try:
                bank = SkillBank.load(args.path)
            except (FileNotFoundError, ValueError) as err:
                print(f"selfdistill: {err}", file=sys.stderr)
                return 2
            if args.task:
                bank.skills = {i: s for i, s in bank.skills.items() if s.task == args.task}
            print(bank.format())
            return 0
        if args.command == "check":
            for path in args.recipes:
                load_recipe(path, hardware_checks=False, allow_code=args.allow_code)
                print(f"ok  {path}")
            return 0
        recipe = load_recipe(args.recipe, args.overrides, allow_code=args.allow_code)
        from selfdistill.run import run_eval, run_train

        if args.command == "diagnose":
            from selfdistill.premises import diagnose_recipe, format_report

            if (args.prompts is not None and args.prompts < 1) or (args.samples is not None and args.samples < 1):
                raise RecipeError("--prompts and --samples must be at least 1")
            try:
                with _stop_on_signals():
                    report = diagnose_recipe(recipe, prompts=args.prompts, samples=args.samples, skills=args.skills,
                                             progress=not args.no_progress, srt=not args.no_srt)
            except _Stopped as stop:
                print("selfdistill: diagnose stopped before its report; nothing was written (a self-revision stage it "
                      "had finished is kept and reused by the next run)", file=sys.stderr)
                return stop.code
            print(format_report(report))
            print(f"wrote {report['path']} ({report['wall_seconds']:.0f} s)")
            return 0
        if args.command == "train":
            from accelerate import PartialState

            from selfdistill.distributed import leave_process_group

            recipe = resume_or_restart(recipe, args.restart)
            try:
                with _stop_on_signals():
                    run_train(recipe, progress=not args.no_progress)
            except _Stopped as stop:
                print(_interrupted_line(recipe, argv_text(args)), file=sys.stderr)
                return stop.code
            leave_process_group(PartialState())
            return 0
        try:
            with _stop_on_signals():
                result = run_eval(recipe, args.model, progress=not args.no_progress)
        except _Stopped as stop:
            print("selfdistill: eval stopped before its result; nothing was written", file=sys.stderr)
            return stop.code
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1, default=str)
        return 0
    except RecipeError as err:
        print(f"selfdistill: recipe error: {err}", file=sys.stderr)
        return 2
    except ModelNotFound as err:
        print(f"selfdistill: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
