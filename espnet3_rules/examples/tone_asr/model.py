"""A CTC recogniser for the dual-tone alphabet whose weights are constructed, not trained.

Pipeline (batched, padding-exact):

1. log-mel filterbank: zero-padded STFT (ESPnet defaults: n_fft 512, 25 ms
   Hann window, 10 ms hop) -> power -> 80 triangular mel filters built here ->
   log. Frame ``t`` is centred on sample ``t * hop``; an utterance of ``L``
   samples has ``1 + L // hop`` frames whatever it is batched with.
2. letter scores: each frame's log-mel is floored at ``dynamic_range`` below
   its peak (bounds the contrast of clean tones and of noise dips), then a
   linear layer whose row for letter ``k`` is a zero-mean, unit-norm template
   with Gaussian bumps at the mel positions of the letter's two tones; the
   matches are smoothed over time (a fixed depthwise convolution) and biased
   by ``-threshold``, so a toneless frame scores below zero for every letter.
3. CTC logits ``[<blank>, <space>, A..Z]``: blank is 0; letters are
   ``scale * score``; ``<space>`` is a min-pool over ``pause_frames`` of the
   silence margin ``-max(letters)``, positive only inside a pause longer
   than the window, i.e. between words.
4. greedy CTC decoding: best token per frame, collapse repeats, drop blanks,
   ``<space>`` splits words. ``score`` is the log-probability of that path.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from espnet3_rules.engine.contracts import ContractError
from .alphabet import LETTER_TONES_HZ, LETTERS, TOKENS, tokens_to_text


def hz_to_mel(hz: Any) -> Any:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: Any) -> Any:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Area-normalised triangular filters ``(n_mels, n_fft // 2 + 1)`` and their centres in mel.

    Area normalisation makes white noise flat across filters, so a template
    dot product (zero-mean weights) ignores the noise floor.
    """
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    filters = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    empty = np.flatnonzero(filters.sum(axis=1) == 0)
    if len(empty):
        raise ContractError(
            f"mel filters {empty.tolist()} are empty: raise n_fft ({n_fft}) or fmin ({fmin}), "
            f"or lower n_mels ({n_mels})"
        )
    return filters, hz_to_mel(edges[1:-1])


def letter_templates(mel_centres: np.ndarray, width: float) -> np.ndarray:
    """``(26, n_mels)`` zero-mean, unit-norm templates: Gaussian bumps at each letter's tones.

    ``width`` is the bump's standard deviation in filters.
    """
    spacing = float(np.mean(np.diff(mel_centres)))
    rows = []
    for letter in LETTERS:
        row = np.zeros(len(mel_centres))
        for hz in LETTER_TONES_HZ[letter]:
            row += np.exp(-0.5 * ((mel_centres - hz_to_mel(hz)) / (width * spacing)) ** 2)
        row -= row.mean()
        rows.append(row / np.linalg.norm(row))
    return np.stack(rows)


