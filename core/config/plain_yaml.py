"""Reading and writing config YAML as plain data only, with bounds on size, depth and integers."""

from __future__ import annotations

from typing import Any

import yaml

from quantmint.errors import ConfigError


def short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters; safe for ints too long to print and deep structures."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length():,} bits>"
    if isinstance(value, (dict, list, tuple, set)) and len(value) > 20:
        return f"<a {type(value).__name__} of {len(value):,} items>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- Reading YAML: plain data only ---------------------------------------------------------------------
# A config is a small tree of mappings, lists and scalars. Anything else is refused before pydantic sees
# it, with one line that says where: YAML anchors and aliases (a 9-level alias bomb expands to gigabytes),
# duplicate keys (YAML keeps the last silently), keys that are not strings, nesting deeper than
# MAX_CONFIG_DEPTH (Python would overflow its stack), integers longer than MAX_INT_DIGITS, and files
# larger than MAX_CONFIG_BYTES or not UTF-8.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_NODES = 100_000
MAX_INT_DIGITS = 100


def _at(node: Any) -> str:
    mark = getattr(node, "start_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that builds plain data only and refuses what a config never needs."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"{_at(event)}: YAML alias *{event.anchor} is not allowed in a config: write the value out"
            )
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise ConfigError(
                f"{_at(event)}: YAML anchor &{event.anchor} is not allowed in a config: drop it and "
                "write every value out"
            )
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{_at(event)}: more than {MAX_CONFIG_NODES:,} values; a config is small")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise ConfigError(
                    f"{_at(event)}: nested more than {MAX_CONFIG_DEPTH} levels deep; a config needs 3"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        seen: dict[str, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                scalar = isinstance(key_node, yaml.ScalarNode)
                shown = short_repr(key_node.value) if scalar else f"(a {key_node.id})"
                raise ConfigError(
                    f"{_at(key_node)}: key {shown} is not a string (it reads as "
                    f"{key_node.tag.rsplit(':', 1)[-1]}); every key is a name: quote it or remove it"
                )
            if key_node.value in seen:
                raise ConfigError(
                    f"{_at(key_node)}: duplicate key {short_repr(key_node.value)} (first at "
                    f"{_at(seen[key_node.value])}): keep one"
                )
            seen[key_node.value] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise ConfigError(
                f"{_at(node)}: an integer of {digits:,} digits; no config value needs more than "
                f"{MAX_INT_DIGITS}"
            )
        return super().construct_yaml_int(node)


ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)

# YAML types no config value has: refused by name (PyYAML would build dates, bytes and sets, and its
# timestamp constructor crashes on an explicit `!!timestamp` it cannot parse).
_NOT_IN_A_CONFIG = {
    "timestamp": "a date or time",
    "binary": "binary data",
    "set": "a set",
    "omap": "an ordered map",
    "pairs": "a list of pairs",
}


def _refuse_kind(loader: ConfigLoader, node: Any) -> Any:
    kind = node.tag.rsplit(":", 1)[-1]
    shown = short_repr(node.value) if isinstance(node, yaml.ScalarNode) else f"(a {node.id})"
    raise ConfigError(
        f"{_at(node)}: {shown} reads as {_NOT_IN_A_CONFIG[kind]} (YAML !!{kind}), which no config value is: "
        "write the value the key takes (quote it for a string, and drop any !!tag)"
    )


for _kind in _NOT_IN_A_CONFIG:
    ConfigLoader.add_constructor(f"tag:yaml.org,2002:{_kind}", _refuse_kind)


class ConfigDumper(yaml.SafeDumper):
    """Writes every value out: no anchors or aliases, which `ConfigLoader` refuses."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def yaml_data(text: str) -> Any:
    """The plain data of a YAML config text, or one ConfigError line saying what is wrong and where."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config is {len(text):,} characters long; a config is at most {MAX_CONFIG_BYTES:,}"
        )
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        raise ConfigError(f"config is not valid YAML: {exc}") from None
    except (ValueError, TypeError, AttributeError, LookupError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors of floats, ints and the like on a value they cannot read
        raise ConfigError(f"config has a value YAML cannot read: {type(exc).__name__}: {exc}") from None


def check_plain(data: Any, what: str) -> None:
    """Refuse, before pydantic sees it, data that is deeper, larger or has other keys than a config has."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    count = 0
    while stack:
        value, depth, where = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"{what} holds more than {MAX_CONFIG_NODES:,} values; a config is small")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"{what} is nested more than {MAX_CONFIG_DEPTH} levels deep (at {where[:200]}); a config "
                "needs 3"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ConfigError(
                        f"{what}: key {short_repr(key)} at '{where[:200] or '<top>'}' is not a string; "
                        "every key is a name"
                    )
                stack.append((item, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))
