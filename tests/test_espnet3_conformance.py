"""Conformance: the same ESPnet3 user program, run under real ESPnet3 202611 and with only its imports switched.

Each case names one ``program_*`` function of a user module in ``tests/espnet3_user``
(written against ``espnet3.`` imports). The harness runs it twice in this process:
once as written (ESPnet3's modules from the wheel; no parallel config set, so ESPnet3
runs its shards locally) and once from the copy :func:`espnet3_user.write_switched`
makes (``espnet3.`` -> ``espnet3_rules.`` on the import lines, nothing else). Each run
gets a fresh working directory and the relative ``output_dir`` ``out``; module counters
are reset first (the module's ``reset()``) and the parallel config after.

What is compared:

- the return value (``==``), or the exception: the switched program's must be an
  instance of ESPnet3's exception type, and both messages must hold the case's decisive
  words (case-insensitive; a word missing from ESPnet3's own message fails the case, so
  the words are checked against the reference too);
- the output directory, by :func:`assert_same_outputs`: every file's relative path, and
  the bytes of every file except the markers whose content is each side's own;
  (neither side writes logs into the output directory in-process, so any other file must match);
- where a case says so, what the module's counters saw (``after``).

The Dask case (``allow_overwrite_lock``: ESPnet3 runs a shard through Dask whenever a parallel
config is set) uses an in-process cluster (``processes: False``); the lock cases kill a child
process mid-shard (one per side and case). No case runs Snakemake.

Deliberate differences are asserted per side, each in its own test below.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytest

from espnet3_wheel import espnet3_root  # noqa: F401  (session fixture)

FAMILIES = ("runners", "resume", "inference_cases")  # the user modules of tests/espnet3_user
RULES_PREFIX = "conformance_"  # the switched copy of espnet3_user.<family> is conformance_<family>
OUT = "out"

#: Both sides write these, each its own content: the same relative paths must exist, bytes are not compared
#: (ESPnet3: manifest with items, empty ``done``, a lock holding a pid; ours: fingerprinted plan and ``done``,
#: a lock holding pid and host).
CONTENT_FREE = ("manifest.json", "split.*/done", "split.*/lock")
#: Only ours writes these (shard state, the shards' attempts, merge marker, a set-aside ``done``): dropped from
#: ours, absent from ESPnet3's.
OURS_ONLY = ("split.*/_state.pkl", "split.*/attempts.json", "merge.done", "split.*/done.rejected",
             "logs/split.*.log")  # the last one: shards run by Snakemake (a parallel config)


# ----------------------------------------------------------------------------- harness
@dataclass
class Outcome:
    value: Any = None
    error: Optional[BaseException] = None
    files: Dict[str, bytes] = field(default_factory=dict)
    after: Any = None


@pytest.fixture(scope="session")
def conformance_modules(espnet3_root, tmp_path_factory):  # noqa: F811
    """``{family: (espnet3 module name, switched module name)}``; the switched copies put on ``sys.path``."""
    from espnet3_user import switched_on_path

    copies = {family: RULES_PREFIX + family for family in FAMILIES}
    with switched_on_path(tmp_path_factory.mktemp("conformance_user"), copies):
        yield {family: (f"espnet3_user.{family}", name) for family, name in copies.items()}


def reset_parallel_configs():
    """Unset the parallel config a program set (ESPnet3's and ours), so the next program runs locally."""
    for name in ("espnet3.parallel.parallel", "espnet3_rules.parallel.parallel"):
        module = sys.modules.get(name)
        if module is None:
            continue
        if hasattr(module, "parallel_config"):
            module.parallel_config = None
        assert module.get_parallel_config() is None, f"cannot unset {name}'s parallel config"


def output_files(root: Path) -> Dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_program(module_name: str, program: str, run_dir: Path, after: Optional[str] = None) -> Outcome:
    """Run ``module_name.program(OUT)`` with ``run_dir`` (fresh) as the working directory."""
    module = importlib.import_module(module_name)
    if hasattr(module, "reset"):
        module.reset()
    run_dir.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(run_dir)
    outcome = Outcome()
    try:
        outcome.value = getattr(module, program)(OUT)
    except Exception as exc:  # noqa: BLE001  (the outcome under test)
        outcome.error = exc
    finally:
        os.chdir(cwd)
        reset_parallel_configs()
    outcome.files = output_files(run_dir / OUT)
    outcome.after = getattr(module, after)() if after else None
    return outcome


def matches(path: str, patterns: Tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"*/{pattern}") for pattern in patterns)


