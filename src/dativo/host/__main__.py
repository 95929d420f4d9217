"""`python -m dativo.host`: the entry point of every Python plugin image."""

import sys

from dativo.host import main

sys.exit(main())
