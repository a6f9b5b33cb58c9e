"""Moved to ``selfdistill.methods.avsd.combine`` (one package per method);
this import path stays as an alias of it."""

import sys

from selfdistill.methods.avsd import combine as _module

sys.modules[__name__] = _module
