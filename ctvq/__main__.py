"""`python -m ctvq ...` runs the command line (the workflow calls it this way, independent of PATH)."""

import sys

from ctvq.cli import main

sys.exit(main())
