"""Arms tests/faults.py in every Python process started with this directory on PYTHONPATH.

Only the fault-injection tests put it there, and it does nothing unless ESPNET3_RULES_FAULT is set.
"""

import os

if os.environ.get("ESPNET3_RULES_FAULT"):
    import faults

    faults.install()
