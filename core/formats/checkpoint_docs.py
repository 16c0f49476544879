"""The field tables of docs/checkpoint-format.md, generated from the checkpoint format's JSON schemas.

    python -m quantmint.formats.checkpoint_docs docs/checkpoint-format.md          # rewrite the tables
    python -m quantmint.formats.checkpoint_docs --check docs/checkpoint-format.md  # exit 1 if out of date

Each table sits between `<!-- generated:NAME -->` and `<!-- end generated:NAME -->` lines of the page.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantmint.formats.checkpoint_format import (
    CheckpointManifest,
    FamilyProvider,
    FileEntry,
    QuantizationConfigBlock,
)

__all__ = ["field_table", "generated_tables", "render_docs"]


def _schema_type(prop: dict[str, Any]) -> str:
    if "const" in prop:
        return f"`{prop['const']!r}`".replace("'", '"')
    if "enum" in prop and len(prop["enum"]) == 1:
        return f"`{prop['enum'][0]!r}`".replace("'", '"')
    if "$ref" in prop:
        return f"object ({prop['$ref'].rsplit('/', 1)[-1]})"
    if "anyOf" in prop:
        return " or ".join(_schema_type(p) for p in prop["anyOf"])
    kind = prop.get("type")
    if kind == "object":
        values = prop.get("additionalProperties", {})
        return f"object of string -> {_schema_type(values)}"
    if kind == "array":
        return f"list of {_schema_type(prop.get('items', {}))}"
    return str(kind)  # string, integer, boolean, null


def field_table(model: type[BaseModel]) -> str:
    """A Markdown table of `model`'s fields, from its JSON schema: name, type, required, meaning."""
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    rows = ["| key | type | required | meaning |", "| --- | --- | --- | --- |"]
    for name, prop in schema["properties"].items():
        default = "" if name in required else f" (default `{json.dumps(prop.get('default'))}`)"
        text = " ".join(prop.get("description", "").split()).replace("|", "\\|")
        rows.append(
            f"| `{name}` | {_schema_type(prop)} | {'yes' if name in required else 'no' + default} | {text} |"
        )
    return "\n".join(rows)


def generated_tables() -> dict[str, str]:
    """The tables docs/checkpoint-format.md holds between `<!-- generated:NAME -->` markers."""
    return {
        "quantization_config": field_table(QuantizationConfigBlock),
        "family-provider": field_table(FamilyProvider),
        "manifest": field_table(CheckpointManifest),
        "manifest-entry": field_table(FileEntry),
    }


def render_docs(text: str) -> str:
    """`text` (the docs page) with every generated table replaced by the current one."""
    for name, table in generated_tables().items():
        start, end = re.escape(f"<!-- generated:{name} -->"), re.escape(f"<!-- end generated:{name} -->")
        pattern = re.compile(rf"({start}\n)(?:.*?\n)?({end})", re.S)
        text, n = pattern.subn(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
        if n != 1:
            raise ValueError(f"the page has {n} `generated:{name}` sections, expected 1")
    return text


def main(argv: list[str] | None = None) -> int:
    """`python -m quantmint.formats.checkpoint_docs [--check] [PAGE]`: regenerate (or check) the field tables
    of docs/checkpoint-format.md from the schema."""
    parser = argparse.ArgumentParser(
        prog="python -m quantmint.formats.checkpoint_docs", description=main.__doc__
    )
    parser.add_argument("page", nargs="?", default="docs/checkpoint-format.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    page = Path(args.page)
    text = page.read_text()
    new = render_docs(text)
    if args.check:
        if new != text:
            print(f"{page} is out of date: run python -m quantmint.formats.checkpoint_docs {page}")
            return 1
        return 0
    page.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
