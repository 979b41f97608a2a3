"""The items of ``snakemake --report``: per job its shards' plot and its plan page; per measured job its scores.

- :func:`write_shard_plot`: wall time, peak RSS and items of each shard against its id
  (matplotlib, SVG), earlier attempts that failed, were interrupted or killed marked,
  with the throughput and the slowest shard in the title. The numbers are the shards'
  own records (:mod:`espnet3_rules.engine.attempts`): a shard run by the fork server is
  a child the shard rule's process never sees, so Snakemake's benchmark would not measure it.
- :func:`write_plan_page`: the job description as configured, the plan (shards, items,
  fingerprint), a table of the shards' attempts, and the versions it ran with.
- :func:`write_scores_page`: the job's ``metrics.json`` as metric x test set, with each
  metric's error counts where its alignment artifact holds them, and what was scored against what.
"""

from __future__ import annotations

import html
import importlib.metadata
import json
import platform
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from espnet3_rules.engine.attempts import read_attempts
from espnet3_rules.engine.files import atomic_path
from espnet3_rules.engine.plan import ShardPlan

#: The distributions whose versions the plan page lists (those installed).
VERSIONED = ("espnet3-rules", "snakemake", "snakemake-executor-plugin-slurm", "torch", "numpy", "jiwer", "espnet")
#: The summary line ESPnet3's WER/CER ``write_artifacts`` ends ``<test>/<name>_alignment`` with.
ALIGNMENT_SUMMARY = re.compile(r"^(\w+): [\d.]+ \(hits=(\d+), substitutions=(\d+), deletions=(\d+), insertions=(\d+)\)$", re.M)
#: Above this many shards the plot's bars are a bitmap inside the SVG (10,000 vector bars are megabytes).
MANY_SHARDS = 500
PAGE_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}th{background:#eee}"
    "td.l,th.l{text-align:left}pre{background:#f6f6f6;padding:.6em;overflow:auto}.bad{color:#b00}"
)


@dataclass
class ShardRecord:
    """One shard as the report shows it: its items and the attempts of the run that finished it."""

    shard: int
    items: int
    attempts: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> Optional[Dict[str, Any]]:
        """The attempt that finished the shard (``None`` where none did)."""
        return self.attempts[-1] if self.attempts and self.attempts[-1]["outcome"] == "done" else None

    @property
    def earlier(self) -> List[Dict[str, Any]]:
        """The attempts before the final one (failed, interrupted, or killed: outcome ``None``)."""
        return self.attempts[:-1] if self.final else self.attempts

    @property
    def wall_s(self) -> Optional[float]:
        """Wall time of the final attempt."""
        return self.final["ended"] - self.final["started"] if self.final else None


def shard_records(plan: ShardPlan) -> List[ShardRecord]:
    """Every shard of ``plan`` with its item count (indices, not batches) and its attempts."""
    batched = plan.job.batch_size is not None
    return [
        ShardRecord(i, sum(len(batch) for batch in items) if batched else len(items),
                    read_attempts(plan.shard_dir(i), plan.fingerprint))
        for i, items in enumerate(plan.shards)
    ]


def throughput_line(records: Sequence[ShardRecord]) -> str:
    """Items per second from the first shard's start to the last one's end, and the slowest shard."""
    finished = [r for r in records if r.final]
    if not finished:
        return "no shard has finished"
    span = max(r.final["ended"] for r in finished) - min(r.final["started"] for r in finished)
    items = sum(r.items for r in finished)
    slowest = max(finished, key=lambda r: r.wall_s)
    median = statistics.median(r.wall_s for r in finished)
    rate = f"{items / span:.1f} items/s" if span > 0 else "items/s: n/a"
    ratio = f" ({slowest.wall_s / median:.1f}x the median)" if median > 0 else ""
    return f"{items} items in {span:.3g} s: {rate}; slowest split.{slowest.shard} {slowest.wall_s:.3g} s{ratio}"


