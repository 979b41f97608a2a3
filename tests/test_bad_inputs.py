"""Bad inputs (issue 6): each fails with one clear line naming the key, file or class, exits
non-zero and deletes nothing. Config and contract mistakes that need no provider fail at
``snakemake -n``; what needs the real provider fails the plan rule; what only shows while running
fails in that shard's (or the merge's) log. The last line of such a log is the error.

Every case runs in a copy of a working directory where job ``good`` already ran to the end, and
checks that its files (and everything else) survive byte for byte.
"""

import shutil
from pathlib import Path

import pytest
import yaml

from workflow_driver import Workflow, assert_kept, cli, job, snapshot

GOOD = job("good", n_items=4, n_shards=2)
DROP = object()
TEXT_JOB = job("a", n_items=4, n_shards=2)
INFERENCE_JOB = {
    "runner": "espnet3_rules.InferenceRunner",
    "provider": "toys.UttProvider",
    "provider_config": {"n_items": 4},
    "runner_kwargs": {"input_key": "text", "output_fn": "toys.hyp_fields"},
    "output_dir": "results",
    "shard_subdir": "a",
    "n_shards": 2,
}
LINES_JOB = {
    **INFERENCE_JOB,
    "provider": "toys.LinesProvider",
    "provider_config": {"path": "data/lines.txt"},
    "inputs": ["data/lines.txt"],
}


def jobs(base=TEXT_JOB, **change):
    """``{"jobs": {good, a}}`` with job ``a`` = ``base`` updated by ``change`` (``DROP`` removes a key)."""
    entry = {k: v for k, v in {**base, **change}.items() if v is not DROP}
    return {"jobs": {"good": GOOD, "a": entry}}


