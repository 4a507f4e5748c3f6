import sys

from certdistill.cli import main

sys.exit(main())