def write_shard_plot(plan: ShardPlan, records: Sequence[ShardRecord], path: Path) -> None:
    """The shards' wall time, peak RSS and items against shard id, as SVG at ``path``."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure state

    ids = [r.shard for r in records]
    many = len(ids) > MANY_SHARDS
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    wall, memory, items = fig.subplots(3, 1, sharex=True)
    fig.suptitle(f"{plan.job.label}: {plan.n_shards} shards\n{throughput_line(records)}", fontsize=10)
    wall.bar(ids, [r.wall_s or 0 for r in records], color="tab:blue", label="final attempt", rasterized=many)
    retried = [(r.shard, a) for r in records for a in r.earlier]
    if retried:
        wall.scatter([shard for shard, _ in retried], [(a["ended"] or a["updated"]) - a["started"] for _, a in retried],
                     marker="x", color="tab:red", zorder=3, label="earlier attempt (failed, interrupted, killed)")
    wall.set_ylabel("wall time (s)")
    wall.legend(fontsize=8, loc="upper right")
    memory.bar(ids, [r.final["peak_rss_mb"] if r.final else 0 for r in records], color="tab:green", rasterized=many)
    memory.set_ylabel("peak RSS (MB)")
    items.bar(ids, [r.items for r in records], color="tab:gray", rasterized=many)
    items.set_ylabel("items")
    items.set_xlabel("shard id (split.N)")
    if len(ids) <= 40:
        items.set_xticks(ids)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="svg")


def versions() -> Dict[str, str]:
    """Python, the platform, and every installed distribution of :data:`VERSIONED`."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned (names), the others right (numbers)."""
    def cells(tag: str, values: Sequence[Any]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{html.escape(str(v))}</{tag}>" for i, v in enumerate(values))

    return ("<table><tr>" + cells("th", header) + "</tr>"
            + "".join("<tr>" + cells("td", row) + "</tr>" for row in rows) + "</table>")


def write_page(path: Path, title: str, body: str) -> None:
    """A standalone HTML page (the report shows it in a frame)."""
    page = (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def outcome_of(attempt: Mapping[str, Any]) -> str:
    """An attempt's outcome as the tables show it (one that never ended was killed)."""
    return attempt["outcome"] or "killed"


def write_plan_page(plan: ShardPlan, records: Sequence[ShardRecord], path: Path) -> None:
    """The job description, the plan, each shard's attempts, and the versions, as HTML at ``path``."""
    rows = []
    for record in records:
        for n, attempt in enumerate(record.attempts, 1):
            end = attempt["ended"] or attempt["updated"]
            rows.append([f"split.{record.shard}", n, outcome_of(attempt), record.items,
                         f"{attempt['resumed_at']}", f"{end - attempt['started']:.2f}",
                         f"{attempt['cpu_s']:.2f}" if "cpu_s" in attempt else "",  # none for a killed attempt
                         f"{attempt['peak_rss_mb']:.0f}" if "peak_rss_mb" in attempt else "",
                         attempt["host"], attempt["slurm_job_id"] or "", attempt["error"] or ""])
    job = {key: value for key, value in plan.job.to_dict().items() if value not in (None, "", {}, [])}
    unit = "batch" if plan.job.batch_size else "item"
    body = (
        f"<p>{html.escape(plan.summary())}<br>fingerprint <code>{plan.fingerprint}</code><br>"
        f"{html.escape(throughput_line(records))}</p>"
        "<h2>Shards</h2>"
        + table(["shard", "attempt", "outcome", "items", f"resumed at ({unit})", "wall (s)", "CPU (s)", "peak RSS (MB)",
                 "host", "SLURM job", "error"], rows, left=1)
        + "<h2>Job</h2><pre>" + html.escape(yaml.safe_dump(job, sort_keys=False)) + "</pre>"
        + "<h2>Versions</h2>" + table(["package", "version"], list(versions().items()), left=2)
    )
    write_page(path, f"{plan.job.label}: plan and shards", body)


def error_counts(test_dir: Path, metric_key: str) -> Optional[Dict[str, int]]:
    """``{hits, substitutions, deletions, insertions}`` from ``<test_dir>/<key>_alignment``'s summary line, if any."""
    try:
        text = (test_dir / f"{metric_key.lower()}_alignment").read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    found = [m for m in ALIGNMENT_SUMMARY.finditer(text) if m.group(1) == metric_key]
    if not found:
        return None
    hits, sub, dele, ins = (int(g) for g in found[-1].groups()[1:])
    return {"hits": hits, "substitutions": sub, "deletions": dele, "insertions": ins}


def score_cell(value: Any, counts: Optional[Dict[str, int]]) -> str:
    """One table cell: the score, and ``S/D/I of N`` where the counts are known."""
    if counts is None:
        return str(value)
    n = counts["hits"] + counts["substitutions"] + counts["deletions"]
    return f"{value} ({counts['substitutions']}S {counts['deletions']}D {counts['insertions']}I / {n})"


def source_of(source: str) -> str:
    """Where a metric input is read from: ``<test set>/<stem>.scp``, or the test set's dataset column."""
    column = source.partition("dataset:")[2] if source.startswith("dataset:") else None
    return f"the test set's dataset column {column!r}" if column else f"<test set>/{source}.scp"


def scored_against(measure: Mapping[str, Any]) -> List[str]:
    """One line per configured metric: what each of its inputs was read from."""
    lines = []
    for entry in measure.get("metrics", []):
        metric = entry.get("metric")
        name = metric.get("_target_") if isinstance(metric, Mapping) else metric
        inputs = "; ".join(f"{key} from {source_of(source)}" for key, source in (entry.get("inputs") or {}).items())
        lines.append(f"{name}: {inputs or 'its declared inputs'}")
    return lines


def write_scores_page(spec: Mapping[str, Any], path: Path) -> None:
    """The job's ``metrics.json`` (a ``measure_specs`` entry's ``output``) as metric x test set, as HTML."""
    results = json.loads(Path(spec["output"]).read_text(encoding="utf-8"))
    metrics_dir = Path(spec["output"]).parent
    test_sets = sorted({test for per_test in results.values() for test in per_test})
    rows = []
    for metric, per_test in results.items():
        short = metric.rsplit(".", 1)[-1]
        values = {test: value if isinstance(value, Mapping) else {short: value} for test, value in per_test.items()}
        for key in sorted({key for value in values.values() for key in value}):
            cells = [score_cell(values.get(test, {}).get(key, ""), error_counts(metrics_dir / test, key)) for test in test_sets]
            rows.append([key if key == short else f"{short} {key}", *cells])
    against = "".join(f"<li><code>{html.escape(line)}</code></li>" for line in scored_against(spec["measure"]))
    body = (
        table(["metric", *test_sets], rows)
        + "<p>Cells: score (substitutions S, deletions D, insertions I / reference length) where the metric's "
          "alignment artifact holds the counts.</p>"
        + f"<h2>Scored</h2><ul>{against}</ul><p>from <code>{html.escape(spec['output'])}</code></p>"
    )
    write_page(path, f"{spec['job']}: scores", body)
