"""Allow `python -m dativo`."""

import sys

from dativo.cli import main

sys.exit(main())
