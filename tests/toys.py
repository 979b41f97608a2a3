"""Providers, runners, models and helpers of the tests (one module; shard, plan and merge processes import it by name).

Everything here is importable by name (``toys.X``), so shard and merge processes started through
``python -m espnet3_rules`` or Snakemake can rebuild the runner and provider of a manifest. Probes
that must not change a plan's fingerprint (kill or fail at item k) are read from environment
variables; probes that count work (``calls_file``, ``log_dir``) append one line per event to a file.

The workflow-tier toys (:class:`PoisonWordsProvider`, :class:`PoisonTextRunner` and the runners built
on it) fail on purpose when ``<poison_dir>/<item>`` exists, and hold (wait) on an item while
``<poison_dir>/hold.<item>`` exists, so a test can make one shard fail or stay running without
touching the config (which would change the plan). Their hooks are also fault points of
:mod:`faults` (inert unless ESPNET3_RULES_FAULT is set).

numpy is imported only inside the speech toys that use it: the core must import and run the word
toys where numpy cannot be imported (test_torch_free).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

import espnet3_rules
from espnet3_rules import BaseRunner, EnvironmentProvider, InferenceProvider
from espnet3_rules.components.metrics.base_metric import BaseMetric
from espnet3_rules.contract import Field
from espnet3_rules.engine.attempts import ATTEMPTS_NAME
from espnet3_rules.engine.plan import ShardPlan, make_plan
from espnet3_rules.engine.shard import load_state

import faults

TESTS = Path(__file__).resolve().parent
#: The checkout whose ``espnet3_rules`` this test process imported; subprocesses use the same one.
REPO = Path(espnet3_rules.__file__).resolve().parents[1]

KILL_AT = "TOYS_KILL_AT"
FAIL_AT = "TOYS_FAIL_AT"
#: How long PoisonTextRunner waits at most on a held item (``<poison_dir>/hold.<idx>``).
HOLD_LIMIT_S = 300


# ------------------------------------------------------------------ probes
def maybe_die(idx: Any) -> None:
    """SIGKILL this process at item ``$TOYS_KILL_AT``; raise at ``$TOYS_FAIL_AT``."""
    if os.environ.get(KILL_AT) == str(idx):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(FAIL_AT) == str(idx):
        raise RuntimeError(f"forward failed at item {idx}")


def append_line(path: Any, text: Any) -> None:
    """Append one line to ``path`` (an event log shared by processes)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{text}\n")


def note_call(env: Mapping[str, Any], idx: Any) -> None:
    """Record one ``forward`` call in ``env["calls_file"]`` when the env has one."""
    if env.get("calls_file"):
        append_line(env["calls_file"], idx)


def read_lines(path: Any) -> List[str]:
    """Lines of an event log (empty if it does not exist)."""
    path = Path(path)
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def log_event(config: Any, event: str) -> None:
    """Append ``event`` to ``<config.log_dir>/builds`` when the config names a log dir."""
    log_dir = config.get("log_dir") if config is not None else None
    if log_dir:
        append_line(Path(log_dir) / "builds", event)


def mark(config: Any, name: str) -> None:
    """Leave ``<config.marker_dir>/<name>``: proof that a hook ran."""
    Path(config["marker_dir"], name).touch()


# ------------------------------------------------------------------- data
def words_dataset(n: int) -> List[Dict[str, str]]:
    """``n`` utterances ``{"utt_id": "utt007", "word": "w7"}``."""
    return [{"utt_id": f"utt{i:03d}", "word": f"w{i}"} for i in range(n)]


def speech_dataset(n: int) -> List[Dict[str, Any]]:
    """``n`` utterances: id ``utt<i>``, a float waveform of 4*(i+1) samples, a transcript."""
    import numpy as np

    return [
        {
            "utt_id": f"utt{i}",
            "speech": np.linspace(-0.5, 0.5, 4 * (i + 1), dtype=np.float32),
            "text": f"word{i} text",
        }
        for i in range(n)
    ]


# -------------------------------------------------------------- providers
def words_env(config: Any) -> Dict[str, Any]:
    """``{"dataset", "model", **config.extra_env}``; logs one ``env`` build."""
    log_event(config, "env")
    env = {"dataset": words_dataset(int(config["n"])), "model": shout}
    env.update(dict(config.get("extra_env") or {}))
    return env


class SampleProvider(EnvironmentProvider):
    """A plain provider written like ESPnet3's docs (local and worker builds) over ``words_dataset(n)``."""

    def build_env_local(self):
        return words_env(self.config)

    def build_worker_setup_fn(self):
        config = self.config

        def setup():
            return words_env(config)

        return setup


