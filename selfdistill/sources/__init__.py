"""Privileged-information sources: one file per method."""

from selfdistill.methods.avsd.source import MultiView
from selfdistill.methods.opsd import ReferenceSolution
from selfdistill.methods.sdzero.source import Reviser
from selfdistill.methods.skillsd.source import Skills
from selfdistill.sources.base import BUILTIN_SOURCES, PrivilegedSource, Rollout, TeacherView, builtin_source

#: Source types by the name recipes use (``source.type``).
SOURCES: dict[str, type[PrivilegedSource]] = {name: builtin_source(name) for name in BUILTIN_SOURCES}

__all__ = [
    "SOURCES", "MultiView", "PrivilegedSource", "ReferenceSolution", "Reviser", "Rollout", "Skills", "TeacherView",
]
