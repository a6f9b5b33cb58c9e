"""Privileged-information sources: one file per method."""

from selfdistill.sources.base import PrivilegedSource, Rollout, TeacherView
from selfdistill.sources.reference import ReferenceSolution

__all__ = ["PrivilegedSource", "ReferenceSolution", "Rollout", "TeacherView"]