class LegacyProvider(EnvironmentProvider):
    """An older ESPnet3 provider: worker setup through ``make_worker_setup_fn``."""

    def build_env_local(self):
        return words_env(self.config)

    def make_worker_setup_fn(self):
        config = self.config

        def setup():
            log_event(config, "legacy-setup")
            return words_env(config)

        return setup


class LocalOnlyProvider(EnvironmentProvider):
    """Implements only ``build_env_local``: fine in-process, unusable by shard processes."""

    def build_env_local(self):
        return words_env(self.config)


class DictSetupProvider(SampleProvider):
    """Common mistake: ``build_worker_setup_fn`` returns the env, not a setup function (fixed env: any config)."""

    def build_worker_setup_fn(self):
        return {"dataset": [], "model": None}


class ArgSetupProvider(SampleProvider):
    """Mistake: the setup function takes an argument."""

    def build_worker_setup_fn(self):
        def setup(config):
            return words_env(config)

        return setup


class IterProvider(SampleProvider):
    """Local env whose dataset is an iterator (no ``len()``)."""

    def build_env_local(self):
        env = words_env(self.config)
        env["dataset"] = iter(env["dataset"])
        return env


class RenamedProvider(EnvironmentProvider):
    """Common mistake from the docs: env keys ``ds``/``net``, not ``dataset``/``model`` (``n`` samples, default 2)."""

    def build_env_local(self):
        return {"ds": words_dataset(int(self.config.get("n", 2))), "net": shout}

    def build_worker_setup_fn(self):
        return self.build_env_local


class DeclaredRenamedProvider(RenamedProvider):
    """RenamedProvider that declares its env keys, so the plan step can check them."""

    @classmethod
    def declared_env_keys(cls, params):
        return {"ds", "net"}


class PoisonWordsProvider(EnvironmentProvider):
    """Workflow-tier provider: ``n_items`` strings ``w0007<suffix>``, model ``str.upper``, and ``poison_dir``."""

    def build_env_local(self):
        return self.build_worker_setup_fn()()

    def build_worker_setup_fn(self):
        n_items, suffix = int(self.config["n_items"]), str(self.config.get("suffix", ""))
        poison_dir = str(self.config.get("poison_dir", ""))

        def setup():
            dataset = [f"w{i:04d}{suffix}" for i in range(n_items)]
            return {"dataset": dataset, "model": str.upper, "poison_dir": poison_dir}

        return setup


class BrokenInitProvider(PoisonWordsProvider):
    """A provider whose constructor fails (only the plan rule constructs one)."""

    def __init__(self, config):
        raise RuntimeError("BrokenInitProvider cannot reach its model store")


class MarkingProvider(PoisonWordsProvider):
    """Leaves a marker (``marker_dir``) from __init__, build_env_local, build_worker_setup_fn and setup: what ran."""

    def __init__(self, config):
        super().__init__(config)
        mark(config, "init")

    def build_env_local(self):
        mark(self.config, "build_env_local")
        return super().build_env_local()

    def build_worker_setup_fn(self):
        config, setup = self.config, super().build_worker_setup_fn()
        mark(config, "build_worker_setup_fn")

        def marked_setup():
            mark(config, "setup")
            return setup()

        return marked_setup


class CountingInferenceProvider(InferenceProvider):
    """InferenceProvider over ``words_dataset``; logs every dataset/model build to ``config.log_dir``."""

    @staticmethod
    def build_dataset(config):
        log_event(config, "dataset")
        return words_dataset(int(config["n"]))

    @staticmethod
    def build_model(config):
        log_event(config, "model")
        return Shouter(config.get("suffix", ""))


class OtherInferenceProvider(CountingInferenceProvider):
    """Same env as CountingInferenceProvider, another class."""


class UttProvider(InferenceProvider):
    """Items ``{"utt_id", "text": "w0007"}`` (ids: ``config.ids``, else ``utt<i>``); model ``upper``."""

    @staticmethod
    def build_dataset(config):
        ids = list(config.get("ids") or (f"utt{i}" for i in range(int(config["n_items"]))))
        return [{"utt_id": utt_id, "text": f"w{i:04d}"} for i, utt_id in enumerate(ids)]

    @staticmethod
    def build_model(config):
        return upper


class LinesProvider(UttProvider):
    """Items from the UTF-8 text file ``config.path``, one ``<utt_id> <text>`` line each."""

    @staticmethod
    def build_dataset(config):
        with open(config["path"], encoding="utf-8") as f:
            return [dict(zip(("utt_id", "text"), line.split(maxsplit=1))) for line in f if line.strip()]


class NoModelProvider(UttProvider):
    """Its model cannot be built (a marker, then an error): only its static build_dataset may run."""

    @staticmethod
    def build_model(config):
        mark(config, "build_model")
        raise RuntimeError("build_model must not run here")


