"""The environment interface for multi-turn rollouts.

An environment follows TRL's ``environment_factory`` conventions where they exist: one instance per rollout,
``reset(**task)`` returns the text appended to the task prompt's last user message, and ``get_reward()`` scores
the finished episode from the environment's own state. Unlike TRL's tool-calling environments, the model talks to
these in plain text: each assistant reply is one action, ``step(reply)`` answers with the observation that becomes
the next user message. A reply the environment cannot parse is answered with feedback, never an exception.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass
class StepResult:
    """What the environment answers to one action."""

    observation: str  # shown to the model as the next user message (ignored once ``done``)
    reward: float  # reward of this step; the episode's score is ``Environment.get_reward()``
    done: bool  # the episode is over (solved, failed, or out of turns)
    valid: bool = True  # False when the reply could not be parsed as an action


class Environment(ABC):
    """A text environment for one episode. Subclasses set ``name`` and implement the three methods."""

    #: The name recipes use (``env.type``).
    name: str = "environment"
    #: The episode ends after this many actions, solved or not.
    max_turns: int = 8

    @abstractmethod
    def reset(self, **task: Any) -> str:
        """Start the episode described by a dataset row's fields; returns the first observation."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply the model's reply (free text) and return the observation."""

    #: Whether the episode's goal is reached (an attribute or a property kept current by ``step``).
    solved: bool = False

    def get_reward(self) -> float:
        """The finished episode's score: 1.0 when solved, else 0.0 (override for graded rewards)."""
        return 1.0 if self.solved else 0.0

    @property
    def success(self) -> bool:
        return self.get_reward() >= 1.0

    @classmethod
    def task_tag(cls, row: dict[str, Any]) -> str:
        """The label skills are filed under: rows of the same kind of task share it."""
        return str(row.get("task") or cls.name)

    @classmethod
    @abstractmethod
    def make_rows(cls, n: int, seed: int, split: str, **kwargs: Any) -> list[dict[str, Any]]:
        """``n`` dataset rows (a ``prompt`` plus the fields ``reset`` reads) for a split, deterministic in seed."""


def split_seed(seed: int, split: str) -> int:
    """Separate, reproducible random streams for train and test rows."""
    return seed * 1_000_003 + {"train": 1, "test": 2}.get(split, 3)
