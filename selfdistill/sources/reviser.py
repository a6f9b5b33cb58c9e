"""Moved to ``selfdistill.methods.sdzero.source`` (one package per method);
this import path stays as an alias of it."""

import sys

from selfdistill.methods.sdzero import source as _module

sys.modules[__name__] = _module
