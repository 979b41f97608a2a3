"""BaseMetric (states, checked update, chunked __call__, contract), WER/CER (hand-computed fixtures),
dataset columns, measure() in both config forms, and the workflow's job-level measure."""

from __future__ import annotations

import json
import sys
import wave

import pytest

import toys
from espnet3_rules import ContractError
from espnet3_rules.contract.metrics import MetricContractError, check_metric_batch, check_metric_inputs
from espnet3_rules.systems.base.metric import (
    DatasetSource,
    dataset_column_scp,
    export_dataset_column,
    measure,
    score,
    build_metrics,
)
from espnet3_rules.systems.esp2_asr.metrics.cer import CER
from espnet3_rules.systems.esp2_asr.metrics.wer import WER
from espnet3_rules.utils.scp_utils import read_scp

pytest.importorskip("jiwer")

# Hand-counted word errors (S/D/I) per utterance; N = reference words. An empty hypothesis is scored as "."
# (as ESPnet3 does): one substitution, the other words deletions.
#   u1 the cat sat on the mat  | the cat sit on mat   S1 D1   N6
#   u2 hello world             | hello big world      I1      N2
#   u3 good morning everyone   | (empty)              S1 D2   N3
#   u4 a b c d                 | a x c d              S1      N4
# WER = (2 + 1 + 3 + 1) / 15 = 46.67 %. By character (spaces count): N = 22+11+21+7 = 61,
# u1 S1 D4 ("the " gone), u2 I4 ("big "), u3 S1 D20, u4 S1 -> CER = 31 / 61 = 50.82 %.
REFS_A = {"u1": "the cat sat on the mat", "u2": "hello world", "u3": "good morning everyone", "u4": "a b c d"}
HYPS_A = {"u1": "the cat sit on mat", "u2": "hello big world", "u3": "", "u4": "a x c d"}
# Characters: c1 abc|abd S1 N3; c2 "ab cd"|abcd D1 N5; c3 xy|xyz I1 N2; c4 hi|- S1 D1 N2 -> CER 5/12 = 41.67 %.
# Words:      c1 S1 N1; c2 S1 D1 N2; c3 S1 N1; c4 S1 N1 -> WER 5/5 = 100 %.
REFS_B = {"c1": "abc", "c2": "ab cd", "c3": "xy", "c4": "hi"}
HYPS_B = {"c1": "abd", "c2": "abcd", "c3": "xyz", "c4": ""}


def write_scp(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} {v}\n" for k, v in entries.items()), encoding="utf-8")
    return path


def scp_inputs(tmp_path, test="t", **entries):
    return {name: write_scp(tmp_path / test / f"{name}.scp", rows) for name, rows in entries.items()}


# ------------------------------------------------------------------ WER / CER
def test_wer_matches_hand_computed_counts_and_writes_its_alignment(tmp_path):
    data = scp_inputs(tmp_path, ref=REFS_A, hyp=HYPS_A)
    assert WER()(data, "t", tmp_path) == {"WER": 46.67}
    alignment = (tmp_path / "t" / "wer_alignment").read_text(encoding="utf-8")
    assert "HYP: the cat sit on *** mat" in alignment
    assert alignment.endswith("\nWER: 46.67 (hits=9, substitutions=3, deletions=3, insertions=1)\n")
    assert WER()(data, "t") == {"WER": 46.67}  # no output_dir: nothing written
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["hyp.scp", "ref.scp", "wer_alignment"]


def test_cer_matches_hand_computed_counts(tmp_path):
    assert CER()(scp_inputs(tmp_path, ref=REFS_B, hyp=HYPS_B), "t", tmp_path) == {"CER": 41.67}
    assert WER()(scp_inputs(tmp_path, ref=REFS_B, hyp=HYPS_B), "t") == {"WER": 100.0}
    assert CER()(scp_inputs(tmp_path, ref=REFS_A, hyp=HYPS_A), "t") == {"CER": 50.82}
    assert (tmp_path / "t" / "cer_alignment").read_text(encoding="utf-8").endswith(
        "\nCER: 41.67 (hits=8, substitutions=2, deletions=2, insertions=1)\n"
    )


