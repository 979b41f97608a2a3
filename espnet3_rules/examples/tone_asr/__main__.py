"""``python -m espnet3_rules.examples.tone_asr prepare --out DIR [--n-utts N] [--seed S] ...``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from espnet3_rules.engine.contracts import ContractError
from .data import PrepConfig, prepare_data, read_kaldi_map


def build_parser() -> argparse.ArgumentParser:
    """Argument parser; defaults come from :class:`PrepConfig`."""
    defaults = PrepConfig()
    parser = argparse.ArgumentParser(prog="python -m espnet3_rules.examples.tone_asr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="synthesise a Kaldi-style test set (wav.scp, text, utt2spk, spk2utt)")
    prep.add_argument("--out", required=True, help="data directory to create (replaced atomically)")
    prep.add_argument("--n-utts", type=int, default=defaults.n_utts, help="number of utterances (default %(default)s)")
    prep.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    prep.add_argument(
        "--n-speakers", type=int, default=defaults.n_speakers, help="synthetic speakers (default %(default)s)"
    )
    prep.add_argument(
        "--snr-db", type=float, nargs=2, metavar=("LOW", "HIGH"), default=list(defaults.snr_db),
        help="per-utterance SNR range in dB (default %(default)s)",
    )  # fmt: skip
    prep.add_argument("--min-words", type=int, default=defaults.min_words, help="words per sentence, at least")
    prep.add_argument("--max-words", type=int, default=defaults.max_words, help="words per sentence, at most")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; contract errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        out = prepare_data(
            args.out,
            n_utts=args.n_utts,
            seed=args.seed,
            n_speakers=args.n_speakers,
            snr_db=args.snr_db,
            min_words=args.min_words,
            max_words=args.max_words,
        )
    except ContractError as exc:
        print(f"tone_asr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {len(read_kaldi_map(out / 'wav.scp'))} utterances (wav.scp, text, utt2spk, spk2utt, meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
