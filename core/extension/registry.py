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
import torch
from torch import nn

from quantmint.errors import NotSupportedError, PluginError, QuantmintError, UnknownModelFamilyError
from quantmint.extension import hookspecs
from quantmint.extension.family import ModelFamily
from quantmint.extension.runtime import ANY_DEVICE, Runtime

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "algorithms",
    "cell_class",
    "cell_classes",
    "family_distribution",
    "family_named",
    "find_family",
    "get_plugin_manager",
    "kv_cache_class",
    "model_families",
    "note_recorded_provider",
    "plugins_info",
    "refresh",
    "runtimes",
]

ENTRY_POINT_GROUP = "quantmint"
PLUGINS_ENV = "QUANTMINT_PLUGINS"
PLUGIN_GUIDE = "README.md, section 'Writing a model-family plugin'"

_pm: pluggy.PluginManager | None = None
_families: dict[str, ModelFamily] | None = None
_runtimes: dict[str, Runtime] | None = None
_algorithms: dict[str, Any] | None = None
_entry_points: dict[str, Any] = {}  # entry-point name -> its EntryPoint
_owners: dict[str, dict[Any, str]] = {}  # hook name -> registered key -> the plugin that registered it
# family name -> (distribution, version) a checkpoint read in this process recorded as its provider: only
# for the message of `family_named` when that family is not registered (see `note_recorded_provider`)
_recorded_providers: dict[str, tuple[str, str]] = {}


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
            raise PluginError(_validation_message(pm, exc)) from None
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
        try:
            pm.register(plugin, name=ep.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(_validation_message(pm, exc, ep.name, dist)) from None
        _entry_points[ep.name] = ep
        if not pm.get_hookcallers(plugin):
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}, from package {dist}) registered no family, algorithm, "
                "runtime or command (missing @hookimpl?): decorate its hook functions with "
                f"quantmint.hookimpl ({_hook_names()}), or uninstall it"
            )


def _hook_names() -> str:
    return ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))


def _validation_message(
    pm: pluggy.PluginManager, exc: pluggy.PluginValidationError, name: str | None = None, dist: str = "?"
) -> str:
    """A pluggy validation error in one line: the plugin, its hook, what is wrong and the fix."""
    if name is None:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        ep = _entry_points.get(name)
        if ep is not None and ep.dist is not None:
            dist = ep.dist.name
    text = " ".join(str(exc).split())
    unknown = text.startswith("unknown hook")
    fix = (
        f"is its name misspelt? quantmint's hooks are {_hook_names()}"
        if unknown
        else "a hook function takes only the arguments of quantmint's hook of that name "
        f"({_hook_signatures()})"
    )
    return f"plugin {name!r} (package {dist}): {text}; {fix}"


def _hook_signatures() -> str:
    import inspect

    return ", ".join(
        f"{n}{inspect.signature(getattr(hookspecs, n)).replace(return_annotation=inspect.Signature.empty)}"
        for n in sorted(n for n in dir(hookspecs) if n.startswith("register_"))
    )


def plugins_info() -> list[dict[str, Any]]:
    """Each loaded plugin: entry-point name, module, distribution (name, version) and what it registered
    (families, algorithms, runtimes, commands), in entry-point name order."""
    import argparse

    pm = get_plugin_manager()
    from quantmint.algorithms.base import algorithms as registered_algorithms

    model_families(), registered_algorithms(), runtimes()  # collected, so each one's owner is known
    kinds = {
        "families": "register_model_families",
        "algorithms": "register_algorithms",
        "runtimes": "register_runtimes",
    }
    rows = []
    for name, plugin in sorted(pm.list_name_plugin()):
        ep = _entry_points.get(name)
        dist = ep.dist if ep is not None else None
        row: dict[str, Any] = {
            "name": name,
            "module": ep.value if ep is not None else getattr(plugin, "__name__", repr(plugin)),
            "distribution": dist.name if dist is not None else None,
            "version": dist.version if dist is not None else None,
        }
        for kind, hook in kinds.items():
            row[kind] = sorted(k for k, owner in _owners.get(hook, {}).items() if owner == name)
        row["commands"] = []
        for impl in pm.hook.register_commands.get_hookimpls():
            if impl.plugin_name == name:
                sub = argparse.ArgumentParser(prog="quantmint").add_subparsers()
                impl.function(subparsers=sub)
                row["commands"] = sorted(sub.choices)
        rows.append(row)
    return rows


