"""``python -m espnet3_rules``."""

import sys

from .cli import main

sys.exit(main())
