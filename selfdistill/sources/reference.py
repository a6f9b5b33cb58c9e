"""Moved to ``selfdistill.methods.opsd`` (one package per method);
this import path stays as an alias of it."""

import sys

from selfdistill.methods import opsd as _module

sys.modules[__name__] = _module
