"""The Snakemake/CLI glue: config and schema, the commands the rules call, warm processes, GPU slots."""
