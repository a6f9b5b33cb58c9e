"""Built-in multi-turn text environments (see :mod:`selfdistill.envs.base` for the interface)."""

from selfdistill.envs.base import Environment, StepResult
from selfdistill.envs.guess_number import GuessNumber
from selfdistill.envs.sokoban import Sokoban

#: Environments by the name recipes use (``env.type``).
ENVIRONMENTS: dict[str, type[Environment]] = {"guess_number": GuessNumber, "sokoban": Sokoban}

__all__ = ["ENVIRONMENTS", "Environment", "GuessNumber", "Sokoban", "StepResult"]
