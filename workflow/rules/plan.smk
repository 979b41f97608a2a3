localrules:
    plan,


rule plan:
    """Contract checks, then manifest.json: each shard's items and the plan fingerprint."""
    input:
        lambda w: unit_of(w).inputs,
    output:
        "{unit}/manifest.json",
    params:
        unit=lambda w: unit_of(w).to_json(),
    log:
        "{unit}/logs/plan.log",
    shell:
        "python -m espnet3_rules plan --unit-json {params.unit:q} > {log:q} 2>&1"
