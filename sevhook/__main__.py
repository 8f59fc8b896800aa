"""`python -m sevhook`: the same command as `sevhook`."""

import sys

from sevhook.cli import main

sys.exit(main())
