"""Moved to ``selfdistill.methods.sdpo`` (one package per method);
this import path stays as an alias of it."""

import sys

from selfdistill.methods import sdpo as _module

sys.modules[__name__] = _module
