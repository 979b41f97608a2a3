"""``snakemake --report`` (issue 15): the report items the workflow makes, and the report in a real browser.

The fast tests build the items from real shard runs (a failed then rerun shard, a scored job's
``metrics.json`` and alignment artifacts). The end-to-end test runs the default job, then
``snakemake --report report.html``, opens it in headless Chromium (Debian's ``chromium``, driven by
Playwright) as a user would, and checks the scores table's cells against ``metrics.json`` and that the
shards plot is drawn. Without Chromium or Playwright it is skipped with the reason; under ``CI`` it fails.
"""

import io
import json
import os
import re
import shutil

import pytest

import toys as fx
from espnet3_rules.cli.report import error_counts, shard_records, throughput_line, write_plan_page, write_scores_page, write_shard_plot
from espnet3_rules.engine.plan import read_manifest

WER = "espnet3_rules.systems.esp2_asr.metrics.wer.WER"


@pytest.fixture
def retried_plan(tmp_path, monkeypatch):
    """A 2-shard job whose shard 1 failed once, then was rerun: its plan."""
    config = fx.write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), n_shards=2,
                             runner="toys.ProbeTextRunner", provider="toys.SampleProvider", provider_config={"n": 6})
    fx.run_main("plan", "--config", config, "--job", "j")
    manifest = tmp_path / "out" / "manifest.json"
    for shard in (0, 1):
        env = {fx.FAIL_AT: "4"} if shard == 1 else {}
        fx.cli("run-shard", "--manifest", manifest, "--shard", shard, env=env, check=False)
    fx.cli("run-shard", "--manifest", manifest, "--shard", 1)
    return read_manifest(manifest)


def test_shard_records_keep_the_failed_attempt_before_the_final_one(retried_plan):
    records = shard_records(retried_plan)
    assert [r.items for r in records] == [3, 3]
    assert [[a["outcome"] for a in r.attempts] for r in records] == [["done"], ["failed", "done"]]
    assert [len(r.earlier) for r in records] == [0, 1] and all(r.wall_s > 0 for r in records)
    line = throughput_line(records)
    assert re.fullmatch(r"6 items in [\d.e+-]+ s: [\d.]+ items/s; slowest split\.[01] [\d.e+-]+ s \([\d.]+x the median\)", line)


