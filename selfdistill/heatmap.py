"""Per-token divergence heatmaps: which tokens of a rollout the teacher wants changed.

Every method scores the student's own tokens, so the per-token teacher-student divergence ``D_t`` shows where the
privileged information disagrees with what the student wrote: the paper of SD-Zero calls this self-localisation
(the reviser's divergence concentrates on the tokens that need revising). The trainer renders a few rollouts every
``heatmap_steps`` optimizer steps as HTML (hover a token for its value) and PNG.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


@dataclass
class TokenHeat:
    """One rollout: its tokens as text pieces, one value per token and a caption."""

    pieces: list[str]
    values: list[float]
    title: str = ""

    def __post_init__(self) -> None:
        if len(self.pieces) != len(self.values):
            raise ValueError(f"{len(self.pieces)} token pieces but {len(self.values)} values; give one value per token")


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text of each token on its own (special tokens included, so an EOS shows as itself)."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def _scale(samples: Sequence[TokenHeat], vmax: float | None) -> float:
    if vmax is not None:
        return max(vmax, 1e-12)
    top = max((v for s in samples for v in s.values), default=0.0)
    return max(top, 1e-12)


def _rgb(fraction: float) -> tuple[int, int, int]:
    """White (no divergence) to red (the largest divergence on the page)."""
    f = min(max(fraction, 0.0), 1.0)
    return 255, int(255 - 200 * f), int(255 - 200 * f)


def render_html(samples: Sequence[TokenHeat], title: str = "Per-token divergence", vmax: float | None = None) -> str:
    """A self-contained HTML page; each token's background is its divergence, its tooltip the value in nats."""
    top = _scale(samples, vmax)
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".r{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ddd;padding:.6em}"
        ".t{border-radius:2px}</style>",
        f"<h2>{html.escape(title)}</h2>",
        f"<p>Background: teacher-student divergence of each completion token (white 0, red {top:.3g} nats). "
        "Hover a token for its value.</p>",
    ]
    for sample in samples:
        parts.append(f"<h4>{html.escape(sample.title)}</h4><div class='r'>")
        for piece, value in zip(sample.pieces, sample.values):
            r, g, b = _rgb(value / top)
            parts.append(
                f"<span class='t' style='background:rgb({r},{g},{b})' title='{value:.4f}'>{html.escape(piece)}</span>"
            )
        parts.append("</div>")
    return "".join(parts)


def render_png(samples: Sequence[TokenHeat], path: str | Path, title: str = "Per-token divergence",
               vmax: float | None = None, width_chars: int = 90) -> None:
    """The same view as a PNG: tokens laid out as monospace text, wrapped at ``width_chars`` characters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    top = _scale(samples, vmax)
    lines: list[tuple[str, list[tuple[int, str, float]]]] = []  # (caption, [(column, text, value)]) per line
    for sample in samples:
        lines.append((sample.title, []))
        column, row = 0, []
        for piece, value in zip(sample.pieces, sample.values):
            # Control characters have no glyph in the monospace font; show them as a middle dot.
            text = "".join(c if c.isprintable() else "·" for c in piece.replace("\n", "⏎"))
            if column + len(text) > width_chars and row:
                lines.append(("", row))
                column, row = 0, []
            row.append((column, text, value))
            column += max(len(text), 1)
            if "\n" in piece:
                lines.append(("", row))
                column, row = 0, []
        if row:
            lines.append(("", row))
    height = 0.6 + 0.28 * len(lines)
    char_inches = 0.6 * 8 / 72  # the advance of a monospace glyph at 8 pt: one x unit per character
    fig = plt.figure(figsize=((width_chars + 2) * char_inches, height), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1, width_chars + 1)
    ax.set_ylim(len(lines) + 1.5, -0.5)
    ax.axis("off")
    ax.text(0, 0, f"{title} (white 0 → red {top:.3g} nats)", fontsize=9, weight="bold", va="center")
    for y, (caption, row) in enumerate(lines, start=1):
        if caption:
            ax.text(0, y, caption, fontsize=8, style="italic", va="center", color="#444")
            continue
        for column, text, value in row:
            r, g, b = _rgb(value / top)
            ax.add_patch(Rectangle((column, y - 0.42), max(len(text), 1), 0.84, color=(r / 255, g / 255, b / 255),
                                   linewidth=0))
            ax.text(column, y, text, fontsize=8, family="monospace", va="center")
    fig.savefig(path)
    plt.close(fig)


def write_heatmaps(samples: Sequence[TokenHeat], folder: str | Path, stem: str,
                   title: str = "Per-token divergence") -> tuple[Path, Path]:
    """Write ``<folder>/<stem>.html`` and ``.png``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    html_path, png_path = folder / f"{stem}.html", folder / f"{stem}.png"
    html_path.write_text(render_html(samples, title))
    render_png(samples, png_path, title)
    return html_path, png_path


class HeatmapCallback(TrainerCallback):
    """Every ``heatmap_steps`` optimizer steps: the per-token divergence of the first ``heatmap_samples`` rollouts of
    the step's first micro-batch, rendered over their text as ``<output_dir>/heatmaps/step-N.html`` and ``.png`` (and
    logged to wandb when it is a ``report_to`` target). The trainer hands over the tensors with :meth:`capture`."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self._captured_step = -1
        self._pending: list[TokenHeat] = []

    def due(self, step: int) -> bool:
        """Whether the micro-batch of optimizer step ``step`` (1-based) should be captured."""
        every = self.trainer.args.heatmap_steps
        return bool(every) and step % every == 0 and self._captured_step != step

    def maybe_capture(self, inputs: dict[str, Any], divergence: Any, keep: Any = None) -> None:
        """:meth:`capture` when the current step is due; ``keep`` marks the scored tokens among all completion
        tokens (environment tokens show as 0)."""
        if not self.due(self.trainer.state.global_step + 1):
            return
        if keep is not None:
            divergence = divergence.new_zeros(keep.shape).masked_scatter(keep, divergence)
        self.capture(inputs, divergence)

    def capture(self, inputs: dict[str, Any], divergence: Any) -> None:
        """Keep the first rollouts of this micro-batch: ``divergence`` is per scored token, rollout after rollout."""
        trainer = self.trainer
        self._captured_step = trainer.state.global_step + 1
        if not trainer.is_world_process_zero():
            return
        values = divergence.detach().float().cpu().tolist()
        samples, offset = [], 0
        for ids, reward, view in zip(inputs["completion_ids"], inputs["rewards"], inputs["view_names"]):
            chunk = values[offset : offset + len(ids)]
            offset += len(ids)
            if len(samples) < trainer.args.heatmap_samples and ids:
                caption = f"view {'+'.join(view)}" + ("" if reward is None else f", reward {reward:g}")
                caption += f", mean {sum(chunk) / len(chunk):.3f} nats/token"
                samples.append(TokenHeat(token_pieces(trainer.processing_class, ids), chunk, caption))
        self._pending = samples

    def on_step_end(self, args, state, control, **kwargs):
        samples, self._pending = self._pending, []
        if not samples:
            return
        step = state.global_step
        html_path, png_path = write_heatmaps(samples, Path(args.output_dir) / "heatmaps", f"step-{step:06d}",
                                             title=f"Teacher-student divergence per token, step {step}")
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.log({"divergence_heatmap": wandb.Html(html_path.read_text()),
                           "divergence_heatmap_png": wandb.Image(str(png_path))}, commit=False)
