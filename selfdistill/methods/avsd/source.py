"""AVSD: several privileged views per rollout (Adaptive-View Self-Distillation, arXiv 2605.20643; METHODS.md §4).

For every rollout the source builds M teacher contexts, each showing the task with a different piece of privileged
information. The trainer runs the M teacher passes (batched together) and combines them per token by consensus
plus a gated residual (:mod:`selfdistill.methods.avsd.combine`).

Built-in views (math-style reference solutions):
    full_solution     the whole reference solution;
    partial_solution  the first half of its steps (at least one), final answer removed, marked incomplete;
    answer_only       the final answer alone (``answer_column``, else a ``\\boxed{}`` or "answer is X" in the solution);
    feedback          the student's own rollout with the verifier's verdict (needs reward functions);
    column:NAME       the text of dataset column NAME, shown as a reference solution (e.g. several independent
                      references of one problem: ``column:reference_1``, ``column:reference_2``, ...).
Views compose: a user function ``f(rollout) -> str | TeacherView`` (a string is the view's privileged text), or
another source (an OPSD ``ReferenceSolution``, an SD-Zero ``Reviser``) whose views join the set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from selfdistill.dotted import import_dotted, split_dotted
from selfdistill.methods.avsd import combine as avsd_combine
from selfdistill.sources.base import (
    BUILTIN_SOURCES,
    PrivilegedSource,
    Rollout,
    TeacherView,
    builtin_source,
    user_text,
    with_user_text,
)

INCOMPLETE = "(incomplete: the rest of the solution is omitted)"
DEFAULT_TEMPLATES: dict[str, str] = {
    "full_solution": (
        "{problem}\n\nHere is a reference solution:\n{pi}\n\nUnderstand it, then answer in your own words."
    ),
    "partial_solution": (
        "{problem}\n\nHere is the beginning of a reference solution:\n{pi}\n\nUnderstand it, then answer in your "
        "own words."
    ),
    "answer_only": "{problem}\n\nThe final answer is {pi}.\n\nAnswer in your own words.",
    "feedback": "{problem}\n\n{pi}\n\nKeep what was right, fix what was wrong, and answer in your own words.",
}
GENERIC_TEMPLATE = "{problem}\n\n{pi}"
COLUMN_VIEW = "column:"
FEEDBACK = "A previous attempt:\n{attempt}\n\nA verifier judged this attempt {verdict}."
BUILTIN_VIEWS = tuple(DEFAULT_TEMPLATES)

_BOXED = re.compile(r"\\boxed\{")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)
_STEP_SPLIT = re.compile(r"(?<=[.!?])\s+(?=\S)")


def final_answer(solution: str) -> str | None:
    """The final answer stated in a solution: the last ``\\boxed{...}``, else the last "answer is X"; else None."""
    boxed = None
    for match in _BOXED.finditer(solution):
        depth, i = 1, match.end()
        while i < len(solution) and depth:
            depth += {"{": 1, "}": -1}.get(solution[i], 0)
            i += 1
        if depth == 0:
            boxed = solution[match.end() : i - 1].strip()
    if boxed:
        return boxed
    found = _ANSWER_IS.findall(solution)
    return found[-1].strip() if found else None


def solution_steps(solution: str) -> list[str]:
    """Steps of a solution: its non-empty lines, or its sentences when it is one line."""
    lines = [line.strip() for line in solution.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return lines
    return [s.strip() for s in _STEP_SPLIT.split(solution.strip()) if s.strip()]


def partial_solution(solution: str, answer: str | None) -> str:
    """The first half of the steps (at least one), with the final answer removed, marked incomplete."""
    steps = solution_steps(solution)
    kept = steps[: max(1, len(steps) // 2)]
    if answer:
        # A step that states the final answer ("The answer is 80.") never belongs to a partial solution.
        kept = [s for s in kept if not (answer in s and (_ANSWER_IS.search(s) or "\\boxed" in s))] or kept
    text = ("\n" if "\n" in solution.strip() else " ").join(kept)
    if answer and re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w])", text):
        # e.g. a one-step solution "12 + 3 = 15.": cut just before the answer's last appearance -> "12 + 3 ="
        cut = [m.start() for m in re.finditer(rf"(?<![\w.]){re.escape(answer)}(?![\w])", text)][-1]
        text = text[:cut].rstrip()
    return f"{text} ... {INCOMPLETE}" if text else INCOMPLETE


class MultiView(PrivilegedSource):
    """M teacher views per rollout, combined by consensus plus a gated residual.

    Args:
        views: view names (:data:`BUILTIN_VIEWS`), functions ``f(rollout) -> str | TeacherView``, or sources whose
            views join the set; default full, partial and answer-only solution (the paper's math views).
        column: dataset column with the reference solution.
        answer_column: optional column with the final answer (else it is read from the solution).
        templates: per-view format strings with ``{problem}`` and ``{pi}``; missing ones keep the defaults.
        form: ``full`` (candidate-set target, the default) or ``sampled`` (realised token only).
        top_k: candidates per view for the full form; 0 = the whole vocabulary.
        weights: ``uniform`` or ``agreement`` (views that disagree with the others get less weight).
        threshold: reward at or above which the feedback view calls an attempt correct.
    """

    paper = {"name": "AVSD", "title": "Adaptive-View Self-Distillation", "id": "2605.20643"}

    combine = "consensus"

    def __init__(
        self,
        views: Sequence[str | Callable | PrivilegedSource] = ("full_solution", "partial_solution", "answer_only"),
        column: str = "solution",
        answer_column: str | None = None,
        templates: dict[str, str] | None = None,
        form: str = "full",
        top_k: int = 0,
        weights: str = "uniform",
        threshold: float = 0.5,
    ):
        if not views:
            raise ValueError("views is empty; give at least one view (e.g. ['full_solution', 'answer_only'])")
        self.views_spec = [self._resolve(v) for v in views]
        self.names = [self._name(v) for v in self.views_spec]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"view names repeat: {self.names}; every view needs its own name (metrics use it)")
        unknown = set(templates or {}) - set(self.names)
        if unknown:
            raise ValueError(f"templates for views that are not used: {sorted(unknown)}; views are {self.names}")
        self.templates = {**DEFAULT_TEMPLATES, **dict(templates or {})}
        for name, template in self.templates.items():
            if "{pi}" not in template:
                raise ValueError(f"the template of view {name!r} lacks the {{pi}} placeholder")
        self.column = column
        self.answer_column = answer_column
        self.threshold = float(threshold)
        self.view_spec = avsd_combine.ViewSpec(form=form, top_k=top_k, weights=weights)
        needs_solution = any(v in ("full_solution", "partial_solution", "answer_only") for v in self.views_spec)
        columns = [column] if needs_solution else []
        columns += [v[len(COLUMN_VIEW):] for v in self.views_spec if isinstance(v, str) and v.startswith(COLUMN_VIEW)]
        if answer_column:
            columns.append(answer_column)
        for v in self.views_spec:
            if isinstance(v, PrivilegedSource):
                columns.extend(c for c in v.required_columns if c not in columns)
        self.required_columns = tuple(columns)
        self.needs_rewards = "feedback" in self.views_spec or any(
            isinstance(v, PrivilegedSource) and v.needs_rewards for v in self.views_spec
        )

    @staticmethod
    def _resolve(view: Any) -> str | Callable | PrivilegedSource:
        if isinstance(view, PrivilegedSource) or (callable(view) and not isinstance(view, str)):
            return view
        if not isinstance(view, str):
            raise TypeError(f"a view is a name, a function or a source; got {type(view).__name__}")
        if view in BUILTIN_VIEWS:
            return view
        if view.startswith(COLUMN_VIEW):
            if not view[len(COLUMN_VIEW):].strip():
                raise ValueError(f"view {view!r} names no column; write column:<dataset column>, e.g. "
                                 "column:reference_1")
            return view
        if view in BUILTIN_SOURCES:
            return builtin_source(view)()
        module, attr = split_dotted(view)
        if module and attr:
            func = import_dotted(view, "view")
            if callable(func):
                return func
        raise ValueError(
            f"unknown view {view!r}; use one of {', '.join(BUILTIN_VIEWS)}, a source "
            f"({', '.join(BUILTIN_SOURCES)}) or a dotted path to a function f(rollout) -> str"
        )

    def token_losses(self, student_logits, view_logits, tokens, spec, view_names, old_logps=None):
        """AVSD's target: the views' consensus plus the gated residual (selfdistill.methods.avsd.combine), with
        per-view metrics."""
        combined = avsd_combine.multiview_token_losses(student_logits, view_logits, tokens, spec, self.view_spec,
                                          old_logps=old_logps)
        return combined.tokens, avsd_combine.multiview_summary(combined, view_names)

    @staticmethod
    def _name(view: Any) -> str:
        if isinstance(view, str):
            return view[len(COLUMN_VIEW):] if view.startswith(COLUMN_VIEW) else view
        if isinstance(view, PrivilegedSource):
            return type(view).__name__.lower()
        return getattr(view, "__name__", type(view).__name__)

    def _solution(self, rollout: Rollout) -> str:
        solution = rollout.row.get(self.column)
        if solution is None or not str(solution).strip():
            raise ValueError(
                f"row {rollout.row!r:.200} has an empty {self.column!r}: the solution views need a reference "
                "solution in every row; filter such rows out or drop those views"
            )
        return str(solution)

    def _answer(self, rollout: Rollout, solution: str | None) -> str | None:
        if self.answer_column:
            value = rollout.row.get(self.answer_column)
            return None if value is None or not str(value).strip() else str(value).strip()
        return final_answer(solution) if solution else None

    def _pi(self, name: str, rollout: Rollout) -> str:
        if name == "feedback":
            verdict = "unverified" if rollout.reward is None else (
                "correct" if rollout.reward >= self.threshold else "wrong")
            return FEEDBACK.format(attempt=rollout.completion.strip() or "(empty)", verdict=verdict)
        if name.startswith(COLUMN_VIEW):  # a column view: the column's text
            name = name[len(COLUMN_VIEW):]
            value = rollout.row.get(name)
            if value is None or not str(value).strip():
                raise ValueError(f"row {rollout.row!r:.200} has an empty {name!r}, which view column:{name} shows; "
                                 "fill it in every row or drop the view")
            return str(value)
        solution = self._solution(rollout)
        if name == "full_solution":
            return solution
        answer = self._answer(rollout, solution)
        if name == "partial_solution":
            return partial_solution(solution, answer)
        if answer is None:
            where = f"column {self.answer_column!r} is empty" if self.answer_column else "no final answer was found"
            raise ValueError(
                f"row {rollout.row!r:.200}: {where} for the answer_only view; set answer_column= to a column with the "
                r"final answer, end solutions with '\boxed{...}' or 'The answer is X.', or drop the answer_only view"
            )
        return answer

    def views(self, rollouts: Sequence[Rollout]) -> list[list[TeacherView]]:
        out: list[list[TeacherView]] = [[] for _ in rollouts]
        for spec, name in zip(self.views_spec, self.names):
            if isinstance(spec, PrivilegedSource):
                for slot, views in zip(out, spec.views(rollouts)):
                    slot.extend(TeacherView(**{**v.__dict__, "name": name if len(views) == 1 else f"{name}_{k}"})
                                for k, v in enumerate(views))
                continue
            for slot, rollout in zip(out, rollouts):
                if callable(spec):
                    made = spec(rollout)
                    if isinstance(made, TeacherView):
                        slot.append(TeacherView(**{**made.__dict__, "name": name}))
                        continue
                    pi = str(made)
                else:
                    pi = self._pi(spec, rollout)
                default = GENERIC_TEMPLATE if callable(spec) else self.templates["full_solution"]
                text = self.templates.get(name, default).format(problem=user_text(rollout.prompt), pi=pi)
                slot.append(TeacherView(context=with_user_text(rollout.prompt, text), pi=pi, name=name))
        return out

    def observe(self, rollouts: Sequence[Rollout]) -> None:
        for spec in self.views_spec:
            if isinstance(spec, PrivilegedSource):
                spec.observe(rollouts)

    def state_dict(self) -> dict[str, Any]:
        return {name: spec.state_dict() for spec, name in zip(self.views_spec, self.names)
                if isinstance(spec, PrivilegedSource)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for spec, name in zip(self.views_spec, self.names):
            if isinstance(spec, PrivilegedSource) and name in state:
                spec.load_state_dict(state[name])
