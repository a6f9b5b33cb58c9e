"""selfdistill: on-policy self-distillation for the Hugging Face training stack.

One model plays two roles: the student samples rollouts from the task alone; the teacher (the same network under
a teacher-weights policy) scores them with privileged information in its context; the student minimises a
clipped token-level reverse KL to the teacher on its own rollouts.
"""

from selfdistill.config import SelfDistillConfig
from selfdistill.losses import LossSpec, distillation_loss
from selfdistill.premises import diagnose
from selfdistill.sources import PrivilegedSource, ReferenceSolution, Rollout, TeacherView
from selfdistill.trainer import SelfDistillTrainer

__version__ = "0.1.0"

__all__ = [
    "LossSpec",
    "PrivilegedSource",
    "ReferenceSolution",
    "Rollout",
    "SelfDistillConfig",
    "SelfDistillTrainer",
    "TeacherView",
    "diagnose",
    "distillation_loss",
]
