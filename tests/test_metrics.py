"""WER/CER (hand-computed fixtures), the metric interface, dataset columns and measure()."""

from __future__ import annotations

import json
import logging
import wave

import pytest

import toys
from espnet3_rules import ContractError
from espnet3_rules.metrics import (
    CER,
    WER,
    BaseMetric,
    DatasetSource,
    dataset_column_scp,
    error_counts,
    export_dataset_column,
    measure,
    read_scp,
)

pytest.importorskip("jiwer")

# Hand-counted word errors (S/D/I) per utterance; N = reference words.
#   u1 the cat sat on the mat  | the cat sit on mat   S1 D1   N6
#   u2 hello world             | hello big world      I1      N2
#   u3 good morning everyone   | (no hypothesis)      D3      N3
#   u4 a b c d                 | a x c d              S1      N4
# WER = (2 + 4 + 1) / 15 = 46.67 %. By character (spaces count): N = 22+11+21+7 = 61,
# u1 S1 D4 ("the " gone), u2 I4 ("big "), u3 D21, u4 S1 -> CER = 31 / 61 = 50.82 %.
REFS_A = {"u1": "the cat sat on the mat", "u2": "hello world", "u3": "good morning everyone", "u4": "a b c d"}
HYPS_A = {"u4": "a x c d", "u2": "hello big world", "u1": "the cat sit on mat"}  # u3 missing, order shuffled
# Characters: c1 abc|abd S1 N3; c2 "ab cd"|abcd D1 N5; c3 xy|xyz I1 N2; c4 hi|- D2 N2 -> CER 5/12 = 41.67 %.
# Words:      c1 S1 N1; c2 S1 D1 N2; c3 S1 N1; c4 D1 N1 -> WER 5/5 = 100 %.
REFS_B = {"c1": "abc", "c2": "ab cd", "c3": "xy", "c4": "hi"}
HYPS_B = {"c1": "abd", "c2": "abcd", "c3": "xyz"}


def write_scp(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} {v}\n" for k, v in entries.items()), encoding="utf-8")
    return path


def score(metric, tmp_path, refs, hyps, test="t"):
    data = {"ref": write_scp(tmp_path / test / "ref.scp", refs), "hyp": write_scp(tmp_path / test / "hyp.scp", hyps)}
    return metric(data, test, tmp_path)


def test_wer_counts_match_hand_computed_fixture(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="espnet3_rules.metrics"):
        result = score(WER(), tmp_path, REFS_A, HYPS_A)
    assert result == {
        "WER": 46.67,
        "ref_words": 15,
        "substitutions": 2,
        "deletions": 4,
        "insertions": 1,
        "utterances": 4,
        "missing_hyp": 1,
    }
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 of 4 reference utterances have no hypothesis" in m and "u3" in m for m in messages)
    assert "sit" in (tmp_path / "t" / "wer_alignment").read_text(encoding="utf-8")


def test_cer_counts_match_hand_computed_fixtures(tmp_path):
    result = score(CER(), tmp_path, REFS_B, HYPS_B)
    assert {k: result[k] for k in ("CER", "ref_chars", "substitutions", "deletions", "insertions")} == {
        "CER": 41.67,
        "ref_chars": 12,
        "substitutions": 1,
        "deletions": 3,
        "insertions": 1,
    }
    counts = error_counts(list(REFS_A.values()), [HYPS_A.get(k, "") for k in REFS_A], "char")
    assert (counts.ref_length, counts.substitutions + counts.deletions + counts.insertions) == (61, 31)
    assert round(counts.rate * 100, 2) == 50.82


def test_extra_hypothesis_id_is_an_error(tmp_path):
    with pytest.raises(ContractError, match=r"hyp.scp: 1 id\(s\) not in the references .*\['zz'\]"):
        score(WER(), tmp_path, REFS_B, {**HYPS_B, "zz": "x"})


