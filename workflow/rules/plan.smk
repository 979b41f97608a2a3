localrules:
    plan,


rule plan:
    """Contract checks, then manifest.json: the job description, each shard's items, the fingerprint."""
    input:
        lambda w: job_of(w).inputs,
    output:
        "{job}/manifest.json",
    params:
        job=lambda w: job_of(w).to_json(),
    log:
        "{job}/logs/plan.log",
    shell:
        "\"$ESPNET3_RULES_PYTHON\" -m espnet3_rules plan --job-json {params.job:q} > {log:q} 2>&1"
