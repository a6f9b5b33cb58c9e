"""Moved to ``selfdistill.methods.skillsd.source`` (one package per method);
this import path stays as an alias of it."""

import sys

from selfdistill.methods.skillsd import source as _module

sys.modules[__name__] = _module