class SpeechProvider(InferenceProvider):
    """Dataset ``speech_dataset(config.n)``; ``config.model`` names the model class here (default EchoModel)."""

    @staticmethod
    def build_dataset(config: Any) -> Any:
        return speech_dataset(int(config["n"]))

    @staticmethod
    def build_model(config: Any) -> Any:
        return globals()[config.get("model", "EchoModel")]()


# ---------------------------------------------------------------- runners
class MyTextRunner(BaseRunner):
    """The file-writing runner of ESPnet3's "Provider and Runner" page, as written there."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        sample = dataset[idx]
        hyp = model(sample)
        return {"utt_id": sample["utt_id"], "text": hyp}

    @staticmethod
    def open_writers(shard_dir: Path, **env):
        return {
            "text": (shard_dir / "text").open("w", encoding="utf-8"),
        }

    @staticmethod
    def write_record(writers, result, state, **env):
        writers["text"].write(f'{result["utt_id"]} {result["text"]}\n')

    @staticmethod
    def close_writers(writers):
        for handle in writers.values():
            handle.close()
        return None

    def merge(self, shard_dirs):
        out_dir = self.output_dir / self.shard_subdir if self.shard_subdir else self.output_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "text").open("w", encoding="utf-8") as out_f:
            for shard_dir in sorted(shard_dirs):
                shard_path = shard_dir / "text"
                if not shard_path.exists():
                    continue
                out_f.write(shard_path.read_text(encoding="utf-8"))
        return {}


class ProbeTextRunner(MyTextRunner):
    """MyTextRunner that counts calls, can die at item k, and flushes each line (partial output is visible)."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        maybe_die(idx)
        note_call(env, idx)
        return MyTextRunner.forward(idx, dataset, model, **env)

    @staticmethod
    def write_record(writers, result, state, **env):
        MyTextRunner.write_record(writers, result, state, **env)
        writers["text"].flush()


class StateCloseRunner(MyTextRunner):
    """Writer hooks taking env by name; ``close_writers(writers, state, **env)`` returns shard metadata."""

    @staticmethod
    def open_writers(shard_dir: Path, shard_id, prefix="", **env):
        return {"text": (shard_dir / f"{prefix}text").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, shard_id, **env):
        writers["text"].write(f'{result["utt_id"]} {result["text"]} shard={shard_id}\n')
        state["n_written"] = state.get("n_written", 0) + 1

    @staticmethod
    def close_writers(writers, state, shard_id, prefix="", **env):
        for handle in writers.values():
            handle.close()
        return {"closed": {"shard_id": shard_id, "n_written": state["n_written"], "prefix": prefix}}


class CollectRunner(BaseRunner):
    """State-accumulating runner (no writer hooks, default merge)."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        maybe_die(idx)
        note_call(env, idx)
        return {"idx": idx, "utt_id": dataset[idx]["utt_id"], "score": float(len(model(dataset[idx])))}


class ShardOrderRunner(CollectRunner):
    """merge returns the names of the shard directories it was given."""

    def merge(self, shard_dirs):
        return [Path(d).name for d in shard_dirs]


class NeedsShardFileRunner(CollectRunner):
    """Overrides ``is_shard_done`` (as ESPnet3 users may): a shard counts as done only with its ``keep`` file."""

    @classmethod
    def is_shard_done(cls, shard_dir):
        return super().is_shard_done(shard_dir) and (Path(shard_dir) / "keep").exists()


class OtherCollectRunner(CollectRunner):
    """Same forward as CollectRunner, another class."""


class ClassForwardRunner(CollectRunner):
    """``forward`` as a @classmethod (ESPnet3 202611 allows it): it reaches a class attribute."""

    tag = "cls"

    @classmethod
    def forward(cls, idx, dataset, model, **env):
        note_call(env, idx)
        return {"idx": idx, "by": cls.__name__, "tag": cls.tag, "hyp": model(dataset[idx])}


class BeamRunner(BaseRunner):
    """A runner with its own constructor option ``beam``: forward gets it from the env, merge from ``self``."""

    def __init__(self, provider, beam=1, **kwargs):
        super().__init__(provider, **kwargs)
        self.beam = beam

    @staticmethod
    def forward(idx, dataset, model, beam=1, **env):
        # logs ``<idx> beam=<beam>`` to calls_file
        note_call(env, f"{idx} beam={beam}")
        return {"idx": idx, "beam": beam, "hyp": model(dataset[idx]) * beam}

    def merge(self, shard_dirs):
        # writes <root>/merged (a line a record, then ``merge beam=<beam>``); returns the records and its beam
        records = super().merge(shard_dirs)
        root = self.output_dir / self.shard_subdir if self.shard_subdir else self.output_dir
        lines = [f"{r['idx']} beam={r['beam']} {r['hyp']}" for r in records] + [f"merge beam={self.beam}"]
        (root / "merged").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        return {"records": records, "merge_beam": self.beam}


class BatchRunner(BaseRunner):
    """Batch-aware forward as in the docs: one index, or a list of indices when batch_size is set."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        note_call(env, idx)
        if isinstance(idx, int):
            return {"kind": "one", "idx": idx, "hyp": model(dataset[idx])}
        return {"kind": type(idx).__name__, "idx": list(idx), "hyp": [model(dataset[i]) for i in idx]}


