"""The skill bank of Skill-SD (arXiv 2604.10674; METHODS.md §5): short natural-language skills the model wrote
about its own finished trajectories, filed by task, deduplicated, capped, and retrieved per task.

Retrieval is either a bandit over observed usefulness (UCB1: mean usefulness plus
``exploration * sqrt(ln(N + 1) / n)``, untried skills first) or word overlap with the task text (Jaccard). What
"usefulness" means is up to the caller; :class:`selfdistill.methods.skillsd.source.Skills` credits a skill with how much
it moved the teacher towards the better rollouts of a group (see there). The bank is plain data: it saves as
readable JSON and ``selfdistill skills PATH`` prints it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RETRIEVALS = ("ucb", "similarity", "recent")
SEEDED_TASK = "*"  # the task tag of seeded skills: they serve every task
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class Skill:
    id: int
    task: str  # the task tag it is filed under
    text: str
    step: int  # the optimizer step at which it was written
    source_reward: float | None  # the reward of the trajectory it summarises
    uses: int = 0  # times it was credited
    value: float = 0.0  # sum of the usefulness credited to it
    duplicates: int = 0  # near-duplicates merged into it
    seeded: bool = False  # given by the user (``seed_skills``): shown for every task, never evicted

    @property
    def mean(self) -> float:
        return self.value / self.uses if self.uses else 0.0


class SkillBank:
    """Args:
        max_per_task: at most this many skills per task tag; beyond it the tried skill with the lowest mean
            usefulness is dropped (the oldest when none has been tried).
        dedupe_threshold: a new skill whose word set has Jaccard similarity >= this with a skill of the same task is
            a duplicate: it is merged (counted) instead of added.
        retrieval: ``ucb``, ``similarity`` or ``recent``.
        top_k: skills retrieved per task.
        exploration: the UCB exploration constant.
        min_words: shorter texts are not skills (an empty or broken summary).
    """

    def __init__(self, max_per_task: int = 8, dedupe_threshold: float = 0.7, retrieval: str = "ucb",
                 top_k: int = 2, exploration: float = 1.0, min_words: int = 4):
        if retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval={retrieval!r}; choose one of {RETRIEVALS}")
        if max_per_task < 1 or top_k < 1:
            raise ValueError(f"max_per_task={max_per_task} and top_k={top_k} must be >= 1")
        if not 0.0 < dedupe_threshold <= 1.0:
            raise ValueError(f"dedupe_threshold={dedupe_threshold} must be in (0, 1]")
        self.max_per_task, self.dedupe_threshold, self.retrieval = max_per_task, dedupe_threshold, retrieval
        self.top_k, self.exploration, self.min_words = top_k, exploration, min_words
        self.skills: dict[int, Skill] = {}
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.skills)

    def for_task(self, task: str) -> list[Skill]:
        """The skills filed under ``task`` plus the seeded ones, which serve every task."""
        return [s for s in self.skills.values() if s.task == task or s.seeded]

    def seed(self, texts: list[str]) -> list[Skill]:
        """File skills a user wrote (a strategy known to work): retrieved for every task and never evicted by the
        cap. A text already seeded is skipped, so seeding again after a resume adds nothing."""
        added = []
        have = {s.text for s in self.skills.values() if s.seeded}
        for text in texts:
            text = " ".join(str(text).split())
            if not text or text in have:
                continue
            skill = Skill(id=self.next_id, task=SEEDED_TASK, text=text, step=0, source_reward=None, seeded=True)
            self.skills[skill.id] = skill
            self.next_id += 1
            have.add(text)
            added.append(skill)
        return added

    # ------------------------------------------------------------------------------------------------ writing
    def add(self, task: str, text: str, step: int = 0, source_reward: float | None = None) -> Skill | None:
        """File a skill; returns it, or None when it was too short or merged into a near-duplicate."""
        text = " ".join(text.split())
        bag = words(text)
        if len(bag) < self.min_words:
            return None
        for skill in self.for_task(task):
            if jaccard(bag, words(skill.text)) >= self.dedupe_threshold:
                skill.duplicates += 1
                return None
        skill = Skill(id=self.next_id, task=task, text=text, step=step, source_reward=source_reward)
        self.skills[skill.id] = skill
        self.next_id += 1
        self._cap(task, keep=skill.id)
        return skill

    def _cap(self, task: str, keep: int) -> None:
        while sum(not s.seeded for s in self.for_task(task)) > self.max_per_task:
            candidates = [s for s in self.for_task(task) if s.id != keep and not s.seeded]
            if not candidates:
                return
            tried = [s for s in candidates if s.uses]
            victim = min(tried, key=lambda s: (s.mean, s.id)) if tried else min(candidates, key=lambda s: s.id)
            del self.skills[victim.id]

    def credit(self, skill_ids: list[int], value: float) -> None:
        """Record one observation of usefulness for each skill (skills dropped since are skipped)."""
        if not math.isfinite(value):
            return
        for sid in skill_ids:
            if sid in self.skills:
                self.skills[sid].uses += 1
                self.skills[sid].value += value

    # ---------------------------------------------------------------------------------------------- reading
    def ucb(self, skill: Skill) -> float:
        if not skill.uses:
            return math.inf
        total = sum(s.uses for s in self.for_task(skill.task))
        return skill.mean + self.exploration * math.sqrt(math.log(total + 1) / skill.uses)

    def retrieve(self, task: str, query: str = "") -> list[Skill]:
        """The ``top_k`` skills to show the teacher for a rollout of ``task`` (``query``: its task text)."""
        if self.retrieval == "similarity":
            q = words(query)
            pool = list(self.skills.values())
            pool.sort(key=lambda s: (jaccard(q, words(s.text)) + (s.task == task or s.seeded), s.id), reverse=True)
            return pool[: self.top_k]
        pool = self.for_task(task)
        if self.retrieval == "recent":
            return sorted(pool, key=lambda s: s.id, reverse=True)[: self.top_k]
        # Untried skills first (newest first), then by upper confidence bound.
        return sorted(pool, key=lambda s: (self.ucb(s), s.id), reverse=True)[: self.top_k]

    # ----------------------------------------------------------------------------------------------- saving
    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": {"max_per_task": self.max_per_task, "dedupe_threshold": self.dedupe_threshold,
                         "retrieval": self.retrieval, "top_k": self.top_k, "exploration": self.exploration,
                         "min_words": self.min_words},
            "next_id": self.next_id,
            "skills": [asdict(s) for s in sorted(self.skills.values(), key=lambda s: s.id)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skills = {s["id"]: Skill(**s) for s in state.get("skills", [])}
        self.next_id = int(state.get("next_id", max(self.skills, default=-1) + 1))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SkillBank:
        bank = cls(**state.get("settings", {}))
        bank.load_state_dict(state)
        return bank

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.state_dict(), indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SkillBank:
        """A bank from ``skills.json``, a checkpoint's ``privileged_source.json``, or a folder holding either."""
        path = Path(path)
        if path.is_dir():
            for name in ("skills.json", "privileged_source.json"):
                if (path / name).exists():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"{path} holds neither skills.json nor privileged_source.json")
        state = json.loads(path.read_text())
        if "bank" in state:  # a Skills source's checkpoint state
            state = state["bank"]
        if "skills" not in state:
            raise ValueError(f"{path} is not a skill bank (no 'skills' list); point at a Skill-SD run's skills.json")
        return cls.from_state(state)

    def format(self) -> str:
        """The bank as text, grouped by task, best first."""
        if not self.skills:
            return "(the skill bank is empty)"
        lines = []
        for task in sorted({s.task for s in self.skills.values()}):
            skills = sorted(self.for_task(task), key=lambda s: (s.uses > 0, s.mean), reverse=True)
            lines.append(f"== {task}: {len(skills)} skills ==")
            for s in skills:
                stats = f"used {s.uses}x, mean usefulness {s.mean:+.3f}" if s.uses else "not used yet"
                reward = "" if s.source_reward is None else f", from a trajectory with reward {s.source_reward:g}"
                merged = f", {s.duplicates} duplicates merged" if s.duplicates else ""
                lines.append(f"[{s.id}] (step {s.step}; {stats}{reward}{merged})\n    {s.text}")
        return "\n".join(lines)