def test_error_rate_states_merge_across_ranks():
    ranks = [WER(), WER()]
    ranks[0].update(ref=["a b c"], hyp=["a x c"])
    ranks[1].update(ref=["d e"], hyp=["d"])
    merged = WER()
    merged.load_state(merged.merge_states([rank.state() for rank in ranks]))
    assert merged.state() == {"hits": 3, "substitutions": 1, "deletions": 1, "insertions": 0}
    assert merged.compute() == {"WER": 40.0}


def test_error_rate_refusals(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="WER: nothing to score: the references have no words"):
        WER().compute()
    with pytest.raises(AssertionError, match="UID mismatch between ref and hyp: u1 != u2"):
        WER()(scp_inputs(tmp_path, ref={"u1": "a"}, hyp={"u2": "a"}), "t")
    monkeypatch.setitem(sys.modules, "espnet2.text.cleaner", None)
    with pytest.raises(RuntimeError, match=r"clean_types \['tacotron'\] need espnet2's TextCleaner"):
        CER(clean_types="tacotron")
    assert WER(clean_types=None).cleaner(" A b ") == " A b "
    monkeypatch.setitem(sys.modules, "jiwer", None)
    with pytest.raises(RuntimeError, match="jiwer is required to compute WER"):
        WER().update(ref=["a"], hyp=["a"])


# ------------------------------------------------------------------ BaseMetric
def test_add_state_registry_reset_and_load_state():
    metric = toys.CountRows()
    metric.update(ref=["a", "b"])
    assert metric.state() == {"rows": 2, "batch_sizes": [2]}
    metric.reset()
    assert metric.state() == {"rows": 0, "batch_sizes": []}
    for args, message in [
        (("rows", 0, "sum"), "state 'rows' is already defined"),
        (("chunk_size", 0, "sum"), "state 'chunk_size' is already defined"),
        (("n", True, "sum"), "'sum' needs an int or float"),
        (("n", 0, "cat"), "'cat' needs a list"),
        (("n", 0, "max"), "reduce must be 'sum' or 'cat'"),
    ]:
        with pytest.raises(ValueError, match=message):
            metric.add_state(*args)
    registered = r"state names \['rows'\] do not match the registered \['batch_sizes', 'rows'\]"
    with pytest.raises(ValueError, match=registered):
        metric.load_state({"rows": 1})


def test_merge_states_sums_and_concatenates_in_rank_order_without_changing_self():
    metric = toys.CountRows()
    states = [{"rows": 2, "batch_sizes": [2]}, {"rows": 3, "batch_sizes": [1, 2]}]
    assert metric.merge_states(states) == {"rows": 5, "batch_sizes": [2, 1, 2]}
    assert metric.merge_states([]) == {"rows": 0, "batch_sizes": []}
    assert metric.state() == {"rows": 0, "batch_sizes": []}
    with pytest.raises(ValueError, match="do not match"):
        metric.merge_states([{"rows": 1, "batch_sizes": [], "extra": 0}])


def test_call_feeds_update_in_chunks_and_skips_absent_optional_inputs(tmp_path):
    metric = toys.CountRows()
    refs = {f"u{i}": f"r{i}" for i in range(5)}
    data = scp_inputs(tmp_path, ref=refs)
    assert metric(data, "t") == {"rows": 5}
    assert metric.batch_sizes == [2, 2, 1]  # chunk_size 2
    data.update(scp_inputs(tmp_path, hyp=refs))
    assert metric(data, "t") == {"rows": 5}  # reset first: not 10
    assert metric.collect_artifacts is False


@pytest.mark.parametrize(
    "values, message",
    [
        ({"ref": ["a"], "txt": ["b"]}, "CountRows got input 'txt'; declared inputs: ref, hyp"),
        ({"hyp": ["a"]}, "CountRows input 'ref' is missing"),
        ({"ref": "a"}, "CountRows input 'ref' must be a list or tuple, not str"),
        ({"ref": ["a", "b"], "hyp": ["a"]}, "CountRows input 'hyp' has 1 items, 'ref' has 2"),
        ({"ref": ["a", 3]}, r"CountRows input 'ref'\[1\] is int, must be text"),
    ],
)
def test_update_checks_its_batch_against_the_declared_inputs(values, message):
    with pytest.raises(MetricContractError, match=message):
        toys.CountRows().update(**values)
    check_metric_batch(toys.CountRows(), {"ref": ("a",), "hyp": None})


