"""Skill-SD: skills summarised from the model's own trajectories as dynamic privileged information
(Skill-Conditioned Self-Distillation, arXiv 2604.10674; METHODS.md §5).

After each generation batch the model summarises a few finished trajectories into short skills (what worked,
the mistake to avoid, a workflow), which go into a :class:`~selfdistill.methods.skillsd.bank.SkillBank` filed by
task. For every rollout the teacher sees the task plus the skills retrieved for its task; the student always sees
the plain task. The skills written from batch k reach the teacher from batch k + 1 on.

Usefulness, the bandit's reward: a skill shown to the teacher for a rollout is credited with
``A * mean_t(log p_T(y_t) - log p_S(y_t))`` over the model's tokens, where ``A`` is the rollout's GRPO advantage
(its reward minus its group's mean, scaled per ``scale_rewards``). It is positive when the skill makes the teacher
raise the probability of what the better rollouts of a group did and lower that of the worse ones: exactly what
the distillation loss then teaches. Rollouts of a group with equal rewards (A = 0) credit nothing. This signal is
this library's choice (the paper reports a bandit over usefulness without publishing its definition).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selfdistill.methods.skillsd.bank import SkillBank
from selfdistill.sources.base import PrivilegedSource, Rollout, TeacherView, user_text, with_user_text

DEFAULT_TEMPLATE = (
    "{task}\n\n"
    "Skills learned from earlier attempts at this task:\n{skills}\n\n"
    "Use these skills to do the task well."
)

DEFAULT_SUMMARY_PROMPT = (
    "Below is an attempt at a task and its outcome.\n\n"
    "Task:\n{task}\n\n"
    "Attempt:\n{trajectory}\n\n"
    "Outcome: {outcome}\n\n"
    "Write one short skill (one or two sentences) for doing this task well next time: what worked, which mistake to "
    "avoid, or a step-by-step workflow. Write only the skill."
)

MAX_SKILL_CHARS = 400


def clean_summary(text: str) -> str:
    """One paragraph, at most ``MAX_SKILL_CHARS`` characters, cut at a sentence end where possible."""
    text = text.strip().split("\n\n")[0].strip()
    if len(text) > MAX_SKILL_CHARS:
        cut = text[:MAX_SKILL_CHARS]
        end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
        text = cut[: end + 1] if end > 40 else cut
    return text


class Skills(PrivilegedSource):
    """Teacher context = the task + skills retrieved from a bank the model writes about its own trajectories.

    Args:
        max_per_task, dedupe_threshold, retrieval, top_k, exploration: the :class:`SkillBank` settings.
        summaries_per_step: trajectories summarised after each generation batch (0 switches summarising off:
            the bank only changes through ``load_state_dict``). Half are the batch's best, half its worst.
        summary_max_tokens: the length limit of one summary.
        summary_prompt: format string with ``{task}``, ``{trajectory}`` and ``{outcome}``.
        template: the teacher's user message, with ``{task}`` and ``{skills}`` (one ``- skill`` line each).
        task_column: the dataset column holding the task tag; rows without it are filed under ``"task"``.
        success_threshold: a trajectory with reward >= this is described as a success in the summary prompt.
        seed_skills: skills the user writes, e.g. a strategy known to work: a list of texts, or the path of a text
            file (one skill per line; blank lines and ``#`` lines skipped) or of a JSON list of texts. They are
            shown for every task, never evicted, and kept through checkpoints with the rest of the bank. With
            ``summaries_per_step=0`` the teacher sees only them.
    """

    paper = {"name": "Skill-SD", "title": "Skill-Conditioned Self-Distillation for multi-turn agents",
             "id": "2604.10674"}

    needs_generation = True

    def __init__(self, max_per_task: int = 8, top_k: int = 2, retrieval: str = "ucb", exploration: float = 1.0,
                 dedupe_threshold: float = 0.7, summaries_per_step: int = 2, summary_max_tokens: int = 64,
                 summary_prompt: str = DEFAULT_SUMMARY_PROMPT, template: str = DEFAULT_TEMPLATE,
                 task_column: str = "task", success_threshold: float = 1.0,
                 seed_skills: Sequence[str] | str | None = None):
        for key in ("{task}", "{trajectory}", "{outcome}"):
            if key not in summary_prompt:
                raise ValueError(f"summary_prompt lacks the {key} placeholder; it needs {{task}}, {{trajectory}} "
                                 "and {outcome}")
        for key in ("{task}", "{skills}"):
            if key not in template:
                raise ValueError(f"the Skill-SD template lacks the {key} placeholder; it needs {{task}} and {{skills}}")
        if summaries_per_step < 0 or summary_max_tokens < 1:
            raise ValueError(f"summaries_per_step={summaries_per_step} must be >= 0 and summary_max_tokens="
                             f"{summary_max_tokens} >= 1")
        self.bank = SkillBank(max_per_task=max_per_task, dedupe_threshold=dedupe_threshold, retrieval=retrieval,
                              top_k=top_k, exploration=exploration)
        self.summaries_per_step, self.summary_max_tokens = summaries_per_step, summary_max_tokens
        self.summary_prompt, self.template = summary_prompt, template
        self.task_column, self.success_threshold = task_column, success_threshold
        self.seed_skills = read_seed_skills(seed_skills)
        self.bank.seed(self.seed_skills)
        self.rounds = 0
        self._generate: Callable[[list[Any], int], list[str]] | None = None
        self._counts = {"added": 0, "merged": 0, "summaries": 0}
        self._shown: list[int] = []

    def attach(self, generate: Callable[[list[Any], int], list[str]]) -> None:
        self._generate = generate

    def task_of(self, row: dict[str, Any]) -> str:
        return str(row.get(self.task_column) or "task")

    # ----------------------------------------------------------------------------------------------- teacher
    def views(self, rollouts: Sequence[Rollout]) -> list[list[TeacherView]]:
        out, self._shown = [], []
        for rollout in rollouts:
            task_text = user_text(rollout.prompt)
            skills = self.bank.retrieve(self.task_of(rollout.row), task_text)
            self._shown.append(len(skills))
            if not skills:  # nothing learned yet for this task: the teacher sees what the student sees
                out.append([TeacherView(context=rollout.prompt, pi=None, name="skills", tag=[])])
                continue
            block = "\n".join(f"- {s.text}" for s in skills)
            text = self.template.format(task=task_text, skills=block)
            out.append([TeacherView(context=with_user_text(rollout.prompt, text), pi=block, name="skills",
                                    tag=[s.id for s in skills])])
        return out

    # ------------------------------------------------------------------------------------------ skill writing
    def observe(self, rollouts: Sequence[Rollout]) -> None:
        self.rounds += 1
        if not self.summaries_per_step or self._generate is None or not rollouts:
            return
        chosen = self.pick(rollouts)
        prompts = [[{"role": "user", "content": self.summary_prompt.format(
            task=user_text(r.prompt), trajectory=r.completion.strip() or "(no reply)", outcome=self.outcome(r))}]
            for r in chosen]
        texts = self._generate(prompts, self.summary_max_tokens)
        for rollout, text in zip(chosen, texts):
            self._counts["summaries"] += 1
            skill = self.bank.add(self.task_of(rollout.row), clean_summary(text), step=self.rounds,
                                  source_reward=rollout.reward)
            self._counts["added" if skill is not None else "merged"] += 1

    def outcome(self, rollout: Rollout) -> str:
        if rollout.reward is None:
            return "unknown (the reward could not be computed)"
        verdict = "success" if rollout.reward >= self.success_threshold else "failure"
        return f"{verdict} (reward {rollout.reward:g})"

    def pick(self, rollouts: Sequence[Rollout]) -> list[Rollout]:
        """The trajectories to summarise: alternately the best and the worst not yet taken, finished ones first."""
        ranked = sorted(rollouts, key=lambda r: (r.finished, -1e9 if r.reward is None else r.reward), reverse=True)
        finished = [r for r in ranked if r.finished] or ranked
        order = []
        for i in range((len(finished) + 1) // 2):
            order.append(finished[i])
            if len(finished) - 1 - i != i:
                order.append(finished[len(finished) - 1 - i])
        return order[: self.summaries_per_step]

    # --------------------------------------------------------------------------------------------- bandit
    def feedback(self, tags: Sequence[Any], signals: Sequence[dict[str, float]]) -> None:
        for ids, signal in zip(tags, signals):
            advantage = signal.get("advantage")
            if ids and advantage:
                self.bank.credit(list(ids), advantage * signal["logp_gap"])

    def metrics(self) -> dict[str, float]:
        shown = sum(self._shown) / len(self._shown) if self._shown else 0.0
        return {"skills/bank_size": float(len(self.bank)), "skills/shown_per_rollout": shown,
                **{f"skills/{k}": float(v) for k, v in self._counts.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state.get("bank", {}))
        self.bank.seed(self.seed_skills)  # a bank saved before seed_skills was given gains them; present ones stay
        self.rounds = int(state.get("rounds", 0))


def read_seed_skills(seed: Sequence[str] | str | None) -> list[str]:
    """``seed_skills`` as a list of texts: given as a list, or read from a text file (a skill per line) or a JSON
    list."""
    if seed is None:
        return []
    if isinstance(seed, str):
        path = Path(seed)
        if not path.is_file():
            raise ValueError(
                f"seed_skills={seed!r} is not a file; give a list of skill texts, or the path of a text file (one "
                "skill per line) or of a JSON list of texts"
            )
        text = path.read_text()
        if path.suffix == ".json":
            try:
                seed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"seed_skills file {path} is not valid JSON ({err}); write a JSON list of skill "
                                 "texts, or use a .txt file with one skill per line") from err
            if not isinstance(seed, list):
                raise ValueError(f"seed_skills file {path} holds a {type(seed).__name__}; it must be a JSON list of "
                                 "skill texts")
        else:
            seed = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    texts = []
    for i, item in enumerate(seed):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"seed_skills[{i}] is {item!r}; every seeded skill must be a non-empty text")
        texts.append(item.strip())
    return texts
