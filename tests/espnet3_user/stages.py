"""User classes of the inference stage, named by ``_target_`` in an ESPnet3 inference config.

``infer(config)`` runs them (``tests/test_espnet3_stages.py``, and the import-switched copy);
the recipe-shaped config ``tests/espnet3_recipe/conf/inference.yaml`` names the switched copy.
"""

from espnet3.systems.base.inference_provider import InferenceProvider
from espnet3.systems.base.inference_runner import InferenceRunner

from espnet3_user.data import ScoreModel, make_items


class StageOrganizer:
    """``dataset._target_``: ``organizer.test[name]`` holds ``n_items`` toy items per ``{name, seed}`` entry."""

    def __init__(self, n_items, test):
        self.test = {entry["name"]: make_items(int(n_items), int(entry.get("seed", 0))) for entry in test}


class StageProvider(InferenceProvider):
    """The default dataset builder (``config.dataset`` through Hydra); model: ``ScoreModel(config.scale)``."""

    @staticmethod
    def build_model(config):
        return ScoreModel(float(config.get("scale", 1.0)))


class StageRunner(InferenceRunner):
    """An InferenceRunner subclass: a ``format_output`` of its own and a constructor option (``tag``)."""

    def __init__(self, provider, tag="", **kwargs):
        super().__init__(provider, **kwargs)
        self.tag = tag

    @staticmethod
    def format_output(result, *, batched):
        """Add ``n_chars`` (the hypothesis length) to each result."""
        add = lambda r: {**r, "n_chars": len(r["hyp"])}  # noqa: E731
        return [add(r) for r in result] if batched else add(result)
