"""Commands for tests/test_forkserver.py, run as ``fs_target.main(argv)`` by the fork server."""

import importlib
import json
import os
import sys
import time

WARM_AT_START = sorted(name for name in sys.modules if name.startswith("fs_"))


def main(argv):
    command, *args = argv
    if command == "info":
        warm = sorted(name for name in sys.modules if name.startswith("fs_") and name != "fs_target")
        print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
                          "env": os.environ.get("FS_VALUE"), "stdin": sys.stdin.read(), "warm": warm}))
        print("to stderr", file=sys.stderr)
        return 0
    if command == "exit":
        return int(args[0])
    if command == "kill":
        os.kill(os.getpid(), int(args[0]))
    if command == "import":
        module = importlib.import_module(args[0])
        print(getattr(module, "VERSION", None))
        return 0
    if command == "sleep":
        with open(args[0], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
        return 0
    raise SystemExit(f"unknown command {command}")
