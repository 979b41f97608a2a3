"""Hydra ``_target_`` classes of the inference programs (no ESPnet3 imports): an organizer and models."""

from espnet3_user.data import make_items


class ToyOrganizer:
    """A data organizer as ESPnet3's systems-level provider expects: ``organizer.test[<test_set>]``."""

    def __init__(self, n_items, test_sets):
        self.test = {name: make_items(int(n_items), int(seed)) for name, seed in test_sets.items()}


class EchoModel:
    """``model(utt_id=, text=)`` -> ``{"utt_id", "hyp", "device"}`` (lists in, a list out for a batch)."""

    def __init__(self, device="cpu", tag=""):
        self.device = str(device)
        self.tag = tag

    def __call__(self, utt_id, text):
        if isinstance(text, list):
            return [self(u, t) for u, t in zip(utt_id, text)]
        return {"utt_id": utt_id, "hyp": self.tag + " ".join(reversed(text.split())), "device": self.device}