def copy_of(finished: Path, tmp_path: Path) -> Workflow:
    path = tmp_path / "wd"
    shutil.copytree(finished, path, symlinks=True)
    return Workflow(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A working directory where job ``good`` has run to the end."""
    wf = Workflow(tmp_path_factory.mktemp("finished"))
    wf.write_config({"good": GOOD})
    wf.snakemake("--cores", "2")
    assert (wf.path / "results/good/merge.done").exists()
    return wf.path


# id, config (a dict, or raw YAML text), files to create, the error line (ours) or Snakemake's message parts
DRY_RUN_CASES = [
    ("yaml-syntax", "jobs:\n  a: {runner: toys.PoisonTextRunner\n", {}, ["Config file is not valid JSON or YAML"]),
    ("missing-key", jobs(runner=DROP), {}, "config: jobs.a: 'runner' is a required property"),
    ("missing-output-dir", jobs(output_dir=DROP), {}, "config: jobs.a: 'output_dir' is a required property"),
    ("unknown-key", jobs(shards=2), {}, "config: jobs.a: Additional properties are not allowed ('shards' was unexpected)"),
    ("unknown-top-key", {**jobs(), "job": {}}, {},
     "config: (top level): Additional properties are not allowed ('job' was unexpected)"),
    ("unknown-resource", jobs(resources={"mem": 4000}), {},
     "config: jobs.a.resources: Additional properties are not allowed ('mem' was unexpected)"),
    ("n-shards-string", jobs(n_shards="2"), {}, "config: jobs.a.n_shards: '2' is not of type 'integer'"),
    ("batch-size-float", jobs(batch_size=2.5), {}, "config: jobs.a.batch_size: 2.5 is not of type 'integer', 'null'"),
    ("provider-config-list", jobs(provider_config=[4]), {}, "config: jobs.a.provider_config: [4] is not of type 'object'"),
    ("n-shards-zero", jobs(n_shards=0), {}, "config: jobs.a.n_shards: 0 is less than the minimum of 1"),
    ("n-shards-negative", jobs(n_shards=-2), {}, "config: jobs.a.n_shards: -2 is less than the minimum of 1"),
    ("batch-size-zero", jobs(batch_size=0), {}, "config: jobs.a.batch_size: 0 is less than the minimum of 1"),
    ("batch-size-negative", jobs(batch_size=-3), {}, "config: jobs.a.batch_size: -3 is less than the minimum of 1"),
    ("items-zero", jobs(items=0), {}, "config: jobs.a.items: 0 is less than the minimum of 1"),
    ("more-shards-than-items", jobs(n_shards=5), {},
     "jobs.a: n_shards (5) exceeds the number of items (4); lower n_shards"),
    ("more-shards-than-batches", jobs(n_shards=3, batch_size=2), {},
     "jobs.a: n_shards (3) exceeds the number of batches (2); lower n_shards"),
    ("runner-module-missing", jobs(runner="nopkg.decode.Runner"), {},
     "jobs.a.runner 'nopkg.decode.Runner': no module 'nopkg' can be imported"),
    ("runner-attribute-missing", jobs(runner="toys.Nope"), {},
     "jobs.a.runner 'toys.Nope': module 'toys' has no attribute 'Nope'"),
    ("runner-not-an-import-path", jobs(runner="PoisonTextRunner"), {},
     "config: jobs.a.runner: 'PoisonTextRunner' does not match"),
    ("provider-not-a-provider", jobs(provider="toys.PoisonTextRunner"), {},
     "jobs.a.provider 'toys.PoisonTextRunner' is not an EnvironmentProvider class (no build_env_local)"),
    ("runner-kwargs-unknown", jobs(runner_kwargs={"beam": 3}), {},
     "jobs.a.runner_kwargs do not fit PoisonTextRunner: got an unexpected keyword argument 'beam'"),
    ("params-not-accepted", jobs(params={"beam": 3}), {},
     "jobs.a.params given, but PoisonWordsProvider.__init__ takes no params argument"),
    ("forward-not-static", jobs(runner="toys.SelfRunner"), {}, "SelfRunner.forward must be a @staticmethod"),
    ("env-name-mismatch-declared", jobs(runner="toys.DeviceTextRunner", provider="toys.UttProvider"), {},
     "DeviceTextRunner.forward needs 'device' but UttProvider's env provides ['dataset', 'model', 'output_dir', "
     "'shard_subdir']"),
    ("output-fn-unresolvable", jobs(INFERENCE_JOB, runner_kwargs={"input_key": "text", "output_fn": "toys.nope"}),
     {}, "output_fn 'toys.nope': module 'toys' has no attribute 'nope'"),
    ("input-key-missing", jobs(INFERENCE_JOB, runner_kwargs={}), {}, "InferenceRunner needs input_key"),
    ("output-dir-in-config", jobs(output_dir="config/results"), {},
     "jobs.a.output_dir 'config/results' is inside the config directory"),
    ("output-dir-braces", jobs(output_dir="results/{x}"), {},
     "jobs.a.output_dir 'results/{x}' has braces, which Snakemake reads as wildcards; rename it"),
    ("shard-subdir-braces", jobs(shard_subdir="a{b}"), {},
     "jobs.a.shard_subdir 'a{b}' has braces, which Snakemake reads as wildcards; rename it"),
    ("shard-subdir-parent", jobs(shard_subdir=".."), {},
     "jobs.a.shard_subdir '..' must be a relative path inside output_dir (no '..', not absolute)"),
    ("shard-subdir-absolute", jobs(shard_subdir="/abs"), {},
     "jobs.a.shard_subdir '/abs' must be a relative path inside output_dir (no '..', not absolute)"),
    ("output-dir-root", jobs(output_dir="/"), {},
     "jobs.a.output_dir '/' is the filesystem root; name a directory for results"),
    ("jobs-empty", {"jobs": {}}, {}, "config: jobs: {} should be non-empty"),
    ("jobs-null", {"jobs": None}, {}, "config: jobs: None is not of type 'object'"),
    ("two-jobs-one-root", {"jobs": {"good": GOOD, "a": {**TEXT_JOB, "shard_subdir": "good"}}}, {},
     "jobs.a: output_dir/shard_subdir 'results/good' is also used by job 'good'"),
    ("empty-dataset", jobs(LINES_JOB), {"data/lines.txt": b"\n"}, "jobs.a: the dataset is empty: nothing to shard"),
    ("non-utf8-dataset", jobs(LINES_JOB), {"data/lines.txt": b"utt0 caf\xe9\n"},
     "LinesProvider.build_dataset() raised UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9"),
    ("missing-input-file", jobs(LINES_JOB), {},
     ["MissingInputException", "Missing input files for rule plan", "data/lines.txt"]),
]


@pytest.mark.parametrize("config, files, expected", [c[1:] for c in DRY_RUN_CASES], ids=[c[0] for c in DRY_RUN_CASES])
def test_bad_config_fails_the_dry_run(finished, snakemake_server, tmp_path, config, files, expected):
    wf = copy_of(finished, tmp_path)
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    (wf.path / "config.yaml").write_text(text, encoding="utf-8")
    for name, data in files.items():
        (wf.path / name).parent.mkdir(parents=True, exist_ok=True)
        (wf.path / name).write_bytes(data)
    before = snapshot(wf.path)

    code, out = wf.snakemake("-n", check=False, server=snakemake_server)

    assert code != 0
    if isinstance(expected, list):  # reported by Snakemake itself
        assert all(part in out for part in expected), out
    else:
        errors = [line for line in out.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("espnet3-rules: error: "), out
        assert expected in errors[0]
        assert "Traceback" not in out and 'File "' not in out
    assert snapshot(wf.path) == before, "a failed dry-run writes and deletes nothing"


def test_yaml_syntax_error_is_located_by_the_cli(tmp_path):
    """Snakemake's own message (case yaml-syntax) has no line number; the CLI gives FILE:LINE:COL."""
    (tmp_path / "config.yaml").write_text("jobs:\n  a: {runner: toys.PoisonTextRunner\n", encoding="utf-8")
    proc = cli("plan", "--config", "config.yaml", "--job", "a", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "espnet3_rules plan: error: config.yaml:3:1: not valid YAML (expected ',' or '}', but got '<stream end>')"
    ]


# Mistakes that show only in the plan rule or while running: job, its entry, the log and the error its
# last line names.
RUNTIME_CASES = [
    ("setup-returns-dict", {**TEXT_JOB, "provider": "toys.DictSetupProvider"},
     "plan", "DictSetupProvider.build_worker_setup_fn() returned a dict (the env itself); it must return a "
     "zero-argument setup function"),
    ("provider-init-raises", {**TEXT_JOB, "provider": "toys.BrokenInitProvider"},
     "plan", "RuntimeError: BrokenInitProvider cannot reach its model store"),
    # InferenceRunner's result and merge checks: their messages are asserted in test_inference_runner; here
    # that they end the log as one line, after the shard and item (a later shard's: the earlier one is done)
    ("space-in-id", {**INFERENCE_JOB, "provider_config": {"ids": ["u0", "u1", "u 2", "u3"]}},
     "split.1", "split.1 item 2: "),
    ("env-name-mismatch", {**TEXT_JOB, "provider": "toys.RenamedProvider"},
     "split.0", "PoisonTextRunner.forward needs 'dataset', 'model' but RenamedProvider's env provides ["),
    ("forward-raises", {**TEXT_JOB, "n_shards": 2},
     "split.1", "split.1 item 3: RuntimeError: poisoned item 3"),
    ("duplicate-ids", {**INFERENCE_JOB, "provider_config": {"ids": ["u0", "u1", "u0", "u1"]}},
     "merge", ""),
]


@pytest.fixture(scope="module")
def runtime_run(finished, tmp_path_factory):
    """One ``snakemake --keep-going`` over every runtime case (one job each) beside the finished job."""
    wf = copy_of(finished, tmp_path_factory.mktemp("runtime"))
    wf.write_config({"good": GOOD, **{name: {**entry, "shard_subdir": name} for name, entry, *_ in RUNTIME_CASES}})
    wf.poison(3)
    before = snapshot(wf.path)
    code, out = wf.snakemake("--cores", "2", "--keep-going", check=False)
    return wf, before, code, out


@pytest.mark.parametrize("name, entry, step, message", RUNTIME_CASES, ids=[c[0] for c in RUNTIME_CASES])
def test_runtime_mistake_ends_its_log_with_one_line(runtime_run, name, entry, step, message):
    wf, before, code, out = runtime_run
    root = wf.path / "results" / name
    log = f"results/{name}/logs/{step}.log"
    command = {"plan": "plan", "merge": "merge"}.get(step, "run-shard")
    assert code != 0
    assert log in out, "Snakemake must name the failing job's log"
    last = (wf.path / log).read_text(encoding="utf-8").splitlines()[-1]
    assert last.startswith(f"espnet3_rules {command}: error: ") and message in last, last
    assert not (root / "merge.done").exists()
    if step == "plan":
        assert not (root / "manifest.json").exists() and not list(root.glob("split.*"))
    elif step != "split.0":  # the shards before the failing one (all of them for a failed merge) are done
        assert (root / "split.0" / "done").exists()
    if step == "merge":
        assert not list(root.glob("*.scp")), "no merged file is put in place by a merge that fails its checks"
    assert_kept(before, wf.path)


def test_paths_with_spaces_and_unicode_ids_work(wf):
    ids = ["ütt_日本_0", "ütt_日本_1", "ça-2"]
    wf.write_config({
        "spaced": job("a b", n_items=4, n_shards=2, output_dir="my results/dé code"),
        "unicode": {**INFERENCE_JOB, "provider_config": {"ids": ids}, "shard_subdir": "unicode"},
    })
    wf.snakemake("--cores", "2")
    assert (wf.path / "my results/dé code/a b/text").read_text() == "".join(f"{i} W{i:04d}\n" for i in range(4))
    hyp = (wf.path / "results/unicode/hyp.scp").read_text(encoding="utf-8")
    assert hyp == "".join(f"{utt} W{i:04d}\n" for i, utt in enumerate(ids))
    _, out = wf.snakemake("--cores", "2")
    assert "Nothing to be done" in out
