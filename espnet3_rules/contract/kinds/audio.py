"""The ``audio`` kind and :class:`Audio`, a float32 waveform at a sample rate.

At ESPnet3's path (``espnet3.contract.kinds.audio``). Reading files needs
``soundfile``, resampling ``librosa`` (the library ESPnet3 resamples with, so the
samples are the same); both are imported only when needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from espnet3_rules.contract.kinds._numpy import is_numpy, numpy
from espnet3_rules.contract.kinds.base import Kind, direction
from espnet3_rules.engine.contracts import ContractError, ContractTypeError

if TYPE_CHECKING:
    import numpy as np

_NOT_FINITE = "audio samples must be finite (no NaN or Inf)"


def _to_float32(array: np.ndarray) -> np.ndarray:
    """Samples as float32: integer PCM scaled to [-1, 1] by its bit depth, floats kept as they are."""
    np = numpy()
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ContractTypeError(f"audio samples must be real numeric values, not {array.dtype}")
    if np.issubdtype(array.dtype, np.unsignedinteger):  # e.g. 8-bit WAV: centred on 128
        half = (np.iinfo(array.dtype).max + 1) / 2
        array = (array.astype(np.float64) - half) / half
    elif np.issubdtype(array.dtype, np.integer):  # signed: int16 is divided by 32768
        array = array / float(-np.iinfo(array.dtype).min)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf, refused next
        return array.astype(np.float32, copy=False)


def _channels_first(array: np.ndarray) -> np.ndarray:
    """A 2-D array as (channels, samples), the shorter axis being channels; one channel as 1-D.

    A (samples, channels) array (soundfile, Gradio) is transposed; with at most two
    rows the layout is taken to be channels-first already.
    """
    if array.ndim == 2:
        if array.shape[0] > array.shape[1] and array.shape[0] > 2:
            array = array.T
        if array.shape[0] == 1:
            array = array[0]
    return array


def _has_rate(value: Any) -> bool:
    """Whether ``value`` is a ``(rate, samples)`` pair (an integer first)."""
    return isinstance(value, (tuple, list)) and len(value) == 2 and (
        isinstance(value[0], int) or is_numpy(value[0], "integer")
    )


def _resample(array: np.ndarray, orig_rate: int, rate: int) -> np.ndarray:
    """``librosa.resample`` along the last axis (its default, soxr_hq), as ESPnet3 does."""
    try:
        import librosa
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"resampling audio from {orig_rate} Hz to {rate} Hz needs librosa (pip install librosa), "
            "the library ESPnet3 resamples with; or give audio at the model's rate",
            name="librosa",
        ) from exc
    return librosa.resample(array, orig_sr=orig_rate, target_sr=rate, axis=-1)


@dataclass(frozen=True)
class Audio:
    """A float32 waveform and its sample rate, every channel kept.

    ``array`` is ``(samples,)`` for mono and ``(channels, samples)`` otherwise.

    Args:
        array: The samples, 1-D or 2-D: integer PCM is scaled to [-1, 1] (signed
            by ``-min``, so int16 / 32768; unsigned about its midpoint), floats are
            cast to float32 unscaled; a 2-D array is laid out channels-first (the
            shorter axis is channels, except that with at most two rows it is taken
            as channels-first already) and one channel becomes 1-D.
        rate: Samples per second (cast to ``int``).

    Raises:
        TypeError: The samples are not real numbers.
        ValueError: A sample is NaN or infinite, the array is not 1-D or 2-D, or
            the rate is not positive.
    """

    array: np.ndarray
    rate: int

    def __post_init__(self) -> None:
        np = numpy()
        array = _to_float32(np.asarray(self.array))
        if not np.isfinite(array).all():
            raise ContractError(_NOT_FINITE)
        array = _channels_first(array)
        if array.ndim not in (1, 2):
            raise ContractError(f"audio must be 1-D or 2-D, got shape {array.shape}")
        object.__setattr__(self, "array", np.ascontiguousarray(array))
        object.__setattr__(self, "rate", int(self.rate))
        if self.rate <= 0:
            raise ContractError(f"sample rate must be positive, got {self.rate}")

    @property
    def channels(self) -> int:
        """The number of channels (1 for a 1-D array)."""
        return 1 if self.array.ndim == 1 else self.array.shape[0]

    @property
    def duration(self) -> float:
        """The length in seconds."""
        return self.array.shape[-1] / self.rate

    def mono(self, channel: int = 0) -> "Audio":
        """One channel (the reference one by default, not the mean) as 1-D; ``self`` when already mono."""
        return self if self.array.ndim == 1 else Audio(self.array[channel], self.rate)

    def multichannel(self) -> "Audio":
        """This audio as ``(channels, samples)``: mono becomes ``(1, samples)``; ``self`` when 2-D."""
        if self.array.ndim == 2:
            return self
        shaped = object.__new__(Audio)  # the constructor would flatten the single row again
        object.__setattr__(shaped, "array", self.array[None, :])
        object.__setattr__(shaped, "rate", self.rate)
        return shaped

    @classmethod
    def read(cls, path: Union[str, Path], rate: Optional[int] = None) -> "Audio":
        """Read an audio file (anything ``soundfile`` reads), every channel kept.

        Args:
            path: The file.
            rate: Resample to this rate; ``None`` keeps the file's rate.

        Returns:
            The file's samples as float32.
        """
        import soundfile

        samples, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        audio = cls(samples, file_rate)
        return audio if rate is None else audio.resample(rate)

    def resample(self, rate: int) -> "Audio":
        """This audio at ``rate`` (every channel; ``librosa.resample``); ``self`` when already there.

        Raises:
            ModuleNotFoundError: The rates differ and librosa is not installed.
        """
        if rate == self.rate:
            return self
        return Audio(_resample(self.array, self.rate, rate), rate)

    @classmethod
    def concat(cls, pieces: Sequence["Audio"]) -> "Audio":
        """Consecutive pieces of one signal joined in time.

        Raises:
            ValueError: The pieces differ in rate or in channel count.
        """
        rates = sorted({piece.rate for piece in pieces})
        if len(rates) != 1:
            raise ContractError(f"cannot concatenate audio at rates {rates}")
        channels = sorted({piece.channels for piece in pieces})
        if len(channels) != 1:
            raise ContractError(f"cannot concatenate audio with {channels} channels")
        # a mono piece may be (samples,) or (1, samples): join them in one layout
        return cls(numpy().concatenate([piece.multichannel().array for piece in pieces], axis=-1), rates[0])

    @classmethod
    def coerce(cls, value: Any, rate: Optional[int]) -> "Audio":
        """Turn what a caller holds into an :class:`Audio` at ``rate``.

        Args:
            value: An ``Audio``; a path (read); a ``(rate, samples)`` pair (what
                ``gr.Audio`` gives); a NumPy array or a torch tensor, taken to be
                at ``rate`` already.
            rate: The rate wanted (values at another rate are resampled); ``None``
                keeps each value's own rate, and then refuses a bare array.

        Returns:
            The audio, every channel kept.

        Raises:
            TypeError: ``value`` is none of those, or a bare array with no ``rate``.
            ValueError: An ``Audio`` whose samples were made non-finite since.
        """
        if isinstance(value, Audio):
            # frozen, but its buffer may have been written to since it was checked
            if not numpy().isfinite(value.array).all():
                raise ContractError(_NOT_FINITE)
            return value if rate is None else value.resample(rate)
        if isinstance(value, (str, Path)):
            return cls.read(value, rate)
        if _has_rate(value):
            audio = cls(numpy().asarray(value[1]), int(value[0]))
            return audio if rate is None else audio.resample(rate)
        if hasattr(value, "detach"):  # a torch tensor, without importing torch
            value = value.detach().cpu().numpy()
        if is_numpy(value, "ndarray"):
            if rate is None:
                raise ContractTypeError(
                    "a bare array carries no sample rate, and this model fixes none: "
                    "give a (rate, samples) pair, an Audio or a path"
                )
            return cls(value, rate)
        raise ContractTypeError(
            f"audio must be a path, an Audio, a (rate, samples) pair, an array or a tensor, not {type(value).__name__}"
        )


def _mean_channels(audio: Audio) -> Audio:
    """The mean over channels as mono (mono audio unchanged)."""
    return Audio(audio.array.mean(axis=0) if audio.array.ndim == 2 else audio.array, audio.rate)


def _own_rate(value: Any) -> tuple:
    """``(value, its own sample rate or None)``; a path is read (at its own rate) to learn it."""
    if isinstance(value, (str, Path)):
        value = Audio.read(value)
    if isinstance(value, Audio):
        return value, value.rate
    if _has_rate(value):
        return value, value[0]
    return value, None


class AudioKind(Kind):
    """``audio``: an :class:`Audio` at the field's ``sample_rate`` (default: the model's).

    Options: ``sample_rate`` (a positive int), ``rate_policy`` (``resample``, the
    default, or ``reject`` a value at another rate), ``normalize``. Normalizers:
    ``first_channel`` and ``mean_channels`` (to mono). ``Field.channels`` checks
    the channel count after normalization. Pieces concatenate in time.
    """

    normalizers = {"first_channel": Audio.mono, "mean_channels": _mean_channels}
    option_names = Kind.option_names | {"sample_rate", "rate_policy"}

    def validate_options(self, options: Mapping[str, Any]) -> None:
        """Check the options, ``sample_rate`` and ``rate_policy`` among them.

        Raises:
            ValueError: ``sample_rate`` is not a positive int, or ``rate_policy``
                is not ``resample`` or ``reject`` (and see :meth:`Kind.validate_options`).
        """
        super().validate_options(options)
        rate = options.get("sample_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
            raise ContractError(f"sample_rate must be a positive integer, not {rate!r}")
        if options.get("rate_policy", "resample") not in ("resample", "reject"):
            raise ContractError(f"rate_policy must be 'resample' or 'reject', not {options['rate_policy']!r}")

    def check_configured(self, value: Any, field: Any, model: Any, options: Mapping[str, Any], *,
                         output: bool) -> Audio:
        """:meth:`check` at the field's rate, after the ``reject`` policy's rate comparison.

        Raises:
            ValueError: ``rate_policy: reject`` and the value carries another rate.
        """
        rate = options.get("sample_rate")
        if rate is None:
            rate = getattr(model, "sample_rate", None)
        if options.get("rate_policy", "resample") == "reject":
            value, own = _own_rate(value)
            if own is not None and rate is not None and own != rate:
                raise ContractError(f"{field.name!r} has sample rate {own}; expected {rate}")
        return self.check(value, field, SimpleNamespace(sample_rate=rate), output=output)

    def check(self, value: Any, field: Any, model: Any, *, output: bool) -> Audio:
        """Coerce ``value`` to an :class:`Audio` at ``model.sample_rate`` and check its channels.

        A hook's bare array is taken to be at the model's rate.

        Raises:
            TypeError: Not audio, no rate to be had, or the wrong channel count
                (``'mix' given with 1 channel(s), needs 2``).
        """
        rate = model.sample_rate
        if output and is_numpy(value, "ndarray"):
            if rate is None:
                raise ContractTypeError(
                    f"{field.name!r} returned as a bare array by a model that fixes no sample_rate; "
                    "return an Audio with its rate"
                )
            audio = Audio(value, rate)
        else:
            audio = Audio.coerce(value, rate)
        if field.channels is not None and audio.channels != field.channels:
            raise ContractTypeError(
                f"{field.name!r} {direction(output)} with {audio.channels} channel(s), needs {field.channels}"
            )
        return audio

    def to_demo_output(self, value: Any) -> Any:
        """An ``Audio`` as ``(rate, samples)`` with channels last (Gradio's layout); anything else as is."""
        if not isinstance(value, Audio):
            return value
        return value.rate, value.array.T if value.array.ndim == 2 else value.array

    def join(self, first: Audio, second: Audio) -> Audio:
        """The two pieces concatenated in time."""
        return Audio.concat([first, second])

    def accepts(self, value: Any, field: Any) -> bool:
        """Whether ``value`` could be audio with no model: an Audio, a path, a pair, an array or a tensor."""
        return (
            isinstance(value, (Audio, str, Path)) or is_numpy(value, "ndarray") or _has_rate(value)
            or hasattr(value, "detach")
        )
