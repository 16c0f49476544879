"""The typed checkpoint format (`quantmint.formats.checkpoint_format`): the `quantization_config` block and
the
manifest round-trip through their schemas, checkpoints of this and the previous release parse, every
malformed field is one `CheckpointError` line naming it, and docs/checkpoint-format.md matches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import build_tiny, byte_tokenizer

from quantmint.algorithms.ptq import quantize
from quantmint.config import PTQConfig
from quantmint.errors import CheckpointError
from quantmint.formats.checkpoint import MANIFEST_NAME, save_quantized, verify_checkpoint
from quantmint.formats.checkpoint_docs import generated_tables, render_docs
from quantmint.formats.checkpoint_format import (
    FORMAT_VERSION,
    CheckpointManifest,
    QuantizationConfigBlock,
    claims_quantmint,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints_v1"
DOCS = ROOT / "docs" / "checkpoint-format.md"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fmt") / "ckpt"
    save_quantized(quantize(build_tiny("llama"), "w8a16"), path, tokenizer=byte_tokenizer())
    return path


def _raw_block(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def test_a_written_block_parses_and_round_trips_to_the_same_json(saved: Path) -> None:
    raw = _raw_block(saved)
    block = QuantizationConfigBlock.from_config_json(saved)
    assert block.to_json_dict() == raw
    assert json.dumps(block.to_json_dict(), sort_keys=True) == json.dumps(raw, sort_keys=True)
    assert QuantizationConfigBlock.from_block(block.to_json_dict(), "x") == block
    assert isinstance(block.config, PTQConfig) and block.config.mode == "deploy"
    assert block.format_version == FORMAT_VERSION and block.family == "llama" and block.scheme == "w8a16"
    assert set(block.modules.values()) == {"w8a16"} and block.kv_cache_modules == []


def test_a_written_manifest_parses_and_round_trips_to_the_same_bytes(saved: Path) -> None:
    text = (saved / MANIFEST_NAME).read_text()
    manifest = CheckpointManifest.from_json(json.loads(text), saved / MANIFEST_NAME)
    assert json.dumps(manifest.to_json_dict(), indent=2) + "\n" == text
    assert manifest.files is not None and "config.json" in manifest.files


def test_verify_checkpoint_returns_the_parsed_objects(saved: Path) -> None:
    block, manifest = verify_checkpoint(saved)
    assert isinstance(block, QuantizationConfigBlock) and isinstance(manifest, CheckpointManifest)


@pytest.mark.parametrize("name", ["llama-w8a16", "llama-w8a8-c8", "llama-w4a16"])
def test_checkpoints_of_the_previous_release_parse(name: str) -> None:
    path = FIXTURES / name
    block = QuantizationConfigBlock.from_config_json(path)
    assert block.to_json_dict() == _raw_block(path)
    manifest = CheckpointManifest.from_json(json.loads((path / MANIFEST_NAME).read_text()), path)
    assert manifest.files is None  # written before the manifest covered config.json
    assert json.dumps(manifest.to_json_dict(), indent=2) + "\n" == (path / MANIFEST_NAME).read_text()


def test_keys_that_older_blocks_may_lack_default_to_empty(saved: Path) -> None:
    raw = {k: v for k, v in _raw_block(saved).items() if k not in ("kv_cache_modules", "rotated_modules")}
    block = QuantizationConfigBlock.from_block(raw, "x")
    assert block.kv_cache_modules == [] and block.rotated_modules == []


def _without(key: str) -> Any:
    return lambda b: {k: v for k, v in b.items() if k != key}


def _with(key: str, value: Any) -> Any:
    return lambda b: {**b, key: value}


# kind -> (edit of a valid block, words the one line must hold)
MALFORMED: dict[str, tuple[Any, str]] = {
    "not-a-mapping": (lambda b: [b], "not a quantmint checkpoint"),
    "null": (lambda b: None, "not a quantmint checkpoint"),
    "other-method": (_with("quant_method", "gptq"), "quant_method='gptq'"),
    "method-missing": (_without("quant_method"), "not a quantmint checkpoint"),
    "version-2": (_with("format_version", 2), "format_version 2"),
    "version-string": (_with("format_version", "1"), "format_version '1'"),
    "version-true": (_with("format_version", True), "format_version True"),
    "version-float": (_with("format_version", 1.0), "format_version 1.0"),
    "version-missing": (_without("format_version"), "format_version None"),
    "scheme-number": (_with("scheme", 8), "`scheme` is the number 8; it must be a string"),
    "scheme-null": (_with("scheme", None), "`scheme` is null"),
    "scheme-missing": (_without("scheme"), "`scheme` is missing"),
    "family-list": (_with("family", ["llama"]), "`family` is a list of 1 items; it must be a string"),
    "family-missing": (_without("family"), "`family` is missing"),
    "config-string": (_with("config", "w8a16"), "`config`: must be an object"),
    "config-missing": (_without("config"), "`config` is missing"),
    "config-bad-value": (lambda b: {**b, "config": {**b["config"], "mode": "train"}}, "`config`: PTQConfig"),
    "config-unknown-key": (lambda b: {**b, "config": {**b["config"], "extra": 1}}, "unknown key 'extra'"),
    "modules-string": (_with("modules", "down_proj"), "`modules` is the string 'down_proj'"),
    "modules-list": (_with("modules", ["down_proj"]), "`modules` is a list"),
    "modules-int-scheme": (_with("modules", {"model.layers.0.mlp.down_proj": 8}), "`modules['model.layers.0"),
    "modules-missing": (_without("modules"), "`modules` is missing"),
    "kv-modules-string": (_with("kv_cache_modules", "model.layers.0"), "`kv_cache_modules` is the string"),
    "kv-modules-numbers": (_with("kv_cache_modules", [0]), "`kv_cache_modules[0]` is the number 0"),
    "rotated-null": (_with("rotated_modules", None), "`rotated_modules` is null"),
    "rotated-mapping": (_with("rotated_modules", {"a": "b"}), "`rotated_modules` is an object"),
    "unknown-key": (_with("comment", "hi"), "unknown key `comment`"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_every_malformed_field_is_a_one_line_checkpoint_error(kind: str, saved: Path) -> None:
    edit, words = MALFORMED[kind]
    with pytest.raises(CheckpointError) as info:
        QuantizationConfigBlock.from_block(edit(_raw_block(saved)), saved)
    message = str(info.value)
    assert "\n" not in message and len(message) <= 1000
    assert words in message
    assert str(saved) in message
    # ... and says what to do
    assert any(fix in message for fix in ("re-quantize", "quantmint quantize", "release that wrote it"))


def test_many_bad_entries_are_summarized_in_one_bounded_line(saved: Path) -> None:
    bad = {**_raw_block(saved), "modules": {f"m{i}": i for i in range(10_000)}}
    with pytest.raises(CheckpointError) as info:
        QuantizationConfigBlock.from_block(bad, "x")
    assert "and 9995 more" in str(info.value) and len(str(info.value)) <= 1000


def test_a_config_json_edit_is_refused_by_the_file_reader(saved: Path, tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["kv_cache_modules"] = "model.layers.0"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="`kv_cache_modules` is the string") as info:
        QuantizationConfigBlock.from_config_json(path)
    assert "\n" not in str(info.value)


def test_claims_quantmint_only_looks_at_the_method() -> None:
    assert claims_quantmint({"quant_method": "quantmint"})
    assert not claims_quantmint({"quant_method": "compressed-tensors"})
    assert not claims_quantmint(["quantmint"]) and not claims_quantmint(None)


# Manifest: open to unknown keys, strict about the rest.
MALFORMED_MANIFESTS: dict[str, tuple[Any, str]] = {
    "list": (lambda m: [m], "not a JSON object"),
    "version": (_with("format_version", 2), "not a quantmint format-1 manifest"),
    "version-true": (_with("format_version", True), "not a quantmint format-1 manifest"),
    "shards-empty": (_with("shards", {}), "`shards` is an object of 0 keys"),
    "shards-missing": (_without("shards"), "`shards` is missing"),
    "shard-traversal": (
        lambda m: {**m, "shards": {"../x.safetensors": next(iter(m["shards"].values()))}},
        "not a plain file name",
    ),
    "sha-not-hex": (
        lambda m: {**m, "shards": {k: {**v, "sha256": "z" * 64} for k, v in m["shards"].items()}},
        "['sha256']`",
    ),
    "bytes-bool": (
        lambda m: {**m, "shards": {k: {**v, "bytes": True} for k, v in m["shards"].items()}},
        "['bytes']` is the boolean true",
    ),
    "aliases-list": (_with("aliases", ["lm_head.weight"]), "`aliases` is a list"),
    "config-not-covered": (
        lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != "config.json"}},
        "does not cover config.json",
    ),
}


@pytest.mark.parametrize("kind", list(MALFORMED_MANIFESTS))
def test_every_malformed_manifest_field_is_a_one_line_checkpoint_error(kind: str, saved: Path) -> None:
    edit, words = MALFORMED_MANIFESTS[kind]
    raw = json.loads((saved / MANIFEST_NAME).read_text())
    with pytest.raises(CheckpointError) as info:
        CheckpointManifest.from_json(edit(raw), saved / MANIFEST_NAME)
    assert "\n" not in str(info.value) and words in str(info.value)


def test_unknown_manifest_keys_are_ignored(saved: Path) -> None:
    raw = json.loads((saved / MANIFEST_NAME).read_text())
    manifest = CheckpointManifest.from_json({**raw, "comment": "hi"}, "x")
    assert manifest.to_json_dict() == raw


def test_the_docs_tables_match_the_schema() -> None:
    text = DOCS.read_text()
    assert render_docs(text) == text, (
        "run: python -m quantmint.formats.checkpoint_docs docs/checkpoint-format.md"
    )
    for table in generated_tables().values():
        assert table in text
    for field in QuantizationConfigBlock.model_fields:
        assert f"| `{field}` |" in text