@pytest.mark.parametrize(
    "text, message",
    [
        ("a x\na y\n", "id 'a' appears twice"),
        ("a \xff\n", None),
    ],
)
def test_scp_reading_refuses_repeated_ids_and_non_utf8(tmp_path, text, message):
    path = tmp_path / "x.scp"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ContractError, match=message or "is not UTF-8"):
        read_scp(path)


def test_empty_references_are_an_error(tmp_path):
    with pytest.raises(ContractError, match="references are empty"):
        score(WER(), tmp_path, {"a": ""}, {"a": "x"})
    with pytest.raises(ContractError, match="no reference utterances"):
        score(WER(), tmp_path, {}, {})


def test_custom_metric_keys_and_iter_inputs_lockstep(tmp_path):
    metric = WER(ref_key="text", hyp_key="asr")
    assert metric.input_names == ("text", "asr")
    data = {"a": write_scp(tmp_path / "a.scp", {"u1": "x", "u2": "y"}), "b": write_scp(tmp_path / "b.scp", {"u1": "p"})}
    rows = metric.iter_inputs(data, "a", "b")
    assert next(rows) == ("u1", {"a": "x", "b": "p"})
    with pytest.raises(ContractError, match="length mismatch"):
        next(rows)
    data["b"] = write_scp(tmp_path / "b.scp", {"u2": "p", "u1": "q"})
    with pytest.raises(ContractError, match="id 'u2' where .*a.scp has 'u1'"):
        list(metric.iter_inputs(data, "a", "b"))


# ----------------------------------------------------------- dataset columns
def test_export_dataset_column_writes_scalars_and_artifacts_atomically(tmp_path):
    items = toys.speech_dataset(2)
    text = export_dataset_column(items, "text", tmp_path / "dataset" / "text.scp")
    assert text.read_text() == "utt0 word0 text\nutt1 word1 text\n"
    wav = {"type": "wav", "sample_rate": 8000}
    speech = export_dataset_column(items, "speech", tmp_path / "dataset" / "speech.scp", artifact_config=wav)
    (utt_id, path), = [read_scp(speech).popitem()]
    assert utt_id == "utt1" and path == (tmp_path / "dataset" / "speech" / "utt1.wav").resolve().as_posix()
    with wave.open(path) as w:
        assert (w.getnframes(), w.getframerate()) == (8, 8000)
    assert not list(tmp_path.rglob(".*.tmp.*"))


def test_export_dataset_column_uses_index_without_id_and_refuses_bad_items(tmp_path):
    out = tmp_path / "c.scp"
    assert export_dataset_column([{"text": "a"}, {"text": "b"}], "text", out).read_text() == "0 a\n1 b\n"
    with pytest.raises(ContractError, match=r"dataset\[1\] has no column 'text'"):
        export_dataset_column([{"text": "a"}, {"txt": "b"}], "text", out)
    with pytest.raises(ContractError, match="id 'x' appears twice"):
        export_dataset_column([{"utt_id": "x", "text": "a"}, {"utt_id": "x", "text": "b"}], "text", out)
    assert out.read_text() == "0 a\n1 b\n"  # failed exports left the earlier file untouched


def test_dataset_column_is_reused_only_for_the_same_source(tmp_path):
    builds = []

    def source(identity, texts):
        def build():
            builds.append(identity)
            return [{"utt_id": f"u{i}", "text": t} for i, t in enumerate(texts)]

        return DatasetSource(build=build, identity=identity)

    path = dataset_column_scp(tmp_path, "text", source({"v": 1}, ["a", "b"]))
    assert path == tmp_path / "dataset" / "text.scp" and path.read_text() == "u0 a\nu1 b\n"
    dataset_column_scp(tmp_path, "text", source({"v": 1}, ["changed"]))
    assert builds == [{"v": 1}] and path.read_text() == "u0 a\nu1 b\n"
    dataset_column_scp(tmp_path, "text", source({"v": 2}, ["c"]))
    assert builds == [{"v": 1}, {"v": 2}] and path.read_text() == "u0 c\n"
    dataset_column_scp(tmp_path, "text", source(None, ["d"]))
    assert path.read_text() == "u0 d\n"  # no identity: never reused


