"""`python -m racedit.cli ...`: the `racedit` command."""

import sys

from racedit.cli import main

sys.exit(main())