def test_shard_plot_marks_the_earlier_attempt_and_names_the_slowest_shard(retried_plan, tmp_path):
    records = shard_records(retried_plan)
    write_shard_plot(retried_plan, records, tmp_path / "shards.svg")
    svg = (tmp_path / "shards.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    slowest = max(records, key=lambda r: r.wall_s).shard
    # matplotlib writes text as paths with the string in a comment (svg.fonttype "path")
    for text in ("j: 2 shards", f"slowest split.{slowest}", "earlier attempt (failed, interrupted, killed)",
                 "wall time (s)", "peak RSS (MB)", "shard id (split.N)"):
        assert f"<!-- {text}" in svg or text in svg, text


def test_plan_page_lists_every_attempt_the_fingerprint_and_versions(retried_plan, tmp_path):
    write_plan_page(retried_plan, shard_records(retried_plan), tmp_path / "plan.html")
    page = (tmp_path / "plan.html").read_text()
    assert retried_plan.fingerprint in page and retried_plan.summary() in page
    rows = re.findall(r"<tr><td class=l>(split\.\d)</td><td>(\d)</td><td>(\w+)</td>", page)
    assert rows == [("split.0", "1", "done"), ("split.1", "1", "failed"), ("split.1", "2", "done")]
    assert "RuntimeError: forward failed at item 4" in page
    assert re.search(r"<td class=l>snakemake</td><td class=l>\d+\.\d+", page)


def test_scores_page_is_metric_by_test_set_with_error_counts(tmp_path):
    out = tmp_path / "decode"
    for test in ("dev", "eval"):
        (out / test).mkdir(parents=True)
    (out / "dev" / "wer_alignment").write_text("REF: a b\nHYP: a c\n\nWER: 50.00 (hits=1, substitutions=1, deletions=0, insertions=0)\n")
    results = {WER: {"dev": {"WER": 50.0}, "eval": {"WER": 12.5}}, "pkg.Score": {"dev": 0.7, "eval": 0.9}}
    (out / "metrics.json").write_text(json.dumps(results))
    spec = {"job": "decode", "output": str(out / "metrics.json"),
            "measure": {"metrics": [{"metric": WER, "inputs": {"hyp": "hyp", "ref": "dataset:text"}}]}}
    write_scores_page(spec, tmp_path / "scores.html")
    page = (tmp_path / "scores.html").read_text()
    cells = [re.findall(r"<t[hd][^>]*>([^<]*)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)][:3]
    assert cells == [["metric", "dev", "eval"], ["WER", "50.0 (1S 0D 0I / 2)", "12.5"], ["Score", "0.7", "0.9"]]
    assert f"{WER}: hyp from &lt;test set&gt;/hyp.scp; ref from the test set&#x27;s dataset column &#x27;text&#x27;" in page
    assert error_counts(out / "eval", "WER") is None


# ----------------------------------------------------------------------------- the report in a browser
def browser():
    """Playwright and Debian's chromium, or a skip naming what is missing (a failure under ``CI``)."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[test]')"
    chromium = shutil.which("chromium")
    if problem is None and chromium is None:
        problem = "no chromium on PATH (Debian: apt-get install chromium)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem} (CI is set: the report's browser test must run)", pytrace=False)
        pytest.skip(problem)
    return sync_playwright, chromium


def non_white_fraction(png: bytes) -> float:
    """The fraction of pixels of a PNG screenshot that are not (near) white."""
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png), format="png")[..., :3]
    return float((pixels.min(axis=-1) < 0.9).mean())


def open_item(page, category, subcategory, name):
    """Click through the report's menu to one result, as a user does: category, subcategory, its eye button."""
    page.get_by_role("link", name=category, exact=True).click()
    page.get_by_role("link", name=subcategory, exact=True).click()
    page.locator("nav tr", has_text=name).locator("a").first.click()


def test_report_of_the_default_job_shows_the_scores_and_the_shards_in_chromium(default_job):
    sync_playwright, chromium = browser()
    wf = default_job
    wf.snakemake("--report", str(wf.path / "report.html"))
    metrics = json.loads((wf.path / "results/tone_asr/decode/metrics.json").read_text())
    test_sets = ["tone_dev", "tone_test"]

    with sync_playwright() as playwright:
        browser_ = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser_.new_page(viewport={"width": 1400, "height": 900})
        page.goto((wf.path / "report.html").as_uri())

        open_item(page, "tone_decode", "scores", "scores.html")
        frame = page.frame_locator("iframe")
        rows = [row.split("\t") for row in frame.locator("tr").all_inner_texts()]
        assert rows[0] == ["metric", *test_sets]
        expected = {path.rsplit(".", 1)[-1]: per_test for path, per_test in metrics.items()}
        assert [row[0] for row in rows[1:]] == list(expected) == ["WER", "CER"]
        for row in rows[1:]:
            for test, cell in zip(test_sets, row[1:]):
                value = expected[row[0]][test][row[0]]
                assert re.fullmatch(rf"{re.escape(str(value))} \(\d+S \d+D \d+I / \d+\)", cell), (row[0], test, cell)
        assert non_white_fraction(page.locator("iframe").screenshot()) > 0.01

        open_item(page, "tone_decode", "tone_dev", "shards.svg")
        plot = page.locator("img[src*='filename=shards.svg']")
        assert plot.evaluate("img => img.complete && img.naturalWidth") > 0, "the SVG plot loaded"
        shot = plot.screenshot()
        browser_.close()
    assert non_white_fraction(shot) > 0.05, "the shards plot is drawn (bars, axes), not blank"
