"""Experiment tracking beside what ``transformers`` reports itself (config and metrics, rank 0 only).

``report_to: [wandb]`` (online, or offline with ``WANDB_MODE=offline``: no key, no network) gets, from the
trainer: the sample rollouts of each logging step as a ``wandb.Table`` (with ``log_completions``:
``num_completions_to_print`` of them, with prompt, completion and reward) and the per-token divergence heatmaps
(``heatmap_steps``). ``report_to: [trackio]``, a lighter local tracker, gets the config and metrics through
``transformers``' own callback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
