"""ESPnet3-style providers and runners for sharded, resumable jobs orchestrated by Snakemake."""

from .base_runner import BaseRunner, concatenate_shard_files
from .contracts import ContractError
from .env_provider import EnvironmentProvider
from .inference_provider import InferenceProvider
from .inference_runner import InferenceRunner

__all__ = [
    "BaseRunner",
    "ContractError",
    "EnvironmentProvider",
    "InferenceProvider",
    "InferenceRunner",
    "concatenate_shard_files",
]
