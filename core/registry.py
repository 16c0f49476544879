"""The plugin manager and the registries it fills.

Plugins are found through the `quantmint` entry-point group, our own built-in families and runtime
included. The `QUANTMINT_PLUGINS` environment variable, when set, is an allow-list of entry-point
names separated by commas (`QUANTMINT_PLUGINS=llama,torch_runtime`; empty loads none).
Registration goes through `register` callbacks, which reject duplicates naming both plugins.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from typing import Any

import pluggy
from torch import nn

from quantmint import hookspecs
from quantmint.errors import PluginError, UnknownModelFamilyError
from quantmint.family import ModelFamily

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "algorithms",
    "cell_classes",
    "find_family",
    "get_plugin_manager",
    "model_families",
    "refresh",
]

ENTRY_POINT_GROUP = "quantmint"
PLUGINS_ENV = "QUANTMINT_PLUGINS"
PLUGIN_GUIDE = "README.md, section 'Writing a model-family plugin'"

_pm: pluggy.PluginManager | None = None
_families: dict[str, ModelFamily] | None = None
_cells: dict[str, type] | None = None
_algorithms: dict[str, Any] | None = None


def get_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry points loaded on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        pm.add_hookspecs(hookspecs)
        if load_entry_points:
            _load_entry_points(pm)
        try:
            pm.check_pending()  # a hook implementation whose name no hookspec has: a misspelt hook
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"{exc}: is its name misspelt? quantmint's hooks are "
                f"{', '.join(sorted(n for n in dir(hookspecs) if n.startswith('register_')))}"
            ) from None
        _pm = pm
    return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow_env = os.environ.get(PLUGINS_ENV)
    allowed = None if allow_env is None else {n.strip() for n in allow_env.split(",") if n.strip()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}, from package {dist}) failed to import: {exc}; "
                f"fix or uninstall it, or leave it out of {PLUGINS_ENV}"
            ) from exc
        pm.register(plugin, name=ep.name)


def refresh() -> None:
    """Forget the collected registries so that they are rebuilt from the current plugins."""
    global _families, _cells, _algorithms
    _families = None
    _cells = None
    _algorithms = None


def _collect(hook_name: str, key: Any, validate: Any) -> dict[str, Any]:
    """Call one `register_*` hook of every plugin and gather what each registers, keyed by `key(obj)`."""
    pm = get_plugin_manager()
    found: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin_name = impl.plugin_name

        def register(obj: Any, _plugin: str = plugin_name) -> None:
            validate(obj, _plugin)
            k = key(obj)
            if k in found:
                raise PluginError(
                    f"{hook_name}: {k!r} is registered twice, by plugin {owner[k]!r} and by plugin "
                    f"{_plugin!r}; uninstall one of them or exclude it with {PLUGINS_ENV}"
                )
            found[k] = obj
            owner[k] = _plugin

        impl.function(register=register)
    return found


def _validate_family(obj: Any, plugin: str) -> None:
    if not isinstance(obj, ModelFamily):
        raise PluginError(f"plugin {plugin!r} registered {obj!r}, which is not a quantmint ModelFamily")
    stray = sorted(set(obj.hadamard_linears) - set(obj.linears))
    if stray:
        raise PluginError(
            f"plugin {plugin!r}: family {obj.name!r} lists hadamard_linears {stray} that are not among its "
            "linears; declare them in `linears` too"
        )


def model_families() -> dict[str, ModelFamily]:
    """Every registered model family, by name."""
    global _families
    if _families is None:
        families = _collect("register_model_families", lambda f: f.name, _validate_family)
        seen: dict[str, str] = {}
        for family in families.values():
            for arch in family.architectures:
                if arch in seen:
                    raise PluginError(
                        f"architecture {arch!r} is claimed by model families {seen[arch]!r} and "
                        f"{family.name!r}; remove it from one of them"
                    )
                seen[arch] = family.name
        _families = families
    return _families


def cell_classes() -> dict[str, type]:
    """Every registered quantized-layer class, by the scheme it implements (`w8a16`, ...)."""
    from quantmint.cells.base import QuantizedLinear

    def validate(obj: Any, plugin: str) -> None:
        if not (isinstance(obj, type) and issubclass(obj, QuantizedLinear)):
            raise PluginError(f"plugin {plugin!r} registered {obj!r}, which is not a QuantizedLinear class")

    global _cells
    if _cells is None:
        _cells = _collect("register_cells", lambda c: c.scheme, validate)
    return _cells


def algorithms(validate: Any) -> dict[str, Any]:
    """Every registered algorithm, by its config type's name (see `quantmint.algorithms.base`, which
    passes `validate`)."""
    global _algorithms
    if _algorithms is None:
        _algorithms = _collect("register_algorithms", lambda a: a.config_type.name, validate)
    return _algorithms


def find_family(model: nn.Module, name: str | None = None) -> ModelFamily:
    """The family that handles `model` (or the one called `name`), else a clear error."""
    families = model_families()
    if name is not None:
        if name not in families:
            raise UnknownModelFamilyError(
                f"unknown model family {name!r}; registered families: {sorted(families) or 'none'}"
            )
        return families[name]
    for family in families.values():
        if family.matches(model):
            return family
    known = sorted(a for f in families.values() for a in f.architectures)
    raise UnknownModelFamilyError(
        f"no model family handles {type(model).__name__}; known architectures: {', '.join(known) or 'none'}. "
        f"To support it, write a model-family plugin ({PLUGIN_GUIDE})"
    )
