"""ESPnet3-style providers and runners for sharded, resumable jobs orchestrated by Snakemake."""

from espnet3_rules.parallel.base_runner import BaseRunner, concatenate_shard_files
from espnet3_rules.engine.contracts import ContractError
from espnet3_rules.parallel.env_provider import EnvironmentProvider
from espnet3_rules.parallel.inference_provider import InferenceProvider
from espnet3_rules.systems.base.inference_runner import InferenceRunner

__all__ = [
    "BaseRunner",
    "ContractError",
    "EnvironmentProvider",
    "InferenceProvider",
    "InferenceRunner",
    "concatenate_shard_files",
]
