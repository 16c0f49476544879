"""Module selection by name, shared by every ignore list and target list in quantmint."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["matches_any", "name_matches"]


def name_matches(name: str, pattern: str) -> bool:
    """True if module `name` is selected by `pattern`.

    A pattern is an exact module name (`model.layers.0.mlp.down_proj`), a dotted suffix of it
    (`down_proj`, `mlp.down_proj`, `lm_head`: the seeds' opname_blacklist / modules_to_not_convert
    style), or a regex after `re:` that must match the whole name (`re:.*layers\\.(0|1)\\..*`).
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(name_matches(name, p) for p in patterns)