# ------------------------------------------------------------------- measure
WER_PATH = "espnet3_rules.metrics.WER"
WER_CFG = {"metric": WER_PATH, "inputs": {"ref": "dataset:text", "hyp": "hyp"}}
CER_CFG = {"metric": "espnet3_rules.metrics.CER", "inputs": {"ref": "dataset:text", "hyp": "hyp"}}


def datasets_for(refs_by_test, builds):
    def source(test, refs):
        def build():
            builds.append(test)
            return [{"utt_id": k, "text": v} for k, v in refs.items()]

        return DatasetSource(build=build, identity={"test": test})

    return {test: source(test, refs) for test, refs in refs_by_test.items()}


def test_measure_scores_every_test_set_and_writes_metrics_json(tmp_path):
    write_scp(tmp_path / "test_a" / "hyp.scp", HYPS_A)
    write_scp(tmp_path / "test_b" / "hyp.scp", HYPS_B)
    builds = []
    results = measure(
        [WER_CFG, CER_CFG],
        tmp_path,
        ["test_a", "test_b"],
        datasets=datasets_for({"test_a": REFS_A, "test_b": REFS_B}, builds),
    )
    assert {m: {t: r[m.rsplit(".", 1)[1]] for t, r in v.items()} for m, v in results.items()} == {
        "espnet3_rules.metrics.WER": {"test_a": 46.67, "test_b": 100.0},
        "espnet3_rules.metrics.CER": {"test_a": 50.82, "test_b": 41.67},
    }
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    assert builds == ["test_a", "test_b"]  # each test set read once for both metrics
    assert read_scp(tmp_path / "test_a" / "dataset" / "text.scp") == REFS_A
    again = datasets_for({"test_a": REFS_A}, builds)
    measure([WER_CFG], tmp_path, ["test_a"], datasets=again, output_path=tmp_path / "m2.json")
    assert builds == ["test_a", "test_b"]  # exported column reused across runs
    assert list(json.loads((tmp_path / "m2.json").read_text())) == ["espnet3_rules.metrics.WER"]


class CountRows(BaseMetric):
    """An ESPnet3-style metric: reads its inputs with iter_inputs."""

    input_names = ("ref",)

    def __call__(self, data, test_name, output_dir):
        return {"rows": sum(1 for _ in self.iter_inputs(data, "ref"))}


def test_measure_discovers_test_sets_and_takes_named_custom_metrics(tmp_path):
    write_scp(tmp_path / "b" / "text.scp", {"x": "1", "y": "2"})
    write_scp(tmp_path / "a" / "text.scp", {"x": "1"})
    (tmp_path / ".hidden").mkdir()
    results = measure([{"metric": f"{__name__}.CountRows", "inputs": {"ref": "text"}, "name": "rows"}], tmp_path)
    assert results == {"rows": {"a": {"rows": 1}, "b": {"rows": 2}}}


@pytest.mark.parametrize(
    "metrics, message",
    [
        ([], "at least one metric"),
        ([{"metric": "espnet3_rules.metrics.WER", "inputs": {"hyp": "hyp"}}], r"bind \['ref'\] in its inputs"),
        ([{"metric": "espnet3_rules.metrics.WER", "kwargs": {"nope": 1}, "inputs": {}}], "cannot construct"),
        ([{"metric": "pathlib.Path", "inputs": {}}], "is not an espnet3_rules.metrics.BaseMetric"),
        ([{"metric": "espnet3_rules.metrics.WER", "input": {}}], r"unknown key\(s\) \['input'\]"),
        ([WER_CFG, WER_CFG], "give each a distinct 'name'"),
        ([{"metric": WER_PATH, "inputs": {"ref": "dataset:../x", "hyp": "hyp"}}], "cannot name a file"),
        (
            [{"metric": WER_PATH, "inputs": {"ref": "text", "hyp": "hyp"}}],
            r"text.scp does not exist; test_a has output fields \['hyp'\]",
        ),
        ([WER_CFG], "needs its dataset; none was given"),
    ],
)
def test_measure_refuses_bad_metric_configs(tmp_path, metrics, message):
    write_scp(tmp_path / "test_a" / "hyp.scp", HYPS_A)
    with pytest.raises(ContractError, match=message):
        measure(metrics, tmp_path, ["test_a"])
    assert not (tmp_path / "metrics.json").exists()


