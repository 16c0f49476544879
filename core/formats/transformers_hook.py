"""Registers quantmint's transformers quantizer when transformers loads its quantizer table.

`import quantmint` installs `install()`: a finder that waits for `transformers.quantizers.auto` to be
imported (by `from_pretrained`, through `transformers.modeling_utils`) and then registers the `quantmint`
quantization method (`quantmint.formats.transformers_quantizer`). Importing quantmint therefore imports
no part of transformers (it costs seconds) and nothing of vLLM; without transformers nothing happens.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

__all__ = ["install", "register"]

_TARGET = "transformers.quantizers.auto"
_QUANTIZER = "quantmint.formats.transformers_quantizer"


def register() -> None:
    """Register `QuantmintConfig` and `QuantmintHfQuantizer` under `quant_method: quantmint` through
    transformers' public `register_quantization_config` / `register_quantizer` (once): importing
    `quantmint.formats.transformers_quantizer` does it."""
    module = sys.modules.get(_QUANTIZER)
    if module is not None and not hasattr(module, "register"):
        return  # it is being imported (it imported transformers' quantizers): it registers at its end
    importlib.import_module(_QUANTIZER).register()


class _RegisteringLoader(importlib.abc.Loader):
    """The real loader of `transformers.quantizers.auto`, which registers quantmint once it has run."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        register()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._inner, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds `transformers.quantizers.auto` with the other finders and wraps its loader."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' quantizer table is already imported, else when it is."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _AfterImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder())
