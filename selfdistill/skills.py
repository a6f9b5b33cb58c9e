"""Moved to ``selfdistill.methods.skillsd.bank`` (one package per method);
this import path stays as an alias of it."""

import sys

from selfdistill.methods.skillsd import bank as _module

sys.modules[__name__] = _module