def test_measure_refuses_missing_or_no_test_sets(tmp_path):
    with pytest.raises(ContractError, match="test set 'nope'.*run its inference first"):
        measure([WER_CFG], tmp_path, ["nope"])
    with pytest.raises(ContractError, match="at least one test set"):
        measure([WER_CFG], tmp_path, [])
    with pytest.raises(ContractError, match="no test-set directories"):
        measure([WER_CFG], tmp_path)
    with pytest.raises(ContractError, match="does not exist; run the inference jobs first"):
        measure([WER_CFG], tmp_path / "missing")


# ------------------------------------------------ job-level measure (cli/measure.py)
def workflow_config(tmp_path, test_sets=("test_a", "test_b"), **job_extra):
    job = {
        "runner": "espnet3_rules.InferenceRunner",
        "provider": "toys.SpeechProvider",
        "provider_config": {"n": 3},
        "runner_kwargs": {"input_key": "speech", "output_fn": "toys.asr_output_fn"},
        "output_dir": str(tmp_path / "exp"),
        "n_shards": 2,
        "measure": {"metrics": [WER_CFG]},
        **job_extra,
    }
    if test_sets:
        job["test_sets"] = [{"name": name} for name in test_sets]
    return {"jobs": {"decode": job}}


def test_measure_job_reads_references_through_each_test_sets_provider(tmp_path):
    from espnet3_rules.cli.config import jobs_from_config
    from espnet3_rules.cli.measure import measure_job, measure_specs
    from espnet3_rules.engine.job import build_runner

    config = workflow_config(tmp_path)
    for job in jobs_from_config(config).values():
        build_runner(job)(range(3))
    (spec,) = measure_specs(config).values()
    assert spec["output"] == (tmp_path / "exp" / "metrics.json").as_posix()
    results = measure_job(spec)
    # refs "word0 text", "word1 text", "word2 text"; utt1's hypothesis lost "text": 1 deletion of 6 words
    assert sorted(results["espnet3_rules.metrics.WER"]) == ["test_a", "test_b"]
    assert results["espnet3_rules.metrics.WER"]["test_a"]["WER"] == 16.67
    assert json.loads((tmp_path / "exp" / "metrics.json").read_text()) == results
    stamp = json.loads((tmp_path / "exp" / "test_a" / "dataset" / "text.source.json").read_text())
    assert stamp["identity"]["provider"] == "toys.SpeechProvider"


def test_measure_needs_named_test_sets(tmp_path):
    from espnet3_rules.cli.measure import measure_specs

    with pytest.raises(ContractError, match="jobs.decode.measure needs test_sets"):
        measure_specs(workflow_config(tmp_path, test_sets=()))


@pytest.mark.parametrize(
    "names, message",
    [
        (("a", "a"), "jobs.decode.test_sets: name 'a' appears twice"),
        (("a", ""), "config: jobs.decode.test_sets.1.name: '' should be non-empty"),
    ],
)
def test_duplicate_or_empty_test_set_names_are_refused(tmp_path, names, message):
    from espnet3_rules.cli.config import jobs_from_config

    with pytest.raises(ContractError) as info:
        jobs_from_config(workflow_config(tmp_path, test_sets=names))
    assert str(info.value) == message