def refresh() -> None:
    """Forget the collected registries so that they are rebuilt from the current plugins."""
    global _families, _runtimes, _algorithms
    _families = None
    _runtimes = None
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

        try:
            impl.function(**dict.fromkeys(impl.argnames, register))
        except QuantmintError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin_name!r}: its hook {hook_name} failed: {type(exc).__name__}: {exc}; fix or "
                f"uninstall the plugin, or leave it out of {PLUGINS_ENV}"
            ) from exc
    _owners[hook_name] = owner
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
    stray = sorted(set(obj.serving.transposed_linears) - set(obj.linears))
    if stray:
        raise PluginError(
            f"plugin {plugin!r}: family {obj.name!r} lists serving.transposed_linears {stray} that are not "
            "among its linears; declare them in `linears` too"
        )
    stray = sorted(set(obj.serving.pooling_architectures) - set(obj.architectures))
    if stray:
        raise PluginError(
            f"plugin {plugin!r}: family {obj.name!r} lists serving.pooling_architectures {stray} that are "
            "not among its architectures; declare them in `architectures` too"
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


def _validate_runtime(obj: Any, plugin: str) -> None:
    from quantmint.cells.base import QuantizedLinear

    if not isinstance(obj, Runtime):
        raise PluginError(f"plugin {plugin!r} registered {obj!r}, which is not a quantmint Runtime")
    for cell in obj.cells:
        if not (isinstance(cell, type) and issubclass(cell, QuantizedLinear)):
            raise PluginError(
                f"plugin {plugin!r}: runtime {obj.name!r} lists {cell!r}, which is not a QuantizedLinear "
                "class"
            )
    twice = sorted({s for s in obj.schemes if obj.schemes.count(s) > 1})
    if twice:
        raise PluginError(
            f"plugin {plugin!r}: runtime {obj.name!r} lists several cells for scheme(s) {twice}; keep one "
            "of each"
        )
    if not obj.devices:
        raise PluginError(f"plugin {plugin!r}: runtime {obj.name!r} serves no device; list some, or '*'")


def runtimes() -> dict[str, Runtime]:
    """Every registered runtime, by name."""
    global _runtimes
    if _runtimes is None:
        _runtimes = _collect("register_runtimes", lambda r: r.name, _validate_runtime)
    return _runtimes


def _device_type(device: str | torch.device | None) -> str:
    """The device type cells are chosen for: `None` and `meta` (a skeleton) mean torch's default device."""
    kind = torch.device(device).type if device is not None else "meta"
    return torch.get_default_device().type if kind == "meta" else kind


def _describe_runtimes() -> str:
    found = runtimes().values()
    return "; ".join(
        f"{r.name}: {', '.join(sorted(r.schemes))} on {', '.join(r.devices)} (priority {r.priority})"
        for r in found
    )


def _choose(serving: list[Runtime], what: str) -> Runtime:
    best = max(r.priority for r in serving)
    top = sorted(r.name for r in serving if r.priority == best)
    if len(top) > 1:
        raise PluginError(
            f"runtimes {', '.join(map(repr, top))} both serve {what} at priority {best}; give one another "
            f"priority or leave one out with {PLUGINS_ENV}"
        )
    return runtimes()[top[0]]


def cell_class(scheme: str, device: str | torch.device | None = None) -> type:
    """The `QuantizedLinear` class for `scheme` on `device` (a device type or `torch.device`; None: torch's
    default), from the highest-priority runtime that serves both."""
    kind = _device_type(device)
    serving = [r for r in runtimes().values() if r.serves(scheme, kind)]
    if not serving:
        raise NotSupportedError(
            f"no runtime serves scheme {scheme!r} on device {kind!r} (registered: "
            f"{_describe_runtimes() or 'none'}); install one that does, or check {PLUGINS_ENV}"
        )
    return _choose(serving, f"scheme {scheme!r} on {kind!r}").cell(scheme)


def cell_classes(device: str | torch.device | None = None) -> dict[str, type]:
    """The class chosen for every scheme some runtime serves on `device` (see `cell_class`)."""
    kind = _device_type(device)
    schemes = sorted({s for r in runtimes().values() for s in r.schemes if r.serves(s, kind)})
    return {scheme: cell_class(scheme, kind) for scheme in schemes}


def kv_cache_class(device: str | torch.device | None = None) -> type:
    """The int8 KV cache (a transformers `Cache` class with `for_model(model)`) of the highest-priority
    runtime that has one for `device`."""
    kind = _device_type(device)
    serving = [
        r
        for r in runtimes().values()
        if r.kv_cache is not None and (ANY_DEVICE in r.devices or kind in r.devices)
    ]
    if not serving:
        raise NotSupportedError(
            f"no runtime has an int8 KV cache for device {kind!r} (registered: "
            f"{_describe_runtimes() or 'none'}); install one that does, or check {PLUGINS_ENV}"
        )
    kv_cache = _choose(serving, f"the int8 KV cache on {kind!r}").kv_cache
    assert kv_cache is not None
    return kv_cache


def algorithms(validate: Any) -> dict[str, Any]:
    """Every registered algorithm, by its config type's name (see `quantmint.algorithms.base`, which
    passes `validate`)."""
    global _algorithms
    if _algorithms is None:
        _algorithms = _collect("register_algorithms", lambda a: a.config_type.name, validate)
    return _algorithms


def family_distribution(name: str) -> tuple[str, str] | None:
    """The distribution (package name, version) whose entry point registered family `name`; None for a
    family registered without an entry point (a plugin registered in-process, as tests do) or when no
    family is called `name`."""
    model_families()  # collected, so each family's owner is known
    plugin = _owners.get("register_model_families", {}).get(name)
    ep = _entry_points.get(plugin) if plugin is not None else None
    if ep is None or ep.dist is None:
        return None
    return ep.dist.name, ep.dist.version


def note_recorded_provider(family: str, distribution: str, version: str) -> None:
    """Remember that a checkpoint being read records `distribution` `version` as the provider of `family`,
    so that `family_named` can say which package to install if that family is not registered. Called by
    `QuantizationConfigBlock.from_block`, which every checkpoint reader goes through; used for that
    message only, never to choose a family."""
    _recorded_providers[family] = (distribution, version)


def _installed_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except (PackageNotFoundError, ValueError):
        return None


def _missing_family_fix(name: str, registered: str) -> str:
    """What to do about an unregistered family: the recorded provider's package when a checkpoint
    named one, else the generic advice."""
    recorded = _recorded_providers.get(name)
    if recorded is None:
        return (
            f"it is not registered (registered: {registered}); install the plugin that declares it, or "
            f"check {PLUGINS_ENV}"
        )
    dist, version = recorded
    made = f"this checkpoint was made with the family from {dist} {version}"
    installed = _installed_version(dist)
    if installed is None:
        return f"{made}; pip install {dist} (registered families: {registered})"
    other = "" if installed == version else f", or pip install '{dist}=={version}'"
    return (
        f"{made}, and {dist} {installed} is installed but registers no family {name!r} (registered: "
        f"{registered}): check {PLUGINS_ENV}{other}"
    )


def family_named(name: str) -> ModelFamily:
    """The registered family called `name` (a checkpoint's, a --family option's), else one line naming
    what is registered and what to install (the recorded provider's package, for a checkpoint that
    records one)."""
    families = model_families()
    if name not in families:
        registered = ", ".join(sorted(families)) or "none"
        raise UnknownModelFamilyError(
            f"unknown model family {name!r}: {_missing_family_fix(name, registered)}"
        )
    return families[name]


def find_family(model: nn.Module, name: str | None = None) -> ModelFamily:
    """The family that handles `model` (or the one called `name`), else a clear error."""
    if name is not None:
        return family_named(name)
    families = model_families()
    for family in families.values():
        if family.matches(model):
            return family
    known = sorted(a for f in families.values() for a in f.architectures)
    raise UnknownModelFamilyError(
        f"no model family handles {type(model).__name__}; known architectures: {', '.join(known) or 'none'}. "
        f"To support it, write a model-family plugin ({PLUGIN_GUIDE})"
    )
