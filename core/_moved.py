"""Module paths from before core/ was grouped into subpackages, kept importable as aliases.

`import quantmint.family` (or any old path below) returns the module at its new path, the same object,
with a `DeprecationWarning` naming the new path. Nothing inside quantmint imports an old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "calibration": "algorithms.calibration",
    "checkpoint": "formats.checkpoint",
    "checkpoint_docs": "formats.checkpoint_docs",
    "checkpoint_format": "formats.checkpoint_format",
    "cli": "tools.cli",
    "data": "io.data",
    "example_models": "tools.example_models",
    "export": "formats.export",
    "family": "extension.family",
    "hf": "formats.hf",
    "hookspecs": "extension.hookspecs",
    "kv_cache": "algorithms.kv_cache",
    "matching": "extension.matching",
    "memory": "tools.memory",
    "models": "io.models",
    "native": "numerics.native",
    "native_rtn": "numerics.native_rtn",
    "observers": "algorithms.observers",
    "outdir": "io.outdir",
    "quant_math": "numerics.quant_math",
    "registry": "extension.registry",
    "report": "tools.report",
    "rotation": "algorithms.rotation",
    "runtime": "extension.runtime",
    "safetensors_io": "formats.safetensors_io",
    "streaming": "algorithms.streaming",
    "summary": "formats.summary",
    "synthetic": "tools.synthetic",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `quantmint.<old>` to the module now at `quantmint.<new>`."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix != "quantmint" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = "quantmint." + MOVED[spec.name.partition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._spec = module.__spec__  # the import system overwrites __spec__ with the alias's
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # before an editable install's finder
