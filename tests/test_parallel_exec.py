"""``runner(indices)`` with a parallel config: the pending shards run as Snakemake jobs (engine/snakemake_run)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import toys as fx
from espnet3_rules.engine import snakemake_run
from espnet3_rules.engine.cluster_options import shard_resources
from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.engine.job import JobSpec
from espnet3_rules.parallel import parallel
from espnet3_rules.parallel.parallel import set_parallel

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def no_parallel_config(monkeypatch):
    monkeypatch.setattr(parallel, "parallel_config", None)


def traced_runner(tmp_path, out, n, **extra_env):
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir(exist_ok=True)
    provider = fx.SampleProvider({"n": n, "extra_env": {"trace_dir": str(trace_dir), "calls_file": str(tmp_path / "calls"),
                                                        **extra_env}})
    return fx.TracedTextRunner(provider, output_dir=tmp_path / out, n_shards=2)


def traces(tmp_path):
    """pid -> (start, end, SLURM job) of every shard process."""
    result = {}
    for path in (tmp_path / "trace").iterdir():
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        result[int(path.name)] = (lines[0]["start"], lines[-1]["end"], lines[0]["slurm_job"])
    return result


def traces_pids(tmp_path):
    return [int(path.name) for path in (tmp_path / "trace").iterdir()]


def wait_for(predicate, limit_s=60.0):
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# ------------------------------------------------------------------ cluster options (fast)
def test_slurm_options_map_onto_shard_resources():
    options = {"queue": "gpu", "account": "lab", "cores": 4, "memory": "16GB", "walltime": "1-00:00:00",
               "job_extra_directives": ["--gres=gpu:a100:2", "--exclusive", "#SBATCH --mail-type=END"]}
    assert shard_resources("slurm", options) == {
        "slurm_partition": "gpu", "slurm_account": "lab", "threads": 4, "mem_mb": 15259, "runtime": 1440,
        "gpu": 2, "gpu_model": "a100", "slurm_extra": "--exclusive --mail-type=END"}


@pytest.mark.parametrize("options, resources", [
    ({"partition": "p"}, {"slurm_partition": "p"}),
    ({"memory": "4GiB"}, {"mem_mb": 4096}),
    ({"memory": "2000MB"}, {"mem_mb": 1908}),
    ({"job_mem": 2**30}, {"mem_mb": 1024}),  # a bare number is bytes, as in Dask
    ({"walltime": "01:00:00"}, {"runtime": 60}),
    ({"walltime": "30:00"}, {"runtime": 30}),
    ({"walltime": "00:00:30"}, {"runtime": 1}),
    ({"walltime": "1-12"}, {"runtime": 2160}),
    ({"walltime": 90}, {"runtime": 90}),
    ({"job_cpu": "2"}, {"threads": 2}),
    ({"job_extra_directives": ["--gpus=1"]}, {"gpu": 1}),
    ({"job_extra_directives": ["--gpus=v100:3"]}, {"gpu": 3, "gpu_model": "v100"}),
    ({"job_extra_directives": ["--gres=gpu:1", "--gpus=1"]}, {"gpu": 1}),  # the same twice is fine
    ({"job_extra": ["--mem=8G", "-t 2:00:00", "--cpus-per-task=3", "-p short", "--account=a"]},
     {"mem_mb": 8192, "runtime": 120, "threads": 3, "slurm_partition": "short", "slurm_account": "a"}),
    ({"processes": 1, "interface": "ib0", "log_directory": "x"}, {}),
])
def test_each_slurm_option_maps_to_its_resource(options, resources):
    assert shard_resources("slurm", options) == resources


def test_local_options_map_and_local_gpu_gives_every_shard_one_gpu():
    assert shard_resources("local", {"threads_per_worker": 2, "memory_limit": "1GiB"}) == {"threads": 2, "mem_mb": 1024}
    assert shard_resources("local_gpu", {}) == {"gpu": 1}


def test_dask_only_options_are_ignored_with_one_warning_naming_them(caplog):
    with caplog.at_level(logging.WARNING, logger="espnet3_rules.engine.cluster_options"):
        assert shard_resources("local", {"processes": True, "dashboard_address": ":0", "threads_per_worker": 1}) == {
            "threads": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "parallel.options ['dashboard_address', 'processes'] only tune Dask and are ignored here"]


@pytest.mark.parametrize("env, options, message", [
    ("slurm", {"qeue": "x"}, r"^parallel\.options \['qeue'\] not supported for env 'slurm'; supported: \['queue', "),
    ("local", {"queue": "x"}, r"^parallel\.options \['queue'\] not supported for env 'local'"),
    ("slurm", {"memory": "16 parsecs"}, r"^parallel\.options\.memory: unknown size unit in '16 parsecs'"),
    ("slurm", {"memory": [1]}, r"^parallel\.options\.memory: expected a size like '16GB', got \[1\]"),
    ("slurm", {"walltime": "1:2:3:4"}, r"^parallel\.options\.walltime: cannot read '1:2:3:4' as a time"),
    ("slurm", {"cores": 0}, r"^parallel\.options\.cores: expected a positive whole number, got 0$"),
    ("slurm", {"job_extra_directives": "--exclusive"}, r"job_extra_directives: expected a list of strings"),
    ("slurm", {"job_extra_directives": ["exclusive"]}, r"each directive is a string like '--gres=gpu:1'"),
    ("slurm", {"job_extra_directives": ["--gres=nvme:1"]}, r"--gres=nvme:1 is not a GPU request"),
    ("slurm", {"job_extra_directives": ["--gres=gpu:many"]}, r"cannot read a GPU count from 'gpu:many'"),
    ("slurm", {"job_extra_directives": ["--job-name=x"]}, r"plugin sets --job-name itself"),
    ("slurm", {"cores": 2, "job_extra_directives": ["-c 3"]}, r"sets threads=3, already 2 from another option"),
    ("pbs", {}, r"^parallel\.env 'pbs' has no cluster options here"),
])
def test_unsupported_or_unreadable_options_are_refused_naming_the_key(env, options, message):
    with pytest.raises(ContractError, match=message):
        shard_resources(env, options)


# ------------------------------------------------------------------ env checks (fast)
@pytest.mark.parametrize("env", ["htcondor", "lsf", "moab", "oar", "pbs", "sge", "ssh", "kube"])
def test_dask_jobqueue_envs_say_to_use_a_snakemake_executor_plugin(env):
    with pytest.raises(ContractError, match=rf"^parallel env '{env}' is not supported here; use a Snakemake "
                                            r"executor plugin with the workflow \(snakemake --executor \.\.\.\)"):
        snakemake_run.check_env_name(env)


def test_unknown_env_is_a_value_error_before_anything_is_written(tmp_path):
    set_parallel({"env": "mars", "n_workers": 2})
    runner = fx.MyTextRunner(fx.SampleProvider({"n": 4}), output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"^Unknown env: mars \(supported: local, local_gpu, slurm\)$"):
        runner(range(4))
    assert not (tmp_path / "out").exists()


def test_local_gpu_refuses_more_workers_than_gpus_and_warns_about_idle_ones(monkeypatch):
    monkeypatch.setenv("ESPNET3_RULES_GPUS", "2")
    with pytest.raises(ValueError, match=r"^n_workers=3 > num_gpus=2$"):
        snakemake_run.execution("local_gpu", 3, 1)
    with pytest.warns(UserWarning, match=r"^n_workers=1 < num_gpus=2, some GPUs may be idle\.$"):
        how = snakemake_run.execution("local_gpu", 1, 2)
    assert (how.executor, how.cores, how.resources) == ("local", 2, {"gpu": 1})


def test_classes_a_shard_process_cannot_import_are_refused_at_plan_time():
    job = JobSpec(name="j", runner="__main__.MyRunner", provider="toys.SampleProvider", output_dir="o")
    with pytest.raises(ContractError, match=r"^runner class MyRunner is defined in __main__, which a shard process "
                                            r"cannot import; move it to a module"):
        snakemake_run.check_importable(job)
    job = JobSpec(name="j", runner="toys.MyTextRunner", provider="tests.test_x.f.<locals>.P", output_dir="o")
    with pytest.raises(ContractError, match=r"^provider class P is defined inside a function"):
        snakemake_run.check_importable(job)


def test_the_entry_workflow_ships_with_the_package():
    assert snakemake_run.workflow_file().read_text().count('include: "rules/shard.smk"') == 1


# ------------------------------------------------------------------ Snakemake runs (e2e)
def test_two_workers_run_two_shards_at_once_with_the_serial_output(tmp_path):
    serial = traced_runner(tmp_path, "serial", 6)
    serial(range(6))
    shutil.rmtree(tmp_path / "trace")
    set_parallel({"env": "local", "n_workers": 2})
    runner = traced_runner(tmp_path, "par", 6, meet=2)
    runner(range(6))
    spans = traces(tmp_path)
    assert len(spans) == 2, "one process per shard"
    (start_a, end_a, _), (start_b, end_b, _) = spans.values()
    assert start_a < end_b and start_b < end_a, "the two shards ran at the same time"
    assert (tmp_path / "par" / "text").read_bytes() == (tmp_path / "serial" / "text").read_bytes()
    for i in range(2):
        assert (tmp_path / "par" / "logs" / f"split.{i}.log").exists()
        assert (tmp_path / "par" / f"split.{i}" / "done").exists()
        assert not (tmp_path / "par" / f"split.{i}" / "lock").exists()


def test_a_failed_shard_is_named_with_its_log_and_a_rerun_runs_only_it(tmp_path):
    set_parallel({"env": "local", "n_workers": 2})
    fail_file = tmp_path / "fail"
    fail_file.touch()
    runner = traced_runner(tmp_path, "out", 6, fail_item=4, fail_file=str(fail_file))
    root = tmp_path / "out"
    with pytest.raises(RuntimeError, match=rf"^1 shard\(s\) failed under Snakemake: shard 1 of {root} "
                                           rf"\(log: {root}/logs/split\.1\.log\)$"):
        runner(range(6))
    assert "forward failed at item 4" in (root / "logs" / "split.1.log").read_text()
    done_0, log_0 = root / "split.0" / "done", root / "logs" / "split.0.log"
    before = (done_0.stat().st_mtime_ns, log_0.read_bytes())
    assert not (root / "split.1" / "done").exists() and not (root / "split.1" / "lock").exists()

    fail_file.unlink()
    (tmp_path / "calls").unlink()
    runner(range(6))
    assert fx.read_lines(tmp_path / "calls") == ["3", "4", "5"], "only shard 1 ran again"
    assert (done_0.stat().st_mtime_ns, log_0.read_bytes()) == before
    assert (root / "text").read_text() == fx.expected_text(range(6))


def test_ctrl_c_cancels_the_running_shard_and_keeps_the_finished_one(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import toys as fx
        from espnet3_rules.parallel.parallel import set_parallel
        set_parallel({{"env": "local", "n_workers": 2}})
        provider = fx.SampleProvider({{"n": 4, "extra_env": {{"trace_dir": {str(tmp_path / 'trace')!r},
                                      "hold_item": 3, "hold_file": {str(hold)!r}}}}})
        fx.TracedTextRunner(provider, output_dir={str(tmp_path / 'out')!r}, n_shards=2)(range(4))
    """))
    (tmp_path / "trace").mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    root = tmp_path / "out"
    try:
        wait_for(lambda: (root / "split.0" / "done").exists() and len(list((tmp_path / "trace").iterdir())) == 2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert out.rstrip().endswith("KeyboardInterrupt"), out
    assert (root / "split.0" / "done").exists() and not (root / "split.1" / "done").exists()
    assert not (root / "split.1" / "lock").exists(), "the caller released its locks"
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in traces_pids(tmp_path)), limit_s=10)


@pytest.mark.skipif(shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0,
                    reason="no SLURM cluster here")
def test_slurm_env_runs_every_shard_as_an_sbatch_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    set_parallel({"env": "slurm", "n_workers": 2, "options": {"memory": "500MB", "walltime": "00:10:00"}})
    runner = traced_runner(tmp_path, "out", 4)
    runner(range(4))
    jobs = [slurm_job for _, _, slurm_job in traces(tmp_path).values()]
    assert len(jobs) == 2 and all(jobs) and len(set(jobs)) == 2, "each shard ran in its own SLURM job"
    assert (tmp_path / "out" / "text").read_text() == fx.expected_text(range(4))
