"""Quantization configs: plain data, validated by pydantic, round-tripping through YAML.

`PTQConfig` follows MindSpore Golden Stick's PTQConfig (mode, weight / activation / kv-cache dtypes,
outliers suppression, a blacklist of modules) and `QuantArgs` follows compressed-tensors'
QuantizationArgs (bits, symmetry, granularity, static or dynamic). A MindFormers
`quantization_config` block maps onto the same `PTQConfig` through `PTQConfig.from_mindformers`.

Every error is a `ConfigError` that names the bad key or value and what is allowed instead.
"""

from quantmint.config.base import QuantArgs, StrictConfig
from quantmint.config.plain_yaml import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, MAX_INT_DIGITS
from quantmint.config.presets import PRESETS, get_preset
from quantmint.config.ptq_config import PTQConfig
from quantmint.config.steps import (
    AlgorithmArgs,
    AlgorithmConfig,
    BlockPTQArgs,
    HadamardConfig,
    KVCacheConfig,
    RoundToNearestConfig,
    SmoothQuantConfig,
)

__all__ = [
    "PRESETS",
    "AlgorithmArgs",
    "AlgorithmConfig",
    "BlockPTQArgs",
    "HadamardConfig",
    "KVCacheConfig",
    "RoundToNearestConfig",
    "SmoothQuantConfig",
    "PTQConfig",
    "QuantArgs",
    "StrictConfig",
    "get_preset",
    # bounds of a config file (see `quantmint.config.plain_yaml`)
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_NODES",
    "MAX_INT_DIGITS",
]
