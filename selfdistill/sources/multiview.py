"""Moved to ``selfdistill.methods.avsd.source`` (one package per method);
this import path stays as an alias of it."""

import sys

from selfdistill.methods.avsd import source as _module

sys.modules[__name__] = _module