class ExplicitRunner(BaseRunner):
    """forward without ``**env``: only the names it declares may be passed."""

    @staticmethod
    def forward(idx, dataset, model, device):
        return [idx, device, model(dataset[idx])]


class KeywordOnlyRunner(BaseRunner):
    """Older ESPnet3 style ``forward(idx, *, dataset, model)``, plus a defaulted parameter no env gives."""

    @staticmethod
    def forward(idx, *, dataset, model, beam=1):
        return [idx, beam, model(dataset[idx])]


class EnvKeysRunner(BaseRunner):
    """Returns the names it received through ``**env``."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        return sorted(env)


class NeedsDeviceRunner(BaseRunner):
    """forward that needs a ``device`` env key."""

    @staticmethod
    def forward(idx, dataset, model, device, **env):
        return [idx, device]


class SelfRunner(BaseRunner):
    """Common mistake from the docs: forward capturing self (not a static or class method)."""

    def forward(self, idx, dataset, model, **env):  # deliberately not a staticmethod
        return model(dataset[idx])


class UnpicklableRunner(BaseRunner):
    """Default state runner whose results cannot be pickled into ``_state.pkl``."""

    @staticmethod
    def forward(idx, dataset, model, **env):
        return lambda: idx


class PoisonTextRunner(BaseRunner):
    """Workflow-tier text runner: ``<idx> <HYP>`` lines into split.N/text; fails or holds per ``poison_dir``."""

    @staticmethod
    def forward(idx, dataset, model, poison_dir="", output_dir="", shard_subdir="", **env):
        faults.at("forward", Path(output_dir, shard_subdir, f"item.{idx}"))
        if poison_dir and (Path(poison_dir) / str(idx)).exists():
            raise RuntimeError(f"poisoned item {idx}")
        hold = Path(poison_dir) / f"hold.{idx}" if poison_dir else None
        if hold is not None and hold.exists():
            (Path(poison_dir) / f"started.{idx}").write_text(os.environ.get("SLURM_JOB_ID", ""))
            deadline = time.monotonic() + HOLD_LIMIT_S
            while hold.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        return {"idx": idx, "text": model(dataset[idx])}

    @staticmethod
    def open_writers(shard_dir, **env):
        faults.at("open_writers", shard_dir)
        return {"text": (shard_dir / "text").open("w", encoding="utf-8")}

    @staticmethod
    def write_record(writers, result, state, **env):
        faults.write(writers["text"], f"{result['idx']} {result['text']}\n", "write_record")

    @staticmethod
    def close_writers(writers):
        BaseRunner.close_writers(writers)
        faults.at("close_writers", Path(writers["text"].name).parent)

    def merge(self, shard_dirs):
        out = self.output_dir / self.shard_subdir / "text"
        with out.open("w", encoding="utf-8") as f:
            for shard_dir in shard_dirs:
                faults.write(f, (shard_dir / "text").read_text(encoding="utf-8"), "merge")
        return {"lines": sum(1 for _ in out.open(encoding="utf-8"))}


class DeviceTextRunner(PoisonTextRunner):
    """Writes, as each item's text, the device the shard was given and the GPUs it sees."""

    @staticmethod
    def forward(idx, dataset, model, device, **env):
        return {"idx": idx, "text": f"{device}@{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"}


class SuffixRunner(PoisonTextRunner):
    """Constructor option ``suffix``: appended to every text; the merge checks it and reports it in its result."""

    def __init__(self, provider, suffix="", **kwargs):
        super().__init__(provider, **kwargs)
        self.suffix = suffix

    @staticmethod
    def forward(idx, dataset, model, suffix="", **env):
        result = PoisonTextRunner.forward(idx, dataset, model, **env)
        return {**result, "text": result["text"] + suffix}

    def merge(self, shard_dirs):
        result = super().merge(shard_dirs)
        lines = (self.output_dir / self.shard_subdir / "text").read_text(encoding="utf-8").splitlines()
        if not all(line.endswith(self.suffix) for line in lines):
            raise RuntimeError(f"a shard did not get suffix {self.suffix!r}")
        return {**result, "suffix": self.suffix}


