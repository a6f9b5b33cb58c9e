"""SDPO-style privileged information: a successful sibling rollout of the same prompt (arXiv 2601.20802;
METHODS.md §6). The worked example of a new method in one file (docs/methods/new-method.md): this module is not in
the ``SOURCES`` registry, and ``recipes/sdpo_arithmetic.yaml`` names it by its dotted path.

Each prompt is rolled out ``num_generations`` times. For every rollout the teacher sees the problem plus the text of
another rollout of the same prompt that the verifier accepted; the student learns where its own attempt parts from
what the model writes once it has seen a correct one. A rollout whose group has no other accepted sibling has no
demonstration: as in the paper it leaves the distillation loss and its token count (``fallback="skip"``, the default;
its view is marked ``trains=False``). ``fallback="problem"`` (the earlier default) gave it the bare problem instead:
with an EMA teacher that pulled the student back towards the teacher's older weights on every such rollout, 55% of
them on the arithmetic recipe (docs/methods/new-method.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from selfdistill.sources.base import PrivilegedSource, Rollout, TeacherView, user_text, with_user_text

DEFAULT_TEMPLATE = (
    "{problem}\n\nHere is a correct answer to this problem written by another attempt:\n{sibling}\n\n"
    "Now answer the problem yourself."
)


class SiblingSolution(PrivilegedSource):
    """Teacher context = the problem + a successful sibling rollout (another rollout of the same prompt).

    Args:
        threshold: a sibling counts as successful when its reward is at least this.
        template: format string with ``{problem}`` and ``{sibling}``.
        fallback: when no other sibling succeeded: ``"skip"`` (the rollout leaves the distillation loss, as in the
            paper), ``"problem"`` (the teacher sees the bare problem) or ``"self"`` (the rollout's own text when it is
            the group's only success, else skipped).
    """

    paper = {"name": "SDPO", "title": "SDPO", "id": "2601.20802"}
    needs_rewards = True

    def __init__(self, threshold: float = 0.5, template: str = DEFAULT_TEMPLATE, fallback: str = "skip"):
        for key in ("{problem}", "{sibling}"):
            if key not in template:
                raise ValueError(f"the sibling template lacks the {key} placeholder")
        if fallback not in ("skip", "problem", "self"):
            raise ValueError(f"fallback={fallback!r}; use 'skip', 'problem' or 'self'")
        self.threshold = threshold
        self.template = template
        self.fallback = fallback
        self.shown = [0, 0]  # rollouts with a sibling shown, all rollouts

    def views(self, rollouts: Sequence[Rollout]) -> list[list[TeacherView]]:
        accepted: dict[int, list[int]] = {}
        for i, r in enumerate(rollouts):
            if r.reward is not None and r.reward >= self.threshold and r.completion.strip():
                accepted.setdefault(r.group, []).append(i)
        out = []
        for i, rollout in enumerate(rollouts):
            others = [j for j in accepted.get(rollout.group, []) if j != i]
            if not others and self.fallback == "self" and i in accepted.get(rollout.group, []):
                others = [i]
            problem = user_text(rollout.prompt)
            self.shown[1] += 1
            if not others:  # nothing to show: no signal ("skip"), or the bare problem ("problem")
                out.append([TeacherView(context=rollout.prompt, pi=None, name="no_sibling",
                                        trains=self.fallback == "problem")])
                continue
            self.shown[0] += 1
            sibling = rollouts[others[0]].completion  # the first accepted sibling: deterministic
            text = self.template.format(problem=problem, sibling=sibling)
            out.append([TeacherView(context=with_user_text(rollout.prompt, text), pi=sibling, name="sibling")])
        return out

    def metrics(self) -> dict[str, float]:
        shown, total = self.shown
        self.shown = [0, 0]
        return {"sibling/shown_fraction": shown / total} if total else {}