def resolve_device(device: Any) -> torch.device:
    """``torch.device`` from a name; a clear error when CUDA is asked for but absent."""
    try:
        resolved = torch.device(str(device))
    except RuntimeError as exc:
        raise ContractError(f"device {device!r} is not a torch device name ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ContractError(f"device {device!r} requested but torch.cuda.is_available() is False; use device: cpu")
    return resolved


class ToneCTCModel(torch.nn.Module):
    """Log-mel front end + constructed letter classifier + greedy CTC decoder.

    Call it like an ESPnet inference model: ``model(speech)`` with one 1-D
    waveform returns one result dict, with a list of waveforms a list of them.
    ``output="hyp"`` gives ``{"hyp", "score"}``; ``output="feats"``
    gives ``{"feats"}`` (float32 ``(frames, n_mels)`` log-mel on the CPU).
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        n_mels: int = 80,
        fmin: float = 80.0,
        fmax: float | None = None,
        template_width: float = 1.5,
        dynamic_range: float = 4.0,
        smoothing: Sequence[float] = (1 / 9, 2 / 9, 3 / 9, 2 / 9, 1 / 9),
        threshold: float = 3.5,
        scale: float = 2.0,
        pause_frames: int = 13,
        device: Any = "cpu",
    ):
        """Build the filterbank and the classifier weights on ``device``."""
        super().__init__()
        if pause_frames < 1 or pause_frames % 2 == 0:
            raise ContractError(f"pause_frames must be an odd number >= 1, got {pause_frames}")
        if n_fft % 2 or not 0 < win_length <= n_fft:
            raise ContractError(f"need an even n_fft ({n_fft}) and 0 < win_length ({win_length}) <= n_fft")
        if len(smoothing) % 2 == 0:
            raise ContractError(f"smoothing must have an odd number of taps, got {list(smoothing)}")
        self.sample_rate, self.n_fft, self.win_length, self.hop_length = sample_rate, n_fft, win_length, hop_length
        self.scale, self.pause_frames = float(scale), int(pause_frames)
        self.dynamic_range = float(dynamic_range)
        filters, centres = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax or sample_rate / 2)
        self.register_buffer("window", torch.hann_window(win_length, periodic=True, dtype=torch.float32))
        self.register_buffer("mel", torch.tensor(filters.T, dtype=torch.float32))
        self.register_buffer("smoothing", torch.tensor(list(smoothing), dtype=torch.float32))
        self.classifier = torch.nn.Linear(n_mels, len(LETTERS))
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor(letter_templates(centres, template_width)))
            self.classifier.bias.fill_(-float(threshold))
        self.requires_grad_(False)
        self.eval()
        self.to(resolve_device(device))

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.window.device

    def pad_batch(self, speech: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Waveforms -> ``(B, max_len + n_fft)`` float32 on the model device, and lengths."""
        waves = [torch.as_tensor(np.asarray(s, dtype=np.float32) if not torch.is_tensor(s) else s) for s in speech]
        for b, wav in enumerate(waves):
            if wav.ndim != 1:
                raise ContractError(f"speech[{b}] must be a 1-D waveform, got shape {tuple(wav.shape)}")
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        half = self.n_fft // 2
        batch = torch.zeros(len(waves), int(lengths.max()) + 2 * half, dtype=torch.float32)
        for b, wav in enumerate(waves):
            batch[b, half : half + len(wav)] = wav.to(torch.float32)
        return batch.to(self.device), lengths

    def features(self, speech: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Log-mel ``(B, T, n_mels)`` (padding frames included) and frame counts ``(B,)`` (CPU)."""
        batch, lengths = self.pad_batch(speech)
        spec = torch.stft(
            batch, self.n_fft, self.hop_length, self.win_length, self.window, center=False, return_complex=True
        )
        power = spec.real.square() + spec.imag.square()  # (B, freq, T)
        mel = torch.matmul(power.transpose(1, 2), self.mel)
        frames = 1 + torch.div(lengths, self.hop_length, rounding_mode="floor")
        return torch.log(mel.clamp_min(1e-10)), frames

    def logits(self, feats: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """CTC logits ``(B, T, len(TOKENS))`` from log-mel features."""
        valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames.to(feats.device)[:, None]
        # Template matches, zero on padding frames exactly as past the end of an unpadded input.
        floored = torch.maximum(feats, feats.max(dim=-1, keepdim=True).values - self.dynamic_range)
        match = torch.nn.functional.linear(floored, self.classifier.weight).masked_fill(~valid[..., None], 0.0)
        kernel = self.smoothing.view(1, 1, -1).expand(match.shape[-1], 1, -1)
        match = torch.nn.functional.conv1d(
            match.transpose(1, 2), kernel, padding=len(self.smoothing) // 2, groups=match.shape[-1]
        )
        letters = self.scale * (match.transpose(1, 2) + self.classifier.bias)
        silence = -letters.max(dim=-1).values  # > 0 when no letter is present
        # Padding frames must not shorten a pause: treat them like the pooling border (ignored).
        silence = silence.masked_fill(~valid, math.inf)
        radius = self.pause_frames // 2
        pause = -torch.nn.functional.max_pool1d(-silence[:, None, :], self.pause_frames, 1, radius)[:, 0, :]
        blank = torch.zeros_like(pause)
        return torch.cat([blank[..., None], pause[..., None], letters], dim=-1)

    def decode(self, logits: torch.Tensor, frames: torch.Tensor) -> List[Dict[str, Any]]:
        """Greedy CTC decoding of each utterance's valid frames."""
        log_probs = torch.log_softmax(logits, dim=-1)
        best, best_ids = log_probs.max(dim=-1)
        results = []
        for b, n in enumerate(frames.tolist()):
            ids = best_ids[b, :n].tolist()
            collapsed = [TOKENS[i] for j, i in enumerate(ids) if j == 0 or i != ids[j - 1]]
            results.append({"hyp": tokens_to_text(collapsed), "score": float(best[b, :n].sum())})
        return results

    @torch.no_grad()
    def forward(self, speech: Any, output: str = "hyp") -> Any:
        """Recognise (``output="hyp"``) or featurise (``output="feats"``) one waveform or a list."""
        if output not in ("hyp", "feats"):
            raise ContractError(
                f"model output {output!r} is not 'hyp' or 'feats' (set it in runner_kwargs.model_kwargs.output)"
            )
        single = not isinstance(speech, (list, tuple))
        feats, frames = self.features([speech] if single else speech)
        if output == "feats":
            arrays = feats.cpu().numpy()
            results: List[Dict[str, Any]] = [{"feats": arrays[b, :n].copy()} for b, n in enumerate(frames.tolist())]
        else:
            results = self.decode(self.logits(feats, frames), frames)
        return results[0] if single else results
