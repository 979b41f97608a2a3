import os

EXAMPLE_DATA = {os.path.normpath(d): opts for d, opts in (config.get("example_data") or {}).items()}


wildcard_constraints:
    data_dir="|".join(re.escape(d) for d in EXAMPLE_DATA) or "(?!)",


rule example_data:
    """Synthetic Kaldi-style test set of the built-in tone-ASR example (wav.scp, text, utt2spk)."""
    output:
        "{data_dir}/wav.scp",
        "{data_dir}/text",
        "{data_dir}/utt2spk",
    params:
        n_utts=lambda w: EXAMPLE_DATA[w.data_dir].get("n_utts", 40),
        seed=lambda w: EXAMPLE_DATA[w.data_dir].get("seed", 0),
    log:
        "{data_dir}.prepare.log",
    shell:
        "\"$ESPNET3_RULES_PYTHON\" -m espnet3_rules.examples.tone_asr prepare --out {wildcards.data_dir:q}"
        " --n-utts {params.n_utts} --seed {params.seed} > {log:q} 2>&1"
