"""The "dual-tone alphabet" shared by the data generator and the model.

Each letter A-Z is spoken as a chord of one low-group and one high-group tone
(the idea behind telephone DTMF keys), so a letter is identified by which two
frequency bands carry energy. Words are spelled letter by letter; the
vocabulary is the 20 core words of the Speech Commands corpus.
"""

from __future__ import annotations

import string
from typing import Dict, List, Tuple

LOW_TONES_HZ: Tuple[float, ...] = (400.0, 543.0, 737.0, 1000.0)
"""Low tone group: geometric steps of ~36 % between 400 Hz and 1 kHz."""

HIGH_TONES_HZ: Tuple[float, ...] = (1200.0, 1428.0, 1700.0, 2023.0, 2407.0, 2865.0, 3400.0)
"""High tone group: geometric steps of ~19 % between 1.2 kHz and 3.4 kHz."""

LETTERS: str = string.ascii_uppercase

LETTER_TONES_HZ: Dict[str, Tuple[float, float]] = {
    letter: (LOW_TONES_HZ[i // len(HIGH_TONES_HZ)], HIGH_TONES_HZ[i % len(HIGH_TONES_HZ)])
    for i, letter in enumerate(LETTERS)
}
"""Letter -> (low tone, high tone) in Hz; 26 of the 4 x 7 chords."""

VOCABULARY: Tuple[str, ...] = (
    "YES", "NO", "UP", "DOWN", "LEFT", "RIGHT", "ON", "OFF", "STOP", "GO",
    "ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE",
)  # fmt: skip

BLANK = "<blank>"
SPACE = "<space>"
TOKENS: Tuple[str, ...] = (BLANK, SPACE, *LETTERS)
"""CTC output symbols, ESPnet char-model style: blank, word boundary, letters."""


def tokens_to_text(tokens: List[str]) -> str:
    """Join letters into words at ``<space>`` tokens (extra spaces collapse)."""
    text = "".join(" " if token == SPACE else token for token in tokens if token != BLANK)
    return " ".join(text.split())
