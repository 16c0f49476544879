"""quantmint: post-training int8 quantization of LLMs, decoupled from model code and serving backends.

Top-level API::

    import quantmint
    model = quantmint.quantize(model, "w8a16")          # apply + convert, returns int8 model
    quantmint.save_quantized(model, "out/", tokenizer=tok)
    model = quantmint.load_quantized("out/")
"""

from quantmint import _moved
from quantmint.algorithms.ptq import PTQ, QuantState, quant_state, quantize
from quantmint.config import PRESETS, AlgorithmArgs, PTQConfig, QuantArgs, get_preset
from quantmint.errors import (
    CheckpointError,
    ConfigError,
    ModelMappingError,
    NotSupportedError,
    PluginError,
    QuantmintError,
    UnknownModelFamilyError,
)
from quantmint.extension.family import KVProjections, LinearAdapter, ModelFamily, SmoothPair
from quantmint.extension.hookspecs import hookimpl
from quantmint.formats import transformers_hook
from quantmint.formats.checkpoint import load_quantized, save_quantized

__version__ = "0.1.0"

_moved.install()  # the module paths of the flat layout still import (see quantmint._moved)
transformers_hook.install()  # from_pretrained reads quantmint checkpoints; imports no transformers

__all__ = [
    # top-level API
    "PTQ",
    "load_quantized",
    "quant_state",
    "quantize",
    "save_quantized",
    # configs
    "PRESETS",
    "AlgorithmArgs",
    "PTQConfig",
    "QuantArgs",
    "QuantState",
    "get_preset",
    # plugins
    "KVProjections",
    "LinearAdapter",
    "ModelFamily",
    "SmoothPair",
    "hookimpl",
    # errors
    "CheckpointError",
    "ConfigError",
    "ModelMappingError",
    "NotSupportedError",
    "PluginError",
    "QuantmintError",
    "UnknownModelFamilyError",
]