def assert_same_outputs(ref: Dict[str, bytes], ours: Dict[str, bytes]):
    """The comparison rule: ESPnet3's files and ours (less :data:`OURS_ONLY`) have the same relative paths;
    every file not in :data:`CONTENT_FREE` has the same bytes."""
    assert not [p for p in ref if matches(p, OURS_ONLY)], "ESPnet3 wrote a file the rule counts as ours only"
    ours = {p: data for p, data in ours.items() if not matches(p, OURS_ONLY)}
    assert sorted(ours) == sorted(ref)
    for path, data in ref.items():
        if not matches(path, CONTENT_FREE):
            assert ours[path] == data, path


def assert_raised(outcome: Outcome, expected_type: type, words: Tuple[str, ...], side: str):
    assert outcome.error is not None, f"{side}: no exception; returned {outcome.value!r}"
    assert isinstance(outcome.error, expected_type), f"{side}: {type(outcome.error).__mro__} is no {expected_type}"
    message = str(outcome.error).lower()
    missing = [w for w in words if w.lower() not in message]
    assert not missing, f"{side}: {missing} not in {str(outcome.error)!r}"


@pytest.fixture
def both(conformance_modules, tmp_path):
    """``both(family, program, after=None)`` -> ``(espnet3_outcome, ours_outcome)``."""

    def run(family, program, after=None):
        ref_module, rules_module = conformance_modules[family]
        ref = run_program(ref_module, program, tmp_path / "espnet3", after)
        ours = run_program(rules_module, program, tmp_path / "rules", after)
        return ref, ours

    return run


# ----------------------------------------------------------------------------- the same result
#: (family, program, counters to compare after the run or None): both return the same value, write the same files.
SAME = [
    ("runners", "program_text_runner", None),
    ("runners", "program_text_runner_subdir", None),
    ("runners", "program_classmethod_forward", None),
    ("runners", "program_env_injection_by_name", None),
    ("runners", "program_batch_aware_forward", None),
    ("runners", "program_collect_runner", None),
    ("runners", "program_is_shard_done", None),
    ("runners", "program_rerun_skips_done_shards", None),
    ("runners", "program_mistake_model_in_forward", None),
    ("runners", "program_mistake_env_instead_of_setup_fn", None),
    ("resume", "program_changed_plan_without_resume", None),
    ("resume", "program_allow_overwrite_lock_after_kill", None),
    ("inference_cases", "program_parallel_provider_env", None),
    ("inference_cases", "program_systems_provider_env", None),
    ("inference_cases", "program_parallel_provider_builds_once", None),
    ("inference_cases", "program_subclass_reads_local_env", None),
    ("inference_cases", "program_systems_provider_hydra_builders", None),
    ("inference_cases", "program_systems_provider_overrides_build_dataset", None),
    ("inference_cases", "program_runner_key_arguments", None),
    ("inference_cases", "program_resolve_idx_key", None),
    ("inference_cases", "program_prepare_model_inputs_and_format_output", None),
    ("inference_cases", "program_declared_normalizers_applied", None),
    ("inference_cases", "program_call_and_merge_return_values", None),  # True, None; field_keys.txt sorted
    ("inference_cases", "program_forward_called_on_the_class", None),
    ("inference_cases", "program_subclass_extends_classmethod_forward", None),
]


@pytest.mark.parametrize("family, program, after", SAME, ids=[p.removeprefix("program_") for _, p, _ in SAME])
def test_same_result_as_espnet3(family, program, after, both):
    ref, ours = both(family, program, after)
    assert ref.error is None, f"ESPnet3 itself failed: {ref.error!r}"
    assert ours.error is None, f"switched program failed: {type(ours.error).__name__}: {ours.error}"
    assert ours.value == ref.value
    assert ours.after == ref.after
    assert_same_outputs(ref.files, ours.files)


# ----------------------------------------------------------------------------- the same error
#: (family, program, ESPnet3's exception type, decisive words, compare outputs too, counters to compare).
RAISES = [
    ("runners", "program_missing_output_dir", RuntimeError, ("output_dir",), True, None),
    ("runners", "program_nonpositive_batch_size", ValueError, ("batch_size", "positive"), True, None),
    ("runners", "program_mistake_self_forward", TypeError, ("forward",), False, None),
    ("runners", "program_mistake_mismatched_env_names", TypeError, ("dataset", "model"), False, None),
    ("resume", "program_resume_changed_shard_count", RuntimeError, ("resume", "shard"), False, None),
    ("resume", "program_resume_changed_items", RuntimeError, ("resume", "plan changed"), False, None),
    ("resume", "program_resume_changed_batching", RuntimeError, ("resume", "plan changed"), False, None),
    ("resume", "program_live_lock_refused", RuntimeError, ("locked",), True, None),
    ("inference_cases", "program_hyp_and_ref_keys_checked_when_writing", ValueError, ("missing", "ref"), False, None),
    ("inference_cases", "program_resolve_idx_key_missing", ValueError, ("idx_key", "'key'"), True, None),
    ("inference_cases", "program_no_input_key", RuntimeError, ("input_key",), False, None),
    ("inference_cases", "program_dataset_item_without_input_key", KeyError, ("speaker", "not found"), False, None),
    ("inference_cases", "program_optional_inputs_mixed_in_a_batch", KeyError, ("prompt", "optional", "mixed"), False,
     None),
    ("inference_cases", "program_out_of_memory", RuntimeError, ("out of memory", "indices", "lengths", "batch_size"),
     False, "counters"),
]


