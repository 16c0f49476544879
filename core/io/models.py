"""Loading Hugging Face model directories, float or quantized, with errors that name the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from quantmint.errors import QuantmintError
from quantmint.formats.checkpoint import MANIFEST_NAME, load_quantized, read_config_dict
from quantmint.formats.checkpoint_format import claims_quantmint
from quantmint.formats.hf import model_class

__all__ = ["is_quantmint_checkpoint", "load_float_model", "load_model", "load_tokenizer"]


def is_quantmint_checkpoint(path: str | Path) -> bool:
    """Whether `path`'s config.json says quantmint wrote it (`load_quantized` then checks all of it)."""
    return claims_quantmint(read_config_dict(Path(path), QuantmintError).get("quantization_config"))


# Weight files `from_pretrained` would unpickle (quantmint reads safetensors only).
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Tensor names only a quantized checkpoint has (quantmint's and compressed-tensors' layouts).
_QUANTIZED_SUFFIXES = (".weight_scale", ".weight_packed", ".weight_zero_point", ".input_scale")


def _names(keys: Any, limit: int = 3) -> str:
    keys = sorted(str(k) for k in keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _refuse_quantized_tensors(path: Path, config: dict[str, Any]) -> None:
    """A directory holding quantized output whose config.json lacks its quantization_config would load
    its integer codes as float weights: refuse it, reading safetensors headers only."""
    from safetensors import safe_open

    hint = (
        "config.json has no quantization_config: the checkpoint was edited; restore its config.json "
        "(or pass the float model it was quantized from)"
    )
    if (path / MANIFEST_NAME).exists():
        raise QuantmintError(f"{path} holds quantmint output ({MANIFEST_NAME}) but its {hint}")
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    dtype = f.get_slice(key).get_dtype()
                    if key.endswith(_QUANTIZED_SUFFIXES) or (
                        key.endswith(".weight") and dtype in ("I8", "U8")
                    ):
                        raise QuantmintError(
                            f"{file} holds quantized tensor {key!r} ({dtype}) but its {hint}"
                        )
        except QuantmintError:
            raise
        except Exception as exc:  # SafetensorError, the Rust panic of a malformed header
            raise QuantmintError(
                f"{file} is not a readable safetensors file: {' '.join(str(exc).split())[:300]}"
            ) from None


def _unexpected_that_matter(model: nn.Module, unexpected: Any) -> list[str]:
    """Unexpected checkpoint tensors that would be weights of a module the model has (more layers than
    the config says, a renamed weight): those mean a different model. Left over are tensors of modules
    the class lacks (a pretraining head, a pooler) and stale buffers of older releases (GPT-2's
    `attn.masked_bias`): what loading a base model, or an old checkpoint, leaves over."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, model) if prefix else model
    children = {name for name, _ in model.named_children()} | {name for name, _ in base.named_children()}
    if prefix:
        children.add(prefix)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters()}
    return [
        key
        for key in unexpected
        if str(key).split(".", 1)[0] in children and str(key).rsplit(".", 1)[-1] in leaves
    ]


def load_float_model(path: str | Path) -> nn.Module:
    """A float model from a local Hugging Face directory, as the class its config.json names.

    Strict: safetensors only (a pickle-only directory is refused), trust_remote_code=False, and a
    tensor the model needs that is missing or mis-shaped, or a stray tensor inside one of its modules,
    is refused (transformers would initialize it at random). So is a directory holding quantized
    tensors whose config.json lost its quantization_config.
    """
    path = Path(path)
    config = read_config_dict(path, QuantmintError)
    block = config.get("quantization_config")
    if block:
        method = block.get("quant_method") if isinstance(block, dict) else None
        raise QuantmintError(
            f"{path} is already quantized (quant_method={method!r}); quantmint quantizes float checkpoints"
        )
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise QuantmintError(
                f"{path} holds weights only as pickle files ({_names(pickles)}); quantmint loads "
                "safetensors only (use_safetensors=True) and never unpickles: convert the model to "
                "safetensors first"
            )
        raise QuantmintError(f"{path} has no *.safetensors weight files")
    _refuse_quantized_tensors(path, config)
    model_cls = model_class(config.get("architectures"), path)
    try:
        model, info = model_cls.from_pretrained(
            path,
            dtype="auto",
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported in `info` and refused below, in one line
        )
    except (OSError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:500]
        raise QuantmintError(f"cannot load the float model in {path}: {reason}") from None
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_names(info['missing_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(
            "mis-shaped "
            + _names(
                f"{key} (file {tuple(got)}, model {tuple(want)})"
                for key, got, want in info["mismatched_keys"]
            )
        )
    stray = _unexpected_that_matter(model, info.get("unexpected_keys") or [])
    if stray:
        problems.append(f"not in the model {_names(stray)}")
    if info.get("error_msgs"):
        problems.append(f"errors {' '.join(' '.join(map(str, info['error_msgs'])).split())[:200]}")
    if problems:
        raise QuantmintError(
            f"the weights in {path} do not fit the {model_cls.__name__} its config.json describes: "
            f"{'; '.join(problems)}. transformers would initialize those at random: use the config.json "
            "that came with these weights (or the weights of this config)"
        )
    return model.eval()


def load_model(path: str | Path) -> nn.Module:
    """A quantmint checkpoint (deploy mode) or a float model, whichever `path` holds."""
    return load_quantized(path) if is_quantmint_checkpoint(path) else load_float_model(path)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    from quantmint.formats.hf import refuse_custom_code

    refuse_custom_code(path)  # an auto_map names Python in the directory: never imported
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # any failure reading tokenizer files the user gave is one line
        # OSError, ValueError; and from broken tokenizer files KeyError, RecursionError, the tokenizers
        # library's own Exception ("data did not match any variant"), ...
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise QuantmintError(
            f"no usable tokenizer in {path}: {type(exc).__name__}: {reason}; give the model's own tokenizer "
            "files (tokenizer.json or the files its tokenizer_config.json names)"
        ) from None
