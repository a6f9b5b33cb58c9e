"""Objects named by dotted paths in recipes and sources (``pkg.mod:name`` or ``pkg.mod.name``): the bottom floor,
importing nothing of selfdistill, so that checks, sources and recipes can all use it."""

from __future__ import annotations

import importlib
from typing import Any


def split_dotted(target: str) -> tuple[str, str]:
    """``"pkg.mod:name"`` or ``"pkg.mod.name"`` -> ``("pkg.mod", "name")``; the module is ``""`` when not dotted."""
    module, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    return module, attr


def import_dotted(target: str, what: str, error: type[Exception] = ValueError) -> Any:
    """The object a dotted path names (rewards, views and sources given by path); ``error`` names what failed."""
    module, attr = split_dotted(target)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise error(f"{what} {target!r}: cannot import {attr!r} from {module!r} ({err})") from err
