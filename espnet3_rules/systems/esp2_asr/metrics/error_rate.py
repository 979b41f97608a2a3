"""The edit-distance metric behind :class:`~.wer.WER` and :class:`~.cer.CER`: jiwer counts, summed states.

``jiwer`` (and espnet2's ``TextCleaner``, for named ``clean_types``) are imported
only when needed, so the package imports without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterable, List, Optional, Sequence

from espnet3_rules.components.metrics.base_metric import BaseMetric
from espnet3_rules.contract import Field
from espnet3_rules.engine.contracts import ContractError, ContractRuntimeError
from espnet3_rules.engine.files import atomic_path

COUNTS = ("hits", "substitutions", "deletions", "insertions")


def text_cleaner(clean_types: Optional[Iterable[str]]) -> Callable[[str], str]:
    """The cleaner ``clean_types`` names: the text unchanged for ``None`` or none, else espnet2's ``TextCleaner``.

    Raises:
        RuntimeError: Types are named but espnet2 cannot be imported.
    """
    types = [] if clean_types is None else [clean_types] if isinstance(clean_types, str) else list(clean_types)
    if not types:
        return lambda text: text
    try:
        from espnet2.text.cleaner import TextCleaner
    except ImportError as exc:
        raise ContractRuntimeError(
            f"clean_types {types} need espnet2's TextCleaner, which cannot be imported ({exc}); "
            "install espnet or use clean_types: null"
        ) from None
    return TextCleaner(clean_types)


class ErrorRate(BaseMetric):
    """Errors (S + D + I) per reference unit, in percent with 2 decimals, over a whole test set.

    A subclass declares its one output (the result key), ``unit`` (in messages)
    and ``jiwer_process`` (the jiwer function that aligns the texts). An empty
    text, after cleaning, is scored as ``"."``.
    """

    inputs = (Field("ref", "text"), Field("hyp", "text"))
    unit: ClassVar[str]
    jiwer_process: ClassVar[str]

    def __init__(self, clean_types: Optional[Iterable[str]] = None) -> None:
        """Build the cleaner and register the four counts.

        Args:
            clean_types: espnet2 ``TextCleaner`` types applied to both texts (``None``: none).
        """
        self.cleaner = text_cleaner(clean_types)
        super().__init__()
        for name in COUNTS:
            self.add_state(name, 0, "sum")
        self._alignments: List[str] = []

    @property
    def result_key(self) -> str:
        """The result key (``WER``, ``CER``)."""
        return self.outputs[0].name

    def reset(self) -> None:
        """Zero the counts and drop alignment text kept from an unfinished call."""
        super().reset()
        self._alignments = []

    def _clean(self, text: str) -> str:
        return self.cleaner(text).strip() or "."

    def update(self, *, ref: Sequence[str], hyp: Sequence[str]) -> None:
        """Add one batch's edit counts (and, while collecting artifacts, its alignment text).

        Args:
            ref: Reference texts, one per utterance.
            hyp: Hypothesis texts, aligned with ``ref``.

        Raises:
            RuntimeError: ``jiwer`` is not installed.
        """
        try:
            import jiwer
        except ImportError:
            raise ContractRuntimeError(f"jiwer is required to compute {self.result_key}: pip install jiwer") from None
        if not ref:
            return
        out = getattr(jiwer, self.jiwer_process)([self._clean(r) for r in ref], [self._clean(h) for h in hyp])
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(out, name))
        if self.collect_artifacts:
            self._alignments.append(jiwer.visualize_alignment(out, show_measures=False))

    def _rate(self) -> Optional[float]:
        """Errors per reference unit in percent (unrounded); ``None`` without references."""
        n = self.hits + self.substitutions + self.deletions
        return 100 * (self.substitutions + self.deletions + self.insertions) / n if n else None

    def compute(self) -> Dict[str, float]:
        """``{name: percent}`` rounded to 2 places, from the summed counts.

        Raises:
            ValueError: The references hold no units.
        """
        rate = self._rate()
        if rate is None:
            raise ContractError(f"{self.result_key}: nothing to score: the references have no {self.unit}")
        return {self.result_key: round(rate, 2)}

    def write_artifacts(self, test_dir: Path) -> None:
        """Write ``<test_dir>/<name>_alignment``: this call's alignments, then one summary line of the counts."""
        counts = ", ".join(f"{name}={getattr(self, name)}" for name in COUNTS)
        summary = f"\n{self.result_key}: {self._rate() or 0.0:.2f} ({counts})\n"
        with atomic_path(test_dir / f"{self.result_key.lower()}_alignment") as tmp:
            tmp.write_text("".join(self._alignments) + summary, encoding="utf-8")
        self._alignments = []
