"""Fork server for many short ``snakemake`` runs (dry-runs of the bad-input matrix).

Importing Snakemake costs a second or more per run; this process imports it once, then for
each request forks a child that runs Snakemake's own entry point (``snakemake.cli.main``, what
``python -m snakemake`` calls) with its output sent to a file, and answers with the exit code.

Protocol: one JSON request per line on stdin, ``{"argv": [...], "out": "<file>"}``; one line
with the exit code on stdout.
"""

import json
import os
import sys
import time
import traceback

import snakemake.api  # noqa: F401 - imported once, before forking
import snakemake.cli
import snakemake.report.html_reporter  # noqa: F401
import snakemake.storage  # noqa: F401

import espnet3_rules.cli.config  # noqa: F401

TIMEOUT_S = 120


def run_child(argv, out):
    """In the forked child: Snakemake's CLI with stdout and stderr in ``out``; never returns."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        snakemake.cli.main(argv)
        code = 0
    except SystemExit as exc:  # what the interpreter does with it
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - the child must never return into the server loop
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def wait(pid):
    """Exit code of child ``pid``; killed (-9) if it runs past TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
        time.sleep(0.01)


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request["argv"], request["out"])
        print(wait(pid), flush=True)


if __name__ == "__main__":
    serve()
