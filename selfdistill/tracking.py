"""Experiment tracking beside what ``transformers`` reports itself (config and metrics, rank 0 only).

``report_to: [wandb]`` (online, or offline with ``WANDB_MODE=offline``: no key, no network) gets, from the
trainer: the sample rollouts of each logging step as a ``wandb.Table`` (with ``log_completions``:
``num_completions_to_print`` of them, with prompt, completion and reward) and the per-token divergence heatmaps
(``heatmap_steps``). ``report_to: [trackio]``, a lighter local tracker, gets the config and metrics through
``transformers``' own callback.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from selfdistill.distributed import reduce_metrics

ROLLOUT_TABLE = "rollouts"
ROLLOUT_COLUMNS = ["step", "prompt", "completion", "reward"]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def log_rollout_table(report_to: Sequence[str] | str | None, samples: list[dict[str, Any]], step: int) -> bool:
    """Log sample rollouts as a wandb table when wandb is a target with an active run; returns whether it did.

    Called on the main process only (the trainer checks); ``commit=False`` so the row joins the step's metrics.
    """
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in targets and "all" not in targets:
        return False
    import wandb

    if wandb.run is None or not samples:
        return False
    table = wandb.Table(columns=ROLLOUT_COLUMNS)
    for sample in samples:
        table.add_data(step, _prompt_text(sample["prompt"]), sample["completion"], sample["reward"])
    wandb.log({ROLLOUT_TABLE: table}, commit=False)
    return True


class MetricsRecorder:
    """The trainer's own metrics between two logs: weighted means (``reduce="mean"``), sums (``"sum"``) and extremes
    (``"min"``, ``"max"``), per mode (train or eval), reduced over all ranks when :meth:`flush` is called at log
    time."""

    def __init__(self):
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0.0, 0.0]),
                                                             "eval": defaultdict(lambda: [0.0, 0.0])}
        self._last_log_step = 0

    def record(self, mode: str, key: str, value: float, weight: float = 1.0, reduce: str = "mean") -> None:
        """``reduce``: ``mean`` (weighted), ``sum``, or ``min`` / ``max`` over the window and all ranks."""
        slot = self._metrics[mode][key if reduce == "mean" else f"{key}|{reduce}"]
        if reduce == "mean":
            slot[0] += float(value) * weight
            slot[1] += weight
        elif reduce == "sum":
            slot[0] += float(value)
            slot[1] = 1.0
        elif reduce in ("min", "max"):
            pick = min if reduce == "min" else max
            slot[0] = pick(slot[0], float(value)) if slot[1] else float(value)
            slot[1] = 1.0
        else:
            raise ValueError(f"reduce={reduce!r}; use 'mean', 'sum', 'min' or 'max'")

    def record_rewards(self, mode: str, per_func: dict[str, list[float]], rewards: list[float | None],
                       failures: int) -> None:
        """Each reward function's mean (``rewards/<name>/mean``, TRL's key), the weighted total and failed calls."""
        for name, values in per_func.items():
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                self.record(mode, f"rewards/{name}/mean", sum(finite) / len(finite), len(finite))
        finite = [r for r in rewards if r is not None]
        if finite:
            self.record(mode, "reward", sum(finite) / len(finite), len(finite))
        self.record(mode, "reward_failures", failures, 1.0, reduce="sum")

    def record_completions(self, mode: str, lengths: list[int], truncated: list[bool], truncated_pi: int) -> None:
        """Completion lengths as TRL logs them (mean, min, max; the same over the completions that ended with EOS,
        ``..._terminated_length``), the share cut at max_completion_length, empty ones and shortened PI."""
        n = len(lengths)
        self.record(mode, "completions/mean_length", sum(lengths) / n, n)
        self.record(mode, "completions/min_length", min(lengths), reduce="min")
        self.record(mode, "completions/max_length", max(lengths), reduce="max")
        ended = [x for x, cut in zip(lengths, truncated) if not cut]
        if ended:
            self.record(mode, "completions/mean_terminated_length", sum(ended) / len(ended), len(ended))
            self.record(mode, "completions/min_terminated_length", min(ended), reduce="min")
            self.record(mode, "completions/max_terminated_length", max(ended), reduce="max")
        self.record(mode, "completions/clipped_ratio", sum(truncated) / n, n)
        self.record(mode, "completions/empty", sum(1 for x in lengths if x == 0), 1.0, reduce="sum")
        self.record(mode, "pi_truncated", truncated_pi, 1.0, reduce="sum")

    def record_episodes(self, mode: str, stats: dict[str, float], n: int) -> None:
        """Multi-turn episodes' success, turns, invalid actions and unfinished count (``agent.episode_stats``)."""
        self.record(mode, "env/success", stats["success"], n)
        self.record(mode, "env/turns", stats["mean_turns"], n)
        self.record(mode, "env/invalid_actions", stats["invalid_action_rate"], stats["turns"])
        self.record(mode, "env/unfinished", stats["unfinished"], 1.0, reduce="sum")

    def flush(self, mode: str, global_step: int, accelerator: Any) -> dict[str, float]:
        """The window's values, summed over ranks (means over the global batch, global counts, the slowest rank's
        seconds); seconds (``time/*``) per optimizer step, counts as totals. Clears the window."""
        steps = max(global_step - self._last_log_step, 1) if mode == "train" else 1
        out = {}
        for key, (total, weight) in reduce_metrics(accelerator, dict(self._metrics[mode])).items():
            if key.endswith("|sum"):
                name = key[:-4]
                out[name] = total / steps if name.startswith("time/") else total
            elif key.endswith(("|min", "|max")):
                if weight > 0:
                    out[key[:-4]] = total
            elif weight > 0:
                out[key] = total / weight
        if mode == "eval":
            out = {f"eval_{k}": v for k, v in out.items()}
        else:
            self._last_log_step = global_step
        self._metrics[mode].clear()
        return out


def show_samples(samples: list[dict[str, Any]], report_to: Any, step: int, table: bool) -> None:
    """Print the step's sample rollouts (``log_completions``) and, for a step's log, send them as a wandb table."""
    if not samples:
        return
    for sample in samples:
        print(f"--- reward={sample['reward']} ---\n{sample['completion']}")
    if table:
        log_rollout_table(report_to, samples, step)
