"""Small helpers around Hugging Face directories shared by loading and saving code."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantmint.errors import QuantmintError

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


@contextmanager
def staged_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty sibling directory to write into; rename it to `out` only if the block succeeds.

    On any failure the staging directory is removed, so `out` is never half-written. With
    `overwrite`, an existing `out` is replaced only once the new directory is complete.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} appeared while it was being written")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
