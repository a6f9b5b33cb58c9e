"""Moved to ``selfdistill.methods.sdzero.srt`` (one package per method);
this import path stays as an alias of it."""

import sys

from selfdistill.methods.sdzero import srt as _module

sys.modules[__name__] = _module
