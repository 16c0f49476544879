"""Small helpers around Hugging Face directories shared by loading and saving code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantmint.errors import QuantmintError
from quantmint.outdir import staged_directory

__all__ = ["model_class", "read_config_json", "staged_directory"]


def read_config_json(path: Path, error: type[QuantmintError] = QuantmintError) -> dict[str, Any]:
    """The parsed config.json of a model directory, or `error` saying what is missing or broken."""
    if not path.is_dir():
        raise error(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise error(f"{path} has no config.json: pass a Hugging Face model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{config_file} is not valid JSON: {exc}") from None


def model_class(
    architectures: list[str] | None, where: Path, error: type[QuantmintError] = QuantmintError
) -> type:
    """The transformers class named first in a config's `architectures`, else `error` naming it."""
    import transformers

    name = architectures[0] if architectures else None
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise error(
            f"{where}/config.json names architecture {name or 'none'}, which transformers "
            f"{transformers.__version__} does not provide"
        )
    return cls
