"""Privileged-information sources: one file per method."""

from selfdistill.sources.base import PrivilegedSource, Rollout, TeacherView
from selfdistill.sources.multiview import MultiView
from selfdistill.sources.reference import ReferenceSolution
from selfdistill.sources.reviser import Reviser
from selfdistill.sources.skills import Skills

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