def test_declarations_are_checked_at_construction():
    with pytest.raises(TypeError, match="UndeclaredMetric does not declare inputs/outputs"):
        toys.UndeclaredMetric()
    with pytest.raises(TypeError, match="TextOutputMetric.outputs field 'rows' must have kind 'number', not 'text'"):
        toys.TextOutputMetric()
    assert toys.SkipsInitMetric()  # skipping super().__init__() skips the check; measure() checks again


@pytest.mark.parametrize(
    "inputs, message",
    [
        (None, "CountRows declares inputs; bind them in the metrics config"),
        ({"hyp": "hyp"}, r"CountRows inputs: missing \['ref'\], unknown \[\]"),
        ({"ref": "text", "txt": "x"}, r"missing \[\], unknown \['txt'\]"),
        ({"ref": "dataset:"}, "input 'ref' needs an SCP stem or dataset column"),
    ],
)
def test_check_metric_inputs(inputs, message):
    with pytest.raises(MetricContractError, match=message):
        check_metric_inputs(toys.CountRows(), inputs)
    assert check_metric_inputs(toys.CountRows(), ["ref"]) == {"ref": "ref"}


def test_iter_inputs_reads_in_lockstep_and_asserts_alignment(tmp_path):
    metric = toys.CountRows()
    data = {
        "a": write_scp(tmp_path / "a.scp", {"u1": "x y", "u2": ""}),
        "b": write_scp(tmp_path / "b.scp", {"u1": "p"}),
    }
    assert list(metric.iter_inputs(data, "a")) == [("u1", {"a": "x y"}), ("u2", {"a": ""})]
    rows = metric.iter_inputs(data, "a", "b")
    assert next(rows) == ("u1", {"a": "x y", "b": "p"})
    with pytest.raises(AssertionError, match=r"SCP length mismatch across keys: \['a', 'b'\]"):
        next(rows)
    with pytest.raises(AssertionError, match="At least one SCP key is required"):
        next(metric.iter_inputs(data))


@pytest.mark.parametrize("text, message", [("a x\na y\n", "id 'a' appears twice"), ("a \xff\n", "is not UTF-8")])
def test_scp_reading_refuses_repeated_ids_and_non_utf8(tmp_path, text, message):
    path = tmp_path / "x.scp"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ContractError, match=message):
        read_scp(path)


def test_missing_scp_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.scp does not exist"):
        read_scp(tmp_path / "missing.scp")


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
    with pytest.raises(KeyError, match=r"test set 'dev' item 1 has no 'text'; it has \['txt'\]"):
        export_dataset_column([{"text": "a"}, {"txt": "b"}], "text", out, test_name="dev")
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
WER_PATH = "espnet3_rules.systems.esp2_asr.metrics.wer.WER"
CER_PATH = "espnet3_rules.systems.esp2_asr.metrics.cer.CER"
WER_CFG = {"metric": WER_PATH, "inputs": {"ref": "dataset:text", "hyp": "hyp"}}  # this project's form
CER_CFG = {"metric": {"_target_": CER_PATH}, "inputs": {"ref": "dataset:text", "hyp": "hyp"}}  # ESPnet3's form


def datasets_for(refs_by_test, builds):
    def source(test, refs):
        def build():
            builds.append(test)
            return [{"utt_id": k, "text": v} for k, v in refs.items()]

        return DatasetSource(build=build, identity={"test": test})

    return {test: source(test, refs) for test, refs in refs_by_test.items()}