# ----------------------------------------------------------------- models
def shout(sample: Mapping[str, Any]) -> str:
    """The docs-style model: one sample in, its hypothesis text out."""
    return sample["word"].upper()


class Shouter:
    """Model of CountingInferenceProvider: ``model(word=...)`` for a word, a list of words, or a sample dict."""

    def __init__(self, suffix: str = ""):
        self.suffix = suffix

    def __call__(self, word: Any) -> Any:
        if isinstance(word, list):
            return [self(w) for w in word]
        if isinstance(word, Mapping):
            word = word["word"]
        return word.upper() + self.suffix


def upper(text: str) -> str:
    """UttProvider's model: ``model(text=...)`` upper-cased."""
    return text.upper()


class EchoModel:
    """SpeechProvider's default model: ``model(speech=, text=, scale=)`` for one item or lists of items."""

    def __call__(self, speech: Any, text: Any = None, scale: float = 1.0) -> Any:
        import numpy as np

        if isinstance(speech, list):
            return [self(s, t, scale) for s, t in zip(speech, text or [None] * len(speech))]
        return {"n": int(len(speech)), "feats": np.asarray(speech) * scale, "text": text}


class NoBatchModel:
    """Accepts one item only (a list raises TypeError), and counts calls."""

    calls = 0

    def __call__(self, speech: Any) -> Any:
        type(self).calls += 1
        if isinstance(speech, list):
            raise TypeError("expected an array, got a list")
        return {"n": int(len(speech))}


class OOMModel:
    """Runs out of memory on any batch of more than one item."""

    error: Any = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def __call__(self, speech: Any) -> Any:
        if isinstance(speech, list) and len(speech) > 1:
            raise self.error
        return {"n": 1}


class FailsOnLongModel:
    """Fails for batches, and for any single item longer than 8 samples."""

    def __call__(self, speech: Any) -> Any:
        if isinstance(speech, list):
            raise ValueError("no batches")
        if len(speech) > 8:
            raise ValueError(f"too long: {len(speech)}")
        return {"n": int(len(speech))}


# ---------------------------------------------- output functions, writers
def to_record(data: Any, model_output: Any, idx: Any) -> Any:
    """InferenceRunner ``output_fn``: result dict(s) with ``text`` and ``length`` fields."""
    if isinstance(idx, list):
        return [to_record(d, o, i) for d, o, i in zip(data, model_output, idx)]
    maybe_die(idx)
    return {"utt_id": data["utt_id"], "text": model_output, "length": len(model_output)}


def hyp_fields(data, model_output, idx):
    """output_fn: two fields (``hyp``, ``n_chars``); fault point ``output_fn`` on ``item.<idx>``."""
    faults.at("output_fn", f"item.{idx}")
    return {"utt_id": data["utt_id"], "hyp": model_output, "n_chars": len(model_output)}


def every_kind_output_fn(data: Any, model_output: Any, idx: Any) -> Any:
    """Result dicts (single or batched) with every kind of value the runner writes (str, numpy int, array, dict)."""
    import numpy as np

    if isinstance(idx, list):
        return [every_kind_output_fn(d, o, i) for d, o, i in zip(data, model_output, idx)]
    return {
        "utt_id": data["utt_id"],
        "hyp": model_output["text"].upper(),
        "n": np.int64(model_output["n"]),
        "feats": model_output["feats"],
        "meta": {"idx": idx, "text": data["text"]},
    }


def output_fn_nested(data: Any, model_output: Any, idx: Any) -> Any:
    """Each item as a nested list ``[[record]]`` (flattened by the runner)."""
    return [[{"utt_id": d["utt_id"], "hyp": o["text"]}] for d, o in zip(data, model_output)]


def output_fn_sparse(data: Any, model_output: Any, idx: Any) -> Any:
    """Only even items have an ``extra`` field: fields differ between shards."""
    record = {"utt_id": data["utt_id"], "hyp": model_output["text"]}
    if idx % 2 == 0:
        record["extra"] = f"e{idx}"
    return record


def id_output_fn(data: Any, model_output: Any, idx: Any) -> Any:
    """Adds the id to model outputs (single or batched)."""
    if isinstance(idx, list):
        return [id_output_fn(d, o, i) for d, o, i in zip(data, model_output, idx)]
    return {"utt_id": data["utt_id"], **model_output}


def asr_output_fn(data: Any, model_output: Any, idx: Any) -> Any:
    """A "recognizer": the transcript, with the last word dropped for odd items."""
    words = data["text"].split()
    return {"utt_id": data["utt_id"], "hyp": " ".join(words[:-1] if idx % 2 else words)}


