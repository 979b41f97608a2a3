"""InferenceProvider / InferenceRunner programs written for ESPnet3 202611 (``espnet3.systems.base``).

Each ``program_*`` function takes a relative ``output_dir`` and returns what the user
would look at (see :mod:`espnet3_user.runners`). Two provider bases: the parallel one
(``espnet3.parallel.inference_provider``: builds its env in ``__init__``) and the
systems-level one (``espnet3.systems.base.inference_provider``: Hydra builders,
``params`` merged into the config).
"""

from pathlib import Path

from espnet3.parallel.inference_provider import InferenceProvider
from espnet3.systems.base.inference_provider import InferenceProvider as SystemsInferenceProvider
from espnet3.systems.base.inference_runner import InferenceRunner

from espnet3_user.data import make_items
from espnet3_user.targets import EchoModel

N_ITEMS = 7
#: ``build_model`` calls of :class:`ToyProvider`, and model calls of the failing models.
BUILDS = []
MODEL_CALLS = []
PARAMS = {"input_key": ["utt_id", "text"], "idx_key": "utt_id"}


def reset():
    """Called by the harness before each program."""
    BUILDS.clear()
    MODEL_CALLS.clear()


def counters():
    """What the model and builder counters saw (compared between the two runs by the tests)."""
    return {"builds": len(BUILDS), "model_calls": len(MODEL_CALLS)}


class ToyProvider(InferenceProvider):
    """dataset: ``n_items`` toy items; model: ``config.model`` names one of this module's models."""

    @staticmethod
    def build_dataset(config):
        items = make_items(int(config["n_items"]))
        for i, item in enumerate(items):
            if config.get("prompt_every") and i % int(config["prompt_every"]) == 0:
                item["prompt"] = "p"
        return items

    @staticmethod
    def build_model(config):
        BUILDS.append(1)
        return MODELS[config.get("model", "echo")]()


class LocalEnvProvider(ToyProvider):
    """Reads ``self._local_env`` (ESPnet3 builds it in ``__init__``) and adds an entry."""

    def build_env_local(self):
        return {**self._local_env, "built_in_init": True}


class DatasetOnlyProvider(SystemsInferenceProvider):
    """Overrides only ``build_dataset``; the model comes from the config's Hydra ``model``."""

    @staticmethod
    def build_dataset(config):
        return make_items(int(config["n_items"]), seed=4)


def model_calls_failing(**inputs):
    MODEL_CALLS.append(1)
    raise ValueError("model rejects this batch")


def model_out_of_memory(**inputs):
    MODEL_CALLS.append(1)
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def model_unsorted_fields(utt_id, text):
    if isinstance(text, list):
        return [model_unsorted_fields(u, t) for u, t in zip(utt_id, text)]
    return {"zeta": len(text), "utt_id": utt_id, "hyp": text.upper(), "alpha": text[:3]}


def model_shouting(text):
    """For the normalizer contract: padded, upper-case text under the declared output ``text``."""
    if isinstance(text, list):
        return [model_shouting(t) for t in text]
    return {"text": f"  {text.upper()}  "}


def model_without_ref(utt_id, text):
    return {"utt_id": utt_id, "hyp": text}


MODELS = {
    "echo": lambda: EchoModel(tag="e:"),
    "failing": lambda: model_calls_failing,
    "oom": lambda: model_out_of_memory,
    "unsorted": lambda: model_unsorted_fields,
    "shouting": lambda: model_shouting,
    "without_ref": lambda: model_without_ref,
}


def provider(model="echo", params=PARAMS, cls=ToyProvider, **config):
    from omegaconf import OmegaConf

    return cls(OmegaConf.create({"n_items": N_ITEMS, "model": model, **config}), params=dict(params))


def infer(output_dir, prov=None, runner_cls=InferenceRunner, batch_size=None, **runner_kwargs):
    runner = runner_cls(prov or provider(), output_dir=output_dir, batch_size=batch_size, **runner_kwargs)
    return runner(range(N_ITEMS))


# ------------------------------------------------------------------ providers
def describe(prov):
    return {
        "has_local_env": hasattr(prov, "_local_env"),
        "local_env_keys": sorted(getattr(prov, "_local_env", None) or {}),
        "params": dict(prov.params),
        "beam_in_config": "beam" in prov.config,
        "builds": len(BUILDS),
    }


def program_parallel_provider_env(output_dir):
    """The parallel provider after ``__init__``: its ``_local_env``, ``params``, config and build count."""
    return describe(provider(params={**PARAMS, "beam": 3}))


def program_systems_provider_env(output_dir):
    """The systems-level provider after ``__init__`` (``inference_config=``): params merged into the config."""
    from omegaconf import OmegaConf

    prov = SystemsInferenceProvider(inference_config=OmegaConf.create({"n_items": 3}), params={"beam": 3})
    return describe(prov)


def program_parallel_provider_builds_once(output_dir):
    return [infer(output_dir), len(BUILDS)]


