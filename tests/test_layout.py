"""The layout keeps its promises: old module paths still import (as the same module objects), nothing
inside quantmint imports an old path, and no code outside a family plugin dispatches on a family's name."""

from __future__ import annotations

import importlib
import io
import re
import tokenize
import warnings
from pathlib import Path

import pytest

import quantmint
from quantmint._moved import MOVED
from quantmint.extension import registry

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for top in ("core", "backends", "plugins") for p in sorted((ROOT / top).rglob("*.py"))]


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_old_module_path_is_an_alias_of_the_new_one(old: str, new: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"quantmint.{old}")
    assert module is importlib.import_module(f"quantmint.{new}")
    assert module.__spec__.name == f"quantmint.{new}"  # the alias leaves the module's own spec alone
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_old_from_import_of_a_public_name_still_works() -> None:
    from quantmint.family import ModelFamily  # a plugin written against the flat layout

    assert ModelFamily is quantmint.ModelFamily


def test_nothing_inside_quantmint_imports_an_old_path() -> None:
    old = re.compile(r"\bquantmint\.(" + "|".join(map(re.escape, MOVED)) + r")\b")
    bare = re.compile(r"^\s*from quantmint import ([^\n(]+)", re.M)
    found = []
    for path in SOURCES:
        if path.name == "_moved.py":
            continue
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in old.finditer(text)]
        for m in bare.finditer(text):
            names = {n.split(" as ")[0].strip() for n in m.group(1).split("#")[0].split(",")}
            found += [f"{path.relative_to(ROOT)}: from quantmint import {n}" for n in names & set(MOVED)]
    assert not found


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    out = []
    for tok in tokens:
        if tok.type == tokenize.STRING:
            body = tok.string.lstrip("rbfuRBFU")
            if not body.startswith(('"""', "'''")):  # docstrings are prose
                out.append((tok.start[0], body.strip("\"'")))
    return out


def test_no_code_outside_a_family_plugin_names_a_family() -> None:
    """Family-specific facts live in the family's declaration, not in tables of names elsewhere."""
    families = set(registry.model_families())
    plugin_dir = ROOT / "plugins"
    # synthetic.py writes a Llama-shaped checkpoint: the name is its output, not a dispatch
    allowed = {ROOT / "core" / "tools" / "synthetic.py"}
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in SOURCES
        if plugin_dir not in path.parents and path not in allowed
        for line, text in _string_literals(path)
        if text in families
    ]
    assert not found
