"""Privileged-information sources: one file per method."""

from selfdistill.methods.avsd.source import MultiView
from selfdistill.methods.opsd import ReferenceSolution
from selfdistill.methods.sdzero.source import Reviser
from selfdistill.methods.skillsd.source import Skills
from selfdistill.sources.base import PrivilegedSource, Rollout, TeacherView

#: Source types by the name recipes use (``source.type``).
SOURCES: dict[str, type[PrivilegedSource]] = {
    "reference": ReferenceSolution,
    "reviser": Reviser,
    "multiview": MultiView,
    "skills": Skills,
}

__all__ = [
    "SOURCES", "MultiView", "PrivilegedSource", "ReferenceSolution", "Reviser", "Rollout", "Skills", "TeacherView",
]