@pytest.mark.parametrize(
    "family, program, error_type, words, compare_outputs, after", RAISES,
    ids=[p.removeprefix("program_") for _, p, *_ in RAISES],
)  # fmt: skip
def test_same_error_as_espnet3(family, program, error_type, words, compare_outputs, after, both):
    ref, ours = both(family, program, after)
    assert_raised(ref, error_type, words, "ESPnet3")
    assert isinstance(ref.error, error_type) and type(ref.error).__module__ == "builtins"
    assert_raised(ours, type(ref.error), words, "switched program")
    assert ours.after == ref.after
    if compare_outputs:
        assert_same_outputs(ref.files, ours.files)


def test_failing_batch_propagates_the_models_own_exception_after_one_call(both):
    """No item-by-item retry unless the config asks: the model's ValueError, unchanged, after one call."""
    ref, ours = both("inference_cases", "program_failing_batch", "counters")
    for side, outcome in (("ESPnet3", ref), ("switched program", ours)):
        assert type(outcome.error) is ValueError, f"{side}: {outcome.error!r}"
        assert str(outcome.error) == "model rejects this batch", side
        assert outcome.after == {"builds": 1, "model_calls": 1}, side


# ----------------------------------------------------------------------------- deliberate differences
def test_default_merge_returns_none_in_espnet3_and_the_records_here(both):
    """BaseRunner's default ``merge``: ESPnet3's returns None; ours returns every shard's records, in order."""
    from espnet3_user.data import WordModel, make_items

    ref, ours = both("runners", "program_default_merge")
    assert ref.error is None and ref.value is None
    assert ours.error is None
    assert ours.value == [{"idx": i, "text": WordModel()(item["text"])} for i, item in enumerate(make_items(7))]
    assert_same_outputs(ref.files, ours.files)


def test_writer_runner_without_merge_leaves_outputs_in_the_shards(both):
    """The page's "forgot merge" mistake: the shard files are all there is, on both sides; the
    return value is each side's default (ESPnet3: None; ours: the records, none with writer hooks)."""
    ref, ours = both("runners", "program_mistake_no_merge")
    assert (ref.value, ours.value) == (None, [])
    assert "text" not in ref.files and "split.0/text" in ref.files
    assert_same_outputs(ref.files, ours.files)


def test_lock_left_by_a_killed_run_refused_by_espnet3_taken_over_here(both, conformance_modules, tmp_path):
    """A run SIGKILLed mid-shard leaves ``split.0/lock``. ESPnet3 refuses the plain rerun (only
    ``allow_overwrite_lock`` passes it); ours sees the owner is gone (same host, no such pid), takes the
    lock over, and finishes with ESPnet3's outputs of a clean run."""
    ref, ours = both("resume", "program_rerun_after_kill")
    assert_raised(ref, RuntimeError, ("locked",), "ESPnet3")
    assert "split.0/lock" in ref.files and "split.0/done" not in ref.files
    assert ours.error is None, f"{type(ours.error).__name__}: {ours.error}"
    clean = run_program(conformance_modules["resume"][0], "program_clean_run", tmp_path / "clean")
    assert ours.value == clean.value == 7
    assert "split.0/lock" not in ours.files
    assert_same_outputs(clean.files, ours.files)


def test_pages_one_argument_close_writers_fails_in_espnet3_and_runs_here(both, conformance_modules, tmp_path):
    """The page's MyTextRunner declares ``close_writers(writers)``; ESPnet3 202611 calls it with the state and
    the env, a TypeError after every item was written. Ours calls a hook with what it declares, so the same
    program finishes, with the outputs of the ``(writers, state, **env)`` variant under ESPnet3."""
    ref, ours = both("runners", "program_page_close_writers")
    assert_raised(ref, TypeError, ("close_writers", "shard_id"), "ESPnet3")
    assert ours.error is None, f"{type(ours.error).__name__}: {ours.error}"
    fixed = run_program(conformance_modules["runners"][0], "program_text_runner", tmp_path / "fixed")
    assert ours.value == fixed.value == {}
    assert_same_outputs(fixed.files, ours.files)
