"""OPSD: a reference solution as privileged information (Self-Distilled Reasoner, arXiv 2601.18734; METHODS.md §2).

The teacher sees the problem plus a reference solution, with an instruction to understand the solution rather
than copy it and to derive the answer in its own words; the student sees the problem only.
"""

from __future__ import annotations

from collections.abc import Sequence

from selfdistill.sources.base import PrivilegedSource, Rollout, TeacherView, user_text, with_user_text

DEFAULT_TEMPLATE = (
    "{problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference solution ===\n{solution}\n=== End of reference solution ===\n"
    "{answer_line}"
    "Study the reference solution until you understand why it works, then solve the problem yourself and write "
    "the answer in your own words. Do not copy the reference or mention that you were given one."
)
ANSWER_LINE = "The final answer is {answer}.\n"


class ReferenceSolution(PrivilegedSource):
    """Teacher context = the problem + a reference solution (+ optionally the final answer).

    Args:
        column: dataset column holding the reference solution.
        answer_column: optional column holding the final answer, shown after the solution.
        template: format string with ``{problem}``, ``{solution}`` and ``{answer_line}``; the default follows the
            paper (understand the reference, do not copy it).
    """

    paper = {"name": "OPSD", "title": "On-Policy Self-Distillation (Self-Distilled Reasoner)", "id": "2601.18734"}

    def __init__(self, column: str = "solution", answer_column: str | None = None, template: str = DEFAULT_TEMPLATE):
        for key in ("{problem}", "{solution}"):
            if key not in template:
                raise ValueError(
                    f"the OPSD template lacks the {key} placeholder; it needs {{problem}} and {{solution}}"
                )
        self.column = column
        self.answer_column = answer_column
        self.template = template
        self.required_columns = (column,) + ((answer_column,) if answer_column else ())

    def views(self, rollouts: Sequence[Rollout]) -> list[list[TeacherView]]:
        out = []
        for rollout in rollouts:
            solution = rollout.row.get(self.column)
            if solution is None or not str(solution).strip():
                raise ValueError(
                    f"row {rollout.row!r:.200} has an empty {self.column!r}: OPSD needs a reference solution in every "
                    "row; filter such rows out of the dataset"
                )
            answer_line = ""
            if self.answer_column:
                answer_line = ANSWER_LINE.format(answer=rollout.row[self.answer_column])
            solution = str(solution)
            text = self.template.format(problem=user_text(rollout.prompt), solution=solution, answer_line=answer_line)
            out.append([TeacherView(context=with_user_text(rollout.prompt, text), pi=solution, name="reference")])
        return out
