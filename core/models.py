"""Loading Hugging Face model directories, float or quantized, with errors that name the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from quantmint.checkpoint import QUANT_METHOD, load_quantized
from quantmint.errors import QuantmintError
from quantmint.hf import model_class, read_config_json

__all__ = ["is_quantmint_checkpoint", "load_float_model", "load_model", "load_tokenizer"]


def is_quantmint_checkpoint(path: str | Path) -> bool:
    block = read_config_json(Path(path)).get("quantization_config")
    return isinstance(block, dict) and block.get("quant_method") == QUANT_METHOD


def load_float_model(path: str | Path) -> nn.Module:
    """A float model from a local Hugging Face directory, as the class its config.json names."""
    path = Path(path)
    config = read_config_json(path)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise QuantmintError(
            f"{path} is already quantized (quant_method={method!r}); quantmint quantizes float checkpoints"
        )
    model_cls = model_class(config.get("architectures"), path)
    try:
        model = model_cls.from_pretrained(path, dtype="auto")
    except (OSError, ValueError, RuntimeError) as exc:
        raise QuantmintError(f"cannot load the float model in {path}: {exc}") from None
    return model.eval()


def load_model(path: str | Path) -> nn.Module:
    """A quantmint checkpoint (deploy mode) or a float model, whichever `path` holds."""
    return load_quantized(path) if is_quantmint_checkpoint(path) else load_float_model(path)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise QuantmintError(f"no usable tokenizer in {path}: {exc}") from None
