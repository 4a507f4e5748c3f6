"""``python -m certdistill``: the command line (see :mod:`certdistill.cli`)."""

import sys

from certdistill.cli import main

sys.exit(main())
