"""Command line the Snakemake rules call: ``python -m espnet3_rules plan|run-shard|merge|measure``
and ``report-job|report-scores`` (the report's items); ``status`` (where every job stands) and
``import-espnet3`` (an ESPnet3 recipe's inference/metrics YAML as a workflow config) by hand.

The other commands work on one job, named by ``--manifest`` (what the rules pass; the
manifest embeds the job description), by ``--job-json`` (``plan``), or by
``--config FILE --job NAME`` (for use by hand; ``NAME/TEST_SET`` for a test set).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.engine.job import JobSpec, build_provider, build_runner, check_classes, runner_class
from espnet3_rules.engine.plan import MANIFEST_NAME, ShardPlan, plan_job, read_manifest, write_manifest

#: The workflow's config, which ``status`` reads when given none.
DEFAULT_CONFIG = "config/config.yaml"


def _job_from_args(args: argparse.Namespace) -> JobSpec:
    if args.job_json:
        return JobSpec.from_json(args.job_json)
    if args.config and args.job:
        from espnet3_rules.cli.config import job_from_config, read_config

        return job_from_config(read_config(args.config), args.job)
    raise ContractError("name the job with --job-json, or with --config FILE --job NAME")


def _plan_from_args(args: argparse.Namespace) -> ShardPlan:
    if args.manifest:
        return read_manifest(args.manifest)
    return read_manifest(_job_from_args(args).root / MANIFEST_NAME)


def cmd_plan(args: argparse.Namespace) -> int:
    plan = plan_job(_job_from_args(args))
    path = write_manifest(plan)
    print(f"{path}: {plan.summary()}")
    return 0


def cmd_run_shard(args: argparse.Namespace) -> int:
    from espnet3_rules.cli.gpu import gpu_slots
    from espnet3_rules.engine.attempts import describe_usage, resource_usage
    from espnet3_rules.engine.shard import ShardInterrupted, build_worker_env, run_shard

    started = time.time()
    plan = _plan_from_args(args)
    plan.shard_dir(args.shard)  # refuses an id outside the plan before building anything
    check_classes(plan.job)
    with gpu_slots(args.gpus) as device:
        provider = build_provider(plan.job)
        env = build_worker_env(provider)
        env.setdefault("device", device)
        try:
            run_shard(runner_class(plan.job), plan, args.shard, env, type(provider).__name__,
                      stop_on_sigterm=True, log=args.log, started=started)
        except ShardInterrupted as exc:  # SIGTERM: committed; exit 128 + signal, no traceback
            print(error_line(args.command, exc), file=sys.stderr)
            return exc.exit_code
    print(f"{plan.shard_dir(args.shard)}: done ({len(plan.shards[args.shard])} items; {describe_usage(resource_usage())})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from espnet3_rules.engine.merge import merge_plan

    plan = _plan_from_args(args)
    merge_plan(build_runner(plan.job), plan)
    print(f"{plan.root}: merged {plan.n_shards} shards")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    import json

    from espnet3_rules.cli.measure import measure_job

    spec = json.loads(args.spec_json)
    results = measure_job(spec)
    for metric, per_test in results.items():
        print(f"{metric}: " + ", ".join(f"{test}={_headline(value)}" for test, value in per_test.items()))
    print(f"wrote {spec['output']}")
    return 0


def _headline(result):
    """The first number of a metric result (e.g. WER), for the one-line summary."""
    numbers = [v for v in result.values() if isinstance(v, (int, float))] if isinstance(result, dict) else []
    return numbers[0] if numbers else result


def cmd_report_job(args: argparse.Namespace) -> int:
    from espnet3_rules.cli.report import shard_records, write_plan_page, write_shard_plot

    plan = _plan_from_args(args)
    records = shard_records(plan)
    write_shard_plot(plan, records, Path(args.plot))
    write_plan_page(plan, records, Path(args.plan))
    print(f"wrote {args.plot} and {args.plan}")
    return 0


def cmd_report_scores(args: argparse.Namespace) -> int:
    import json

    from espnet3_rules.cli.report import write_scores_page

    write_scores_page(json.loads(args.spec_json), Path(args.out))
    print(f"wrote {args.out}")
    return 0


def cmd_import_espnet3(args: argparse.Namespace) -> int:
    from espnet3_rules.cli.import_espnet3 import convert, render

    sources = [args.inference_yaml, *([args.metrics_yaml] if args.metrics_yaml else [])]
    print(render(convert(args.inference_yaml, args.metrics_yaml), sources), end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from espnet3_rules.cli.config import jobs_from_config, read_config
    from espnet3_rules.cli.status import report_status, select_jobs

    if args.manifest:
        jobs = [read_manifest(args.manifest).job]
    else:
        jobs = select_jobs(jobs_from_config(read_config(args.config or DEFAULT_CONFIG)).values(), args.job)
    return report_status(jobs, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m espnet3_rules", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "plan": (cmd_plan, "validate a job and write its manifest.json"),
        "run-shard": (cmd_run_shard, "run one shard of a planned job"),
        "merge": (cmd_merge, "merge the shards of a planned job"),
        "status": (cmd_status, "per job: shards done, running (items done), failed (log), pending; exit 3 unless all done"),
        "measure": (cmd_measure, "score a job's merged test sets into <output_dir>/metrics.json"),
        "import-espnet3": (cmd_import_espnet3, "print the workflow config of an ESPnet3 inference (+ metrics) YAML"),
        "report-job": (cmd_report_job, "a planned job's report items: the shards' plot (SVG) and the plan page (HTML)"),
        "report-scores": (cmd_report_scores, "a measured job's report item: its metrics.json as a table (HTML)"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        if name in ("measure", "report-scores"):
            p.add_argument("--spec-json", required=True, help="the job's measure spec (what the rule passes)")
            if name == "report-scores":
                p.add_argument("--out", required=True, help="the HTML file to write")
            continue
        if name == "import-espnet3":
            p.add_argument("inference_yaml", help="the recipe's inference config (conf/inference.yaml)")
            p.add_argument("metrics_yaml", nargs="?", help="its metrics config (conf/metrics.yaml): the measure section")
            continue
        if name == "status":
            p.add_argument("--config", help=f"YAML config file (default: {DEFAULT_CONFIG})")
            p.add_argument("--job", help="only this job (or job/test_set) of the config")
            p.add_argument("--manifest", help="only the job of this manifest.json")
            p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
            continue
        p.add_argument("--config", help="YAML config file (with --job)")
        p.add_argument("--job", help="job name in the config")
        if name == "plan":
            p.add_argument("--job-json", help="the job description as JSON (what the Snakemake rule passes)")
        else:
            p.set_defaults(job_json=None)
            p.add_argument("--manifest", help="manifest.json of the job")
        if name == "report-job":
            p.add_argument("--plot", required=True, help="the SVG file to write: the shards' wall time, memory, items")
            p.add_argument("--plan", required=True, help="the HTML file to write: plan, attempts, versions")
        if name == "run-shard":
            p.add_argument("--shard", type=int, required=True, help="shard id N (split.N)")
            p.add_argument("--gpus", type=int, default=0, help="GPUs this shard holds (env key 'device')")
            p.add_argument("--log", help="the shard's log file (recorded in split.N/attempts.json for status)")
    return parser


def error_line(command: str, exc: BaseException) -> str:
    """``espnet3_rules CMD: error: [notes: ]message``; other than contract errors also name their type."""
    message = str(exc) if isinstance(exc, ContractError) else f"{type(exc).__name__}: {exc}"
    where = "".join(f"{note}: " for note in getattr(exc, "__notes__", ()))
    return f"espnet3_rules {command}: error: {where}{message}".replace("\n", " ")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; errors end in one line on stderr (a traceback first unless a contract error).

    Exit status: 2 for a contract error, 1 for any other error.
    """
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ContractError as exc:
        print(error_line(args.command, exc), file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - user code, I/O (disk full, permissions): traceback, then one line
        traceback.print_exc()
        print(error_line(args.command, exc), file=sys.stderr)
        return 1
