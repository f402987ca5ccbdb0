"""`python -m moeviz.cli ...`: the `moeviz` command."""

import sys

from moeviz.cli import main

sys.exit(main())