def test_score_takes_both_config_forms_and_writes_metrics_json_as_espnet3(tmp_path):
    write_scp(tmp_path / "test_a" / "hyp.scp", HYPS_A)
    write_scp(tmp_path / "test_b" / "hyp.scp", HYPS_B)
    builds = []
    datasets = datasets_for({"test_a": REFS_A, "test_b": REFS_B}, builds)
    results = score(build_metrics([WER_CFG, CER_CFG]), tmp_path, ["test_a", "test_b"], datasets=datasets)
    assert results == {
        WER_PATH: {"test_a": {"WER": 46.67}, "test_b": {"WER": 100.0}},
        CER_PATH: {"test_a": {"CER": 50.82}, "test_b": {"CER": 41.67}},
    }
    assert (tmp_path / "metrics.json").read_text(encoding="utf-8") == json.dumps(results, indent=2)
    assert builds == ["test_a", "test_b"]  # each test set read once for both metrics
    assert read_scp(tmp_path / "test_a" / "dataset" / "text.scp") == REFS_A
    assert (tmp_path / "test_b" / "cer_alignment").is_file()
    again = datasets_for({"test_a": REFS_A}, builds)
    score(build_metrics([WER_CFG]), tmp_path, ["test_a"], datasets=again, output_path=tmp_path / "m2.json")
    assert builds == ["test_a", "test_b"]  # exported column reused across runs


def test_measure_takes_espnet3_configs_and_reads_the_dataset_through_the_provider(tmp_path):
    from omegaconf import OmegaConf

    write_scp(tmp_path / "infer" / "test_b" / "hyp.scp", {"utt0": "word0 text", "utt1": "word1"})
    write_scp(tmp_path / "infer" / "test_a" / "hyp.scp", {"utt0": "word0 text"})
    (tmp_path / "infer" / ".hidden").mkdir()
    metrics_config = OmegaConf.create({
        "inference_dir": str(tmp_path / "infer"),
        "metrics": [
            {"metric": {"_target_": WER_PATH, "clean_types": None}, "inputs": {"ref": "dataset:text", "hyp": "hyp"}},
            {"metric": "toys.CountRows", "inputs": {"ref": "hyp"}, "name": "rows"},
        ],
    })
    inference_config = {"provider": {"_target_": "toys.SpeechProvider"}, "n": "${oc.env:N_ITEMS,2}"}
    with pytest.raises(AssertionError, match="SCP length mismatch"):  # test_a has 1 hypothesis, 2 items
        measure(metrics_config, inference_config)
    write_scp(tmp_path / "infer" / "test_a" / "hyp.scp", {"utt0": "word0 text", "utt1": "word1 text"})
    results = measure(metrics_config, OmegaConf.create(inference_config))
    assert results == {
        WER_PATH: {"test_a": {"WER": 0.0}, "test_b": {"WER": 25.0}},
        "rows": {"test_a": {"rows": 2}, "test_b": {"rows": 2}},
    }
    assert json.loads((tmp_path / "infer" / "metrics.json").read_text()) == results
    stamp = json.loads((tmp_path / "infer" / "test_a" / "dataset" / "text.source.json").read_text())
    config = {**inference_config, "n": "2", "test_set": "test_a"}  # resolved, with the test set
    assert stamp["identity"] == {"provider": "toys.SpeechProvider", "config": config}
    named = OmegaConf.merge(metrics_config, {"dataset": {"test": [{"name": "test_b"}]}})
    assert list(measure(named, inference_config)[WER_PATH]) == ["test_b"]


@pytest.mark.parametrize(
    "metrics, error, message",
    [
        ([], AssertionError, "Please specify `metrics`"),
        ([{"metric": WER_PATH, "inputs": {"hyp": "hyp"}}], MetricContractError, r"WER inputs: missing \['ref'\]"),
        ([{"metric": WER_PATH, "kwargs": {"nope": 1}, "inputs": {}}], TypeError, "metrics.0.: cannot construct"),
        ([{"metric": {"_target_": WER_PATH, "nope": 1}}], TypeError, r"metrics\[0\].metric: cannot construct"),
        ([{"metric": {"_target_": WER_PATH}, "kwargs": {"x": 1}}], ContractError, "kwargs go inside metric:"),
        ([{"metric": {"clean_types": None}}], ContractError, r"metrics\[0\].metric needs _target_"),
        ([{"metric": "pathlib.Path", "inputs": {}}], TypeError, "is not a valid BaseMetric instance"),
        ([{"metric": "toys.SkipsInitMetric"}], TypeError, "SkipsInitMetric does not declare inputs/outputs"),
        ([{"metric": WER_PATH, "input": {}}], ContractError, r"unknown key\(s\) \['input'\]"),
        ([WER_CFG, WER_CFG], ContractError, "give each a distinct 'name'"),
        ([{"metric": WER_PATH, "inputs": {"ref": "dataset:../x", "hyp": "hyp"}}], ContractError, "cannot name a file"),
        (
            [{"metric": WER_PATH, "inputs": {"ref": "text", "hyp": "hyp"}}],
            AssertionError,
            r"Missing SCP file: .*text.scp; test_a has \['hyp'\]",
        ),
        ([WER_CFG], ContractError, "reading `dataset:text` for test set 'test_a' needs the inference config"),
        ([{"metric": "toys.WrongResultMetric", "inputs": {"ref": "hyp"}}], ValueError, "field 'rows' must be number"),
    ],
)
def test_measure_refuses_bad_metric_configs(tmp_path, metrics, error, message):
    write_scp(tmp_path / "test_a" / "hyp.scp", HYPS_A)
    config = {"inference_dir": str(tmp_path), "metrics": metrics}
    with pytest.raises(error, match=message) as info:
        measure(config)
    assert isinstance(info.value, ContractError)
    assert not (tmp_path / "metrics.json").exists()


