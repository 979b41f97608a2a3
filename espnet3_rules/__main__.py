"""``python -m espnet3_rules``: run in a warm forked process where possible (see ``forkserver``)."""

import sys

from .forkserver import run_in_warm_process

status = run_in_warm_process("espnet3_rules.cli", sys.argv[1:])
if status is None:
    from .cli import main

    status = main()
sys.exit(status)