def text_writer(value: Any, path: Path, suffix: str = ".txt") -> Path:
    """Custom artifact writer: the array's values, one per line."""
    import numpy as np

    out = Path(f"{path}{suffix}")
    out.write_text("\n".join(f"{v:.3f}" for v in np.asarray(value).ravel()) + "\n", encoding="utf-8")
    return out


def bad_writer(value: Any, path: Path) -> Any:
    """A writer that writes nothing and says so wrongly."""
    return f"{path}.missing"


# ---------------------------------------------------------------- helpers
def plan_of(runner: BaseRunner, indices: Any) -> ShardPlan:
    """The plan ``runner(indices)`` makes (without running or writing anything)."""
    return make_plan(runner.job_spec(), list(indices))


def state_of(shard_dir: Any) -> Dict[str, Any]:
    """The saved state of a finished shard."""
    return load_state(Path(shard_dir))


def run_main(*args: Any, check: bool = True) -> SimpleNamespace:
    """``espnet3_rules.cli.main.main(args)`` in this process: ``returncode``, ``stdout``, ``stderr``
    (the CLI's code without an interpreter start; :func:`cli` runs it as the rules do)."""
    from espnet3_rules.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if check and code != 0:
        raise AssertionError(f"exit {code}\n{out.getvalue()}{err.getvalue()}")
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def cli(
    *args: Any, env: Optional[Mapping[str, str]] = None, path: Sequence[Any] = (), check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m espnet3_rules *args`` with this checkout, the toys and ``path`` importable."""
    proc_env = dict(os.environ)
    proc_env.pop(KILL_AT, None)
    proc_env.pop(FAIL_AT, None)
    proc_env.update(env or {})
    proc_env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), *map(str, path)])
    proc = subprocess.run(
        [sys.executable, "-m", "espnet3_rules", *map(str, args)], capture_output=True, text=True, env=proc_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def write_config(path: Path, **job: Any) -> Path:
    """Write a YAML config with one job ``j`` and return its path."""
    path = Path(path)
    path.write_text(yaml.safe_dump({"jobs": {"j": job}}), encoding="utf-8")
    return path


def snapshot(directory: Path) -> Dict[str, bytes]:
    """Every result file under ``directory`` (relative path -> bytes): not Snakemake's own ``.snakemake/``
    nor the shards' ``attempts.json`` (a record of times and pids)."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ATTEMPTS_NAME and ".snakemake" not in p.relative_to(directory).parts
    }


def expected_text(indices: Any) -> str:
    """What MyTextRunner writes for ``indices``."""
    return "".join(f"utt{i:03d} W{i}\n" for i in indices)


# --- inference contract (issue 12)


def contract_kind_class(kind_base: type) -> type:
    """A ``messages`` kind (a list of turns) on ``kind_base``: ours or ESPnet3's ``Kind``."""

    class MessagesKind(kind_base):
        def check(self, value, field, model, *, output):
            if not isinstance(value, list) or not all(isinstance(turn, str) for turn in value):
                raise TypeError(f"{field.name!r} must be a list of turns")
            return value

    return MessagesKind


def write_contract_module(directory: Path, name: str, prefix: str = "espnet3_rules") -> Path:
    """Write ``<directory>/<name>.py``, a recipe module (``contract.imports``) that registers
    the normalizer ``<name>_shout`` (upper case plus ``!``) through ``<prefix>.contract``."""
    path = Path(directory) / f"{name}.py"
    path.write_text(
        f"from {prefix}.contract import register_normalizer\n\n"
        f"register_normalizer({name + '_shout'!r}, lambda text: text.upper() + '!')\n",
        encoding="utf-8",
    )
    return path


# --- inference providers (issue 12)
from espnet3_rules.systems.base.inference_provider import InferenceProvider as SystemsInferenceProvider  # noqa: E402


class ToyOrganizer:
    """DataOrganizer stand-in built by Hydra: ``test[name]`` is ``words_dataset(size)`` for each
    ``test_sizes`` entry; logs ``organizer`` to ``log_dir``."""

    def __init__(self, test_sizes: Mapping[str, int], log_dir: Optional[str] = None):
        log_event({"log_dir": log_dir}, "organizer")
        self.test = {name: words_dataset(int(size)) for name, size in test_sizes.items()}


class ToyModel(Shouter):
    """Shouter built by Hydra with ``device``; logs ``model:<device>`` to ``log_dir``. ``vocab``: a
    file path kept as given; ``probe_module``: a module name it tries to import while it is built."""

    def __init__(self, device: str, suffix: str = "", log_dir: Optional[str] = None, vocab: Optional[str] = None,
                 probe_module: Optional[str] = None):
        super().__init__(suffix)
        self.device, self.vocab, self.built_in = device, vocab, os.getcwd()
        self.probe_imported = None
        if probe_module:
            import importlib

            try:
                importlib.import_module(probe_module)
                self.probe_imported = True
            except ModuleNotFoundError:
                self.probe_imported = False
        log_event({"log_dir": log_dir}, f"model:{device}")