def program_subclass_reads_local_env(output_dir):
    return infer(output_dir, provider(cls=LocalEnvProvider))


def hydra_config(**extra):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "n_items": N_ITEMS,
        "dataset": {"_target_": "espnet3_user.targets.ToyOrganizer", "n_items": N_ITEMS,
                    "test_sets": {"a": 1, "b": 2}},
        "test_set": "b",
        "model": {"_target_": "espnet3_user.targets.EchoModel", "tag": "h:"},
        **extra,
    })  # fmt: skip


def program_systems_provider_hydra_builders(output_dir):
    """Dataset (organizer ``test[test_set]``) and model (with its device) built from Hydra ``_target_``s."""
    return infer(output_dir, SystemsInferenceProvider(hydra_config(), params=PARAMS), batch_size=3)


def program_systems_provider_overrides_build_dataset(output_dir):
    return infer(output_dir, DatasetOnlyProvider(hydra_config(), params=PARAMS))


# ------------------------------------------------------------------ InferenceRunner
def program_runner_key_arguments(output_dir):
    runner = InferenceRunner(provider(), idx_key="utt_id", hyp_key=("hyp", "alt"), ref_key="ref", output_dir=output_dir)
    return [runner.idx_key, runner.hyp_key, runner.ref_key]


def program_hyp_and_ref_keys_checked_when_writing(output_dir):
    params = {**PARAMS, "hyp_key": ["hyp"], "ref_key": ["ref"]}
    return infer(output_dir, provider("without_ref", params=params), hyp_key="hyp", ref_key="ref")


def program_resolve_idx_key(output_dir):
    return InferenceRunner(provider(), idx_key="utt_id").resolve_idx_key({"utt_id": "u1", "hyp": "x"})


def program_resolve_idx_key_missing(output_dir):
    return InferenceRunner(provider(), idx_key="key").resolve_idx_key({"utt_id": "u1", "hyp": "x"})


class HookRunner(InferenceRunner):
    """Overrides both documented hooks: inputs adapted before the call, raw results named after it."""

    @staticmethod
    def prepare_model_inputs(inputs):
        return {**inputs, "text": [t.title() for t in inputs["text"]] if isinstance(inputs["text"], list)
                else inputs["text"].title()}  # fmt: skip

    @staticmethod
    def format_output(result, *, batched):
        def named(output):
            return {"utt_id": output["utt_id"], "hyp": output["hyp"], "batched": str(batched)}

        return [named(r) for r in result] if batched else named(result)


def program_prepare_model_inputs_and_format_output(output_dir):
    return infer(output_dir, runner_cls=HookRunner, batch_size=3)


def program_no_input_key(output_dir):
    return infer(output_dir, provider(params={"idx_key": "utt_id"}))


def program_dataset_item_without_input_key(output_dir):
    return infer(output_dir, provider(params={**PARAMS, "input_key": ["utt_id", "speaker"]}))


TEXT_CONTRACT = {
    "inputs": {"text": {"kind": "text"}, "prompt": {"kind": "text", "optional": True}},
    "outputs": {"text": {"kind": "text", "normalize": ["strip", "to_lower"]}},
}


def program_optional_inputs_mixed_in_a_batch(output_dir):
    params = {"input_key": ["text", "prompt"], "idx_key": "utt_id", "inference_contract": TEXT_CONTRACT}
    return infer(output_dir, provider("shouting", params=params, prompt_every=2), batch_size=2)


def program_declared_normalizers_applied(output_dir):
    contract = {"inputs": {"text": {"kind": "text"}}, "outputs": TEXT_CONTRACT["outputs"]}
    params = {"input_key": "text", "idx_key": "utt_id", "inference_contract": contract}
    return infer(output_dir, provider("shouting", params=params), batch_size=3)


def program_failing_batch(output_dir):
    return infer(output_dir, provider("failing"), batch_size=3)


def program_out_of_memory(output_dir):
    return infer(output_dir, provider("oom"), batch_size=3)


def program_call_and_merge_return_values(output_dir):
    runner = InferenceRunner(provider("unsorted"), output_dir=output_dir, batch_size=2)
    return [runner(range(N_ITEMS)), runner.merge([Path(output_dir) / "split.0"])]


def program_forward_called_on_the_class(output_dir):
    """``InferenceRunner.forward`` called on the class itself, as its docstring shows."""
    dataset = [{"utt_id": "u0", "text": "a b"}, {"utt_id": "u1", "text": "c d"}]
    return InferenceRunner.forward([0, 1], dataset=dataset, model=EchoModel(), input_key=["utt_id", "text"])


class SuperForwardRunner(InferenceRunner):
    """A ``@classmethod`` forward that post-processes ``super().forward``."""

    @classmethod
    def forward(cls, idx, dataset=None, model=None, **kwargs):
        result = super().forward(idx, dataset=dataset, model=model, **kwargs)
        return {**result, "hyp": result["hyp"][::-1]}


def program_subclass_extends_classmethod_forward(output_dir):
    return infer(output_dir, runner_cls=SuperForwardRunner)
