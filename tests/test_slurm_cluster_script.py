"""scripts/slurm-cluster.sh, run in private mount and PID namespaces on other ports.

Fresh /run, /etc/slurm, spool, log and munge state directories are mounted inside the
namespaces, so the machine's own SLURM (if any) is neither seen nor touched; every daemon
started there dies with the namespace. Needs root, unshare and an installed slurm-wlm.
"""

import os
import random
import re
import shutil
import socket
import subprocess

import pytest

from workflow_driver import REPO

SCRIPT = REPO / "scripts" / "slurm-cluster.sh"


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("slurmctld"):
        return False
    probe = ["unshare", "--mount", "--pid", "--kill-child", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs root, unshare and slurm-wlm installed")

# Private copies of every path the script and the daemons write; then the steps under test.
SETUP = """
set -u
T="$1"
for d in etcslurm spoolctld spoold log libmunge logmunge; do mkdir -p "$T/$d"; done
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /var/lib/munge /var/log/munge
cp -a /etc/slurm/. "$T/etcslurm/"; rm -f "$T/etcslurm/slurm.conf"
chown munge:munge "$T/libmunge" "$T/logmunge"
mount -t tmpfs tmpfs /run
mount --bind "$T/etcslurm" /etc/slurm
mount --bind "$T/spoolctld" /var/spool/slurmctld
mount --bind "$T/spoold" /var/spool/slurmd
mount --bind "$T/log" /var/log/slurm
mount --bind "$T/libmunge" /var/lib/munge
mount --bind "$T/logmunge" /var/log/munge
S="$2"
step() { echo "@@ $*"; }
daemons() { echo "daemons: $(pgrep -x 'munged|slurmctld|slurmd' | wc -l)"; }
"""


def free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld, slurmd)."""
    for _ in range(50):
        port = random.randrange(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("", port))
                b.bind(("", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def run_isolated(tmp_path, steps: str) -> dict:
    """Run ``steps`` after SETUP; returns each ``step NAME`` section's output by NAME."""
    cmd = ["unshare", "--mount", "--pid", "--kill-child", "--mount-proc",
           "bash", "-c", SETUP + steps, "ns", str(tmp_path / "ns"), str(SCRIPT)]
    env = dict(os.environ, SLURM_CLUSTER_PORT=str(free_port_pair()))
    out = subprocess.run(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=240).stdout
    sections = re.split(r"^@@ (.+)$", out, flags=re.M)
    return dict(zip(sections[1::2], sections[2::2]))


def test_start_is_idempotent_runs_jobs_and_stop_stops_what_it_started(tmp_path):
    out = run_isolated(tmp_path, """
step status-before; $S status; echo "rc=$?"
step start; $S start; echo "rc=$?"
step start-again; $S start; echo "rc=$?"
step status; $S status; echo "rc=$?"
step jobs
j=$(sbatch --parsable --mem=100 --wrap hostname); srun --mem=100 hostname
k=$(sbatch --parsable --mem=100 --wrap 'sleep 120'); scancel "$k"
for _ in $(seq 100); do squeue -h --states=all -j "$j" -o %T | grep -q COMPLETED && break; sleep 0.2; done
echo "ids $j $k"; squeue -h --states=all -o '%i %T' | sort; cat "slurm-$j.out"
step stop; $S stop; echo "rc=$?"; daemons
step stop-again; $S stop; echo "rc=$?"
""")
    assert out["status-before"].rstrip().endswith("rc=1")
    assert re.search(r"node \S+ up: debug\* idle", out["start"]) and "rc=0" in out["start"]
    assert "already running" in out["start-again"] and "rc=0" in out["start-again"]
    assert "slurmd: running" in out["status"] and out["status"].rstrip().endswith("rc=0")
    host = socket.gethostname().split(".")[0]
    done, cancelled = re.search(r"^ids (\d+) (\d+)$", out["jobs"], re.M).groups()
    assert f"\n{done} COMPLETED\n" in out["jobs"] and f"\n{cancelled} CANCELLED\n" in out["jobs"]
    assert out["jobs"].count(host) == 2, "srun and the sbatch job both ran hostname"
    for name in ("slurmd", "slurmctld", "munged"):
        assert f"stopped {name}" in out["stop"]
    assert "daemons: 0" in out["stop"]
    assert out["stop-again"].strip() == "rc=0"


def test_a_slurm_and_munge_not_started_here_are_used_and_never_stopped(tmp_path):
    out = run_isolated(tmp_path, """
$S start >/dev/null 2>&1 && $S stop >/dev/null 2>&1   # leaves a slurm.conf behind
mkdir -p /run/munge && chown munge:munge /run/munge
su -s /bin/sh munge -c 'munged --pid-file=/run/munge/munged.pid'; slurmctld; slurmd
step start; $S start; echo "rc=$?"
step stop; $S stop; echo "rc=$?"; daemons
""")
    assert "not started by this script answers: using it" in out["start"] and "rc=0" in out["start"]
    assert "stopped" not in out["stop"] and "daemons: 3" in out["stop"]
