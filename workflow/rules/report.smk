# The items of `snakemake --report report.html`: per job (or test set) its shards' plot and its plan
# page, per measured job its scores table. Categories: the job; subcategories: the test set, or
# "shards" for a job without test sets, and "scores" (report_category/report_subcategory in common.smk).


localrules:
    job_report,
    scores_report,


rule job_report:
    """A job's shards (wall time, peak RSS, items, retries) and its plan, config and versions."""
    input:
        manifest="{job}/manifest.json",
        merged="{job}/merge.done",
    output:
        plot=report(
            "{job}/report/shards.svg",
            caption="../report/shards.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
        plan=report(
            "{job}/report/plan.html",
            caption="../report/plan.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
    log:
        "{job}/logs/report.log",
    shell:
        "\"$ESPNET3_RULES_PYTHON\" -m espnet3_rules report-job --manifest {input.manifest:q}"
        " --plot {output.plot:q} --plan {output.plan:q} > {log:q} 2>&1"


rule scores_report:
    """A measured job's metrics.json as metric x test set (with error counts)."""
    input:
        "{metrics_dir}/metrics.json",
    output:
        report(
            "{metrics_dir}/report/scores.html",
            caption="../report/scores.rst",
            category=lambda w: measure_of(w)["job"],
            subcategory="scores",
        ),
    params:
        spec=lambda w: json.dumps(measure_of(w), sort_keys=True),
    log:
        "{metrics_dir}/logs/scores_report.log",
    shell:
        "\"$ESPNET3_RULES_PYTHON\" -m espnet3_rules report-scores --spec-json {params.spec:q} --out {output:q} > {log:q} 2>&1"
