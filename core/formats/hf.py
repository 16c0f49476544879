"""Small helpers around Hugging Face directories shared by loading and saving code."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmint.errors import QuantmintError
from quantmint.io.outdir import staged_directory

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["build_skeleton", "model_class", "read_config_json", "refuse_custom_code", "staged_directory"]

# Files through which transformers would import Python shipped in a model directory (`auto_map`, with
# trust_remote_code). quantmint passes trust_remote_code=False everywhere and refuses such a directory.
_CUSTOM_CODE_FILES = ("config.json", "tokenizer_config.json")


def read_config_json(path: Path, error: type[QuantmintError] = QuantmintError) -> dict[str, Any]:
    """The parsed config.json of a model directory, or `error` saying what is missing or broken.

    A directory that ships custom code (an `auto_map`) is refused here, before anything loads it."""
    if not path.is_dir():
        raise error(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise error(f"{path} has no config.json: pass a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise error(f"{config_file} is not valid JSON: {' '.join(str(exc).split())[:300]}") from None
    refuse_custom_code(path, error, config=config)
    return config


def refuse_custom_code(
    path: str | Path, error: type[QuantmintError] = QuantmintError, config: Any = None
) -> None:
    """Refuse a model directory whose config.json or tokenizer_config.json has an `auto_map`: that
    names Python files in the directory for transformers to import, and quantmint never runs code from
    a model directory (every transformers call also passes trust_remote_code=False)."""
    path = Path(path)
    for name in _CUSTOM_CODE_FILES:
        data = config if name == "config.json" and config is not None else _json_or_none(path / name)
        if isinstance(data, dict) and "auto_map" in data:
            raise error(
                f"{path}/{name} has an auto_map: this model directory contains custom code, which "
                "quantmint never runs; use a model whose architecture and tokenizer transformers provides"
            )


def _json_or_none(file: Path) -> Any:
    """The parsed JSON in `file`, or None when it is absent or unreadable (its loader reports that)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def model_class(
    architectures: list[str] | None, where: Path, error: type[QuantmintError] = QuantmintError
) -> type:
    """The transformers class named first in a config's `architectures`, else `error` naming it."""
    import transformers

    name = architectures[0] if isinstance(architectures, list) and architectures else None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise error(
            f"{where}/config.json names architecture {str(name)[:100] if name else 'none'}, which is not a "
            f"model class transformers {transformers.__version__} provides (quantmint never runs a model "
            "directory's own code)"
        )
    return cls


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lands on `meta`; buffers (rotary frequencies,
    position ids) stay real, since nothing in the checkpoint recreates them."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_skeleton(
    model_cls: type,
    config: Any,
    dtype: torch.dtype | None = None,
    *,
    on_meta: bool = False,
    tie_weights: bool = False,
) -> nn.Module:
    """The transformers model `model_cls` of `config` with its weight initialisation skipped: the one
    way quantmint builds a model whose weights come from elsewhere.

    Args:
        model_cls: a transformers model class (`model_class`).
        config: its `PretrainedConfig`.
        dtype: the parameters' dtype (None: the config's).
        on_meta: every parameter on `meta` (no weight memory at all; buffers such as rotary frequencies
            stay real). Otherwise the parameters are allocated, uninitialised, for a checkpoint to fill.
        tie_weights: tie the input and output embeddings as `from_pretrained` does (the skipped
            initialisation skips that too).
    """
    from transformers.initialization import no_init_weights

    kwargs = {} if dtype is None else {"dtype": dtype}
    with no_init_weights(), _parameters_on_meta() if on_meta else contextlib.nullcontext():
        model = model_cls._from_config(config, **kwargs)
        if tie_weights:
            model.tie_weights()
    return model
