"""An ESPnet3 ``InferenceProvider`` for ESPnet3's own ``InferenceRunner``, and the params infer() gives it.

``inference_params`` are the params ESPnet3's ``infer()`` gives the provider
(``espnet3/systems/base/inference.py``): ``input_key``, ``idx_key``,
``output_keys``, ``output_fn_path``, ``output_artifacts``.
"""

from espnet3.parallel.inference_provider import InferenceProvider

from espnet3_user.data import ScoreModel, make_items

#: ``output_fn_path`` of the config (a dotted path, imported by InferenceRunner.forward).
OUTPUT_FN = "espnet3_user.data.format_output"


def inference_params(output_keys=None):
    """The params infer() builds for this toy: no contract, legacy ``output_fn``, no artifact settings."""
    return {
        "input_key": ["text", "number"],
        "idx_key": "utt_id",
        "output_keys": output_keys,
        "output_fn_path": OUTPUT_FN,
        "output_artifacts": {},
    }


class ToyInferenceProvider(InferenceProvider):
    """dataset: ``config.n_items`` toy items; model: :class:`ScoreModel` (``config.scale``)."""

    @staticmethod
    def build_dataset(config):
        return make_items(int(config["n_items"]), int(config.get("seed", 0)))

    @staticmethod
    def build_model(config):
        return ScoreModel(float(config.get("scale", 1.0)))



def from_inference_config(inference_config, params=None):
    """The provider as ESPnet3's ``infer()`` instantiates it (``provider._target_`` of an inference config).

    ``infer()`` calls ``instantiate(config.provider, inference_config=config, params=...)``;
    this provider reads ``n_items`` / ``seed`` / ``scale`` from that config.
    """
    return ToyInferenceProvider(inference_config, params=params)
