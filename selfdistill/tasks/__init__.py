"""Built-in tasks with verifiable answers."""

from selfdistill.tasks import arithmetic
from selfdistill.tasks.arithmetic import *  # noqa: F403 - the task's public names, listed once in its __all__

__all__ = list(arithmetic.__all__)