class WordsSystemsProvider(SystemsInferenceProvider):
    """ESPnet3's systems-level provider with only ``build_dataset`` overridden (``words_dataset(config.n)``,
    logged as ``dataset``); the model comes from ``config.model``."""

    @staticmethod
    def build_dataset(config):
        log_event(config, "dataset")
        return words_dataset(int(config["n"]))


class EagerEnvProvider(CountingInferenceProvider):
    """Reads ``self._local_env`` in its own ``__init__``, after ``super().__init__()``, as an ESPnet3 subclass may."""

    def __init__(self, config=None, params=None):
        super().__init__(config, params)
        self.n_items = len(self._local_env["dataset"])


# --- InferenceRunner (issue 12)
from espnet3_rules import InferenceRunner  # noqa: E402 - kept in this section, for merging


class StaticHooksRunner(InferenceRunner):
    """Overrides ESPnet3's two adaptation hooks as ``@staticmethod``s: inputs renamed, output named."""

    @staticmethod
    def prepare_model_inputs(inputs: Dict[str, Any]) -> Dict[str, Any]:
        return {"speech": inputs["wave"]}

    @staticmethod
    def format_output(result: Any, *, batched: bool) -> Any:
        name = lambda r: {"utt_id": f"u{r['n']}", "hyp": f"n={r['n']}"}  # noqa: E731
        return [name(r) for r in result] if batched else name(result)


class ClassHooksRunner(StaticHooksRunner):
    """The same hooks as ``@classmethod``s, reading a class attribute."""

    prefix = "c"

    @classmethod
    def format_output(cls, result: Any, *, batched: bool) -> Any:
        name = lambda r: {"utt_id": f"{cls.prefix}{r['n']}", "hyp": f"n={r['n']}"}  # noqa: E731
        return [name(r) for r in result] if batched else name(result)


class SuperForwardRunner(ClassHooksRunner):
    """A class-method ``forward`` override that keeps the checked path through ``super().forward``."""

    @classmethod
    def forward(cls, idx: Any, dataset: Any = None, model: Any = None, **env: Any) -> Any:
        result = super().forward(idx, dataset=dataset, model=model, **env)
        return result if isinstance(idx, list) else {**result, "extra": "x"}


def espnet3_style_writer(value: Any, output_path: Path, precision: int = 3, sample_rate: Any = None) -> Path:
    """ESPnet3's custom writer signature (``writer(value=, output_path=, **options)``): values one per line."""
    import numpy as np

    out = Path(f"{output_path}.txt")
    lines = [f"{v:.{precision}f}" for v in np.asarray(value).ravel()]
    out.write_text("\n".join([f"rate={sample_rate}", *lines]) + "\n", encoding="utf-8")
    return out


# ------------------------------------------- BaseRunner conformance (issue 12: forward kinds, hooks)
class ClassHelperRunner(CollectRunner):
    """A @classmethod forward built from ``cls`` helpers (a class attribute, a static and a class method)."""

    prefix = "A"

    @staticmethod
    def render(text):
        return text.lower()

    @classmethod
    def label(cls, idx):
        return f"{cls.prefix}{idx}"

    @classmethod
    def forward(cls, idx, dataset, model, **env):
        note_call(env, idx)
        return {"idx": idx, "label": cls.label(idx), "hyp": cls.render(model(dataset[idx]))}


class SubClassHelperRunner(ClassHelperRunner):
    """The same forward; ``cls`` is the subclass, so its helpers are the ones called."""

    prefix = "B"

    @staticmethod
    def render(text):
        return f"<{text}>"


class PositionalCloseRunner(CollectRunner):
    """close_writers takes the state positionally under another name (ESPnet3 passes it positionally)."""

    @staticmethod
    def close_writers(writers, st):
        return {"n_closed": len(st["records"]), "saw_writers": "_writers" in st}


