"""ESPnet3-style provider and ``output_fn`` of the tone ASR example.

Job config (``provider_config``)::

    data_dir: data/tone_test     # Kaldi dir from `python -m espnet3_rules.examples.tone_asr prepare`
    sample_rate: 16000           # optional; wavs at another rate are refused
    model: {threshold: 3.5}      # optional ToneCTCModel arguments

``params.device`` (default ``cpu``) picks where the model runs: the provider is
ESPnet3's systems-level one, which merges ``params`` into the config its builders see.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping

from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.systems.base.inference_provider import InferenceProvider
from espnet3_rules.engine.plan import jsonable
from .data import SAMPLE_RATE, KaldiDataset


def _plain(config: Any) -> Dict[str, Any]:
    """A provider config (OmegaConf or mapping) as a plain dict."""
    data = jsonable(config if config is not None else {})
    if not isinstance(data, dict):
        raise ContractError(f"provider_config must be a mapping, got {type(config).__name__}")
    return data


class ToneASRProvider(InferenceProvider):
    """Builds the Kaldi-dir dataset and the constructed :class:`ToneCTCModel`."""

    @staticmethod
    def build_dataset(config: Any) -> KaldiDataset:
        """``KaldiDataset(provider_config.data_dir)``; audio is read per item."""
        options = _plain(config)
        if not options.get("data_dir"):
            raise ContractError("provider_config.data_dir is required: the Kaldi data dir holding wav.scp and text")
        return KaldiDataset(options["data_dir"], options.get("sample_rate", SAMPLE_RATE))

    @staticmethod
    def build_model(config: Any) -> Any:
        """``ToneCTCModel(**provider_config.model)`` on ``params.device``."""
        from .model import ToneCTCModel  # torch is imported only when a model is built

        options = _plain(config)
        model_options = options.get("model") or {}
        if not isinstance(model_options, Mapping):
            raise ContractError(
                f"provider_config.model must be a mapping of ToneCTCModel arguments, got {model_options!r}"
            )
        known = set(inspect.signature(ToneCTCModel).parameters) - {"device", "sample_rate"}
        unknown = sorted(set(model_options) - known)
        if unknown:
            raise ContractError(f"provider_config.model has unknown keys {unknown}; ToneCTCModel takes {sorted(known)}")
        return ToneCTCModel(
            **model_options, sample_rate=options.get("sample_rate", SAMPLE_RATE), device=options.get("device", "cpu")
        )


def output_fn(data: Any, model_output: Any, idx: Any) -> Any:
    """Attach ``utt_id`` (and ``ref`` for hypotheses) to the model's per-utterance dicts.

    ``data``/``model_output`` are lists for a batch and single items otherwise,
    as :class:`espnet3_rules.InferenceRunner` passes them.
    """
    if isinstance(data, list):
        return [output_fn(item, out, i) for item, out, i in zip(data, model_output, idx, strict=True)]
    result = {"utt_id": data["utt_id"], **model_output}
    if "hyp" in model_output:
        result["ref"] = data["text"]
    return result
