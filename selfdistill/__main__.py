"""``python -m selfdistill`` (and ``accelerate launch -m selfdistill``) runs the command line."""

import sys

from selfdistill.cli import main

sys.exit(main())
