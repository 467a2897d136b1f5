"""`python -m seg_dist <command> ...`, the same as `seg-dist <command> ...`."""

import sys

from seg_dist.cli import main

sys.exit(main())
