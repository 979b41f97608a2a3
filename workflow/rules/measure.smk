wildcard_constraints:
    metrics_dir="|".join(re.escape(metrics_dir) for metrics_dir in MEASURES) or "(?!)",


localrules:
    measure,


rule measure:
    """Metrics (e.g. WER/CER) over every merged test set of a job -> <output_dir>/metrics.json."""
    input:
        lambda w: measure_of(w)["merged"],
    output:
        "{metrics_dir}/metrics.json",
    params:
        spec=lambda w: json.dumps(measure_of(w), sort_keys=True),
    log:
        "{metrics_dir}/logs/measure.log",
    shell:
        "\"$ESPNET3_RULES_PYTHON\" -m espnet3_rules measure --spec-json {params.spec:q} > {log:q} 2>&1"