def test_measure_refuses_missing_or_no_test_sets(tmp_path):
    config = {"inference_dir": str(tmp_path), "metrics": [WER_CFG]}
    with pytest.raises(AssertionError, match="Missing hypothesis/reference files .* inference of test set 'nope'"):
        measure({**config, "dataset": {"test": [{"name": "nope"}]}})
    with pytest.raises(ValueError, match="No test sets found"):
        measure(config)
    with pytest.raises(FileNotFoundError, match="does not exist; run the inference first"):
        measure({**config, "inference_dir": str(tmp_path / "missing")})
    with pytest.raises(AttributeError, match="metrics_config needs inference_dir"):
        measure({"metrics": [WER_CFG]})
    with pytest.raises(ContractError, match="at least one test set"):
        score(build_metrics([WER_CFG]), tmp_path, [])


# ------------------------------------------------ job-level measure (cli/measure.py)
def workflow_config(tmp_path, test_sets=("test_a", "test_b"), **job_extra):
    job = {
        "runner": "espnet3_rules.InferenceRunner",
        "provider": "toys.SpeechProvider",
        "provider_config": {"n": 3},
        "runner_kwargs": {"input_key": "speech", "output_fn": "toys.asr_output_fn"},
        "output_dir": str(tmp_path / "exp"),
        "n_shards": 2,
        "measure": {"metrics": [WER_CFG, CER_CFG]},
        **job_extra,
    }
    if test_sets:
        job["test_sets"] = [{"name": name} for name in test_sets]
    return {"jobs": {"decode": job}}


def test_measure_job_reads_references_through_each_test_sets_provider(tmp_path):
    from espnet3_rules.cli.config import check_config, jobs_from_config
    from espnet3_rules.cli.measure import measure_job, measure_specs
    from espnet3_rules.engine.job import build_runner

    config = workflow_config(tmp_path)
    check_config(config)  # both metric forms pass the schema
    for job in jobs_from_config(config).values():
        build_runner(job)(range(3))
    (spec,) = measure_specs(config).values()
    assert spec["output"] == (tmp_path / "exp" / "metrics.json").as_posix()
    results = measure_job(spec)
    # refs "word0 text", "word1 text", "word2 text"; utt1's hypothesis lost "text": 1 deletion of 6 words
    assert results[WER_PATH] == {"test_a": {"WER": 16.67}, "test_b": {"WER": 16.67}}
    assert json.loads((tmp_path / "exp" / "metrics.json").read_text()) == results
    stamp = json.loads((tmp_path / "exp" / "test_a" / "dataset" / "text.source.json").read_text())
    assert stamp["identity"]["provider"] == "toys.SpeechProvider"


@pytest.mark.parametrize(
    "metric, message",
    [
        ({"metric": {"clean_types": None}}, "jobs.decode.measure.metrics.0.metric"),
        ({"metric": WER_PATH, "inputs": {"ref": 1}}, "jobs.decode.measure.metrics.0.inputs"),
    ],
)
def test_schema_refuses_malformed_metric_entries(tmp_path, metric, message):
    from espnet3_rules.cli.config import check_config

    with pytest.raises(ContractError, match=message):
        check_config(workflow_config(tmp_path, measure={"metrics": [metric]}))


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
