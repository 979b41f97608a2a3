"""``python -m espnet3_rules``: ``run-shard`` runs in a warm forked process where possible (see ``cli.forkclient``).

Only shards, many per job, go through the fork server; ``plan``, ``merge`` and ``measure`` run once
per job and would only wait there while the server imports what the shards used.
"""

import sys

from espnet3_rules.cli.forkclient import run_in_warm_process

status = run_in_warm_process(sys.argv[1:]) if sys.argv[1:2] == ["run-shard"] else None
if status is None:
    from espnet3_rules.cli.main import main

    status = main()
sys.exit(status)