# ------------------------------------------- exec: runner(indices) with a parallel config (Snakemake jobs)
class TracedTextRunner(MyTextRunner):
    """MyTextRunner that traces its shard process in ``<trace_dir>/<pid>`` (start/end times, SLURM job)
    and can be made to meet another shard, hold, or fail:

    - ``meet``: at its first item a shard waits until this many shard processes have started;
    - ``hold_item`` / ``hold_file``: that item waits while ``hold_file`` exists;
    - ``fail_item`` / ``fail_file``: that item raises while ``fail_file`` exists.
    """

    @staticmethod
    def forward(idx, dataset, model, trace_dir=None, meet=0, hold_item=None, hold_file=None,
                fail_item=None, fail_file=None, **env):
        trace = Path(trace_dir) / str(os.getpid())
        if not trace.exists():
            trace.write_text(json.dumps({"start": time.time(), "slurm_job": os.environ.get("SLURM_JOB_ID")}) + "\n")
            while len(list(Path(trace_dir).iterdir())) < meet:
                time.sleep(0.05)
        if idx == hold_item:
            while Path(hold_file).exists():
                time.sleep(0.05)
        if idx == fail_item and Path(fail_file).exists():
            raise RuntimeError(f"forward failed at item {idx}")
        note_call(env, idx)
        result = MyTextRunner.forward(idx, dataset, model, **env)
        append_line(trace, json.dumps({"end": time.time()}))
        return result


# ----------------------------------------------------------------- metrics (issue 13: BaseMetric)


class CountRows(BaseMetric):
    """Counts rows; keeps each ``update``'s batch size in a ``cat`` state, so chunking shows."""

    inputs = (Field("ref", "text"), Field("hyp", "text", optional=True))
    outputs = (Field("rows", "number"),)
    chunk_size = 2

    def __init__(self):
        super().__init__()
        self.add_state("rows", 0, "sum")
        self.add_state("batch_sizes", [], "cat")

    def update(self, *, ref, hyp=None):
        self.rows += len(ref)
        self.batch_sizes.append(len(ref))

    def compute(self):
        return {"rows": self.rows}


class UndeclaredMetric(BaseMetric):
    """Declares neither inputs nor outputs."""

    def update(self, **values):
        pass

    def compute(self):
        return {}


class SkipsInitMetric(UndeclaredMetric):
    """Declares nothing and skips ``super().__init__()``: construction alone does not catch it."""

    def __init__(self):
        pass


class TextOutputMetric(CountRows):
    """An output of kind ``text``: metric outputs must be numbers."""

    outputs = (Field("rows", "text"),)


class WrongResultMetric(CountRows):
    """Returns a string where it declares a number."""

    def compute(self):
        return {"rows": "many"}


# ------------------------------------------- journal: shards that resume mid-way (issue 14)
class AppendTextRunner(PoisonTextRunner):
    """PoisonTextRunner whose writer opts in to resuming: ``split.N/text`` opened in append mode."""

    resumable_writers = True

    @staticmethod
    def open_writers(shard_dir, **env):
        faults.at("open_writers", shard_dir)
        return {"text": (shard_dir / "text").open("a", encoding="utf-8")}


class WriteModeTextRunner(AppendTextRunner):
    """Opts in to resuming but opens its file with ``"w"`` (the opt-in needs append mode)."""

    resumable_writers = True

    @staticmethod
    def open_writers(shard_dir, **env):
        return {"text": (shard_dir / "text").open("w", encoding="utf-8")}


class RecordsRunner(BaseRunner):
    """The default hooks: each ``{idx, text}`` result into ``state["records"]``; ``forward`` fault point."""

    @staticmethod
    def forward(idx, dataset, model, output_dir="", shard_subdir="", **env):
        faults.at("forward", Path(output_dir, shard_subdir, f"item.{idx}"))
        return {"idx": idx, "text": model(dataset[idx])}


class SumStateRunner(RecordsRunner):
    """Its own state hooks: a running character count and the texts, kept in the shard state."""

    @classmethod
    def init_state(cls, shard_id=0, **env):
        return {"shard_id": shard_id, "chars": 0, "texts": []}

    @classmethod
    def reduce_state(cls, state, result, **env):
        state["chars"] += len(result["text"])
        state["texts"].append(result["text"])
        return state

    @classmethod
    def finalize_state(cls, state, **env):
        return {**state, "n": len(state["texts"])}


# ------------------------------------------- SIGTERM on SLURM: a slow shard that resumes (issue 14)
#: Seconds SlowAppendTextRunner spends on each item.
ITEM_SLEEP_S = "TOYS_ITEM_SLEEP_S"


class SlowAppendTextRunner(AppendTextRunner):
    """AppendTextRunner that appends each item it computes to ``<poison_dir>/computed`` (one line:
    the item and ``$SLURM_JOB_ID``), then sleeps ``$TOYS_ITEM_SLEEP_S`` seconds."""

    @staticmethod
    def forward(idx, dataset, model, poison_dir="", **env):
        with open(Path(poison_dir, "computed"), "a", encoding="utf-8") as trace:
            trace.write(f"{idx} {os.environ.get('SLURM_JOB_ID', '')}\n")
        time.sleep(float(os.environ.get(ITEM_SLEEP_S) or 0))
        return AppendTextRunner.forward(idx, dataset, model, poison_dir=poison_dir, **env)
