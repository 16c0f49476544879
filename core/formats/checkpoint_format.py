"""The quantmint checkpoint format, typed: config.json's `quantization_config` block and the manifest.

Each is a pydantic model, written by one method (`to_json_dict`) and parsed by one function
(`QuantizationConfigBlock.from_block` / `from_config_json`, `CheckpointManifest.from_file`), which turns
every validation error into a one-line `CheckpointError` naming the field and the fix. Every reader
(loading, verification, inspect, export, the vLLM plugin, serve) goes through these objects.

Unknown keys:
- `quantization_config` is closed (`extra="forbid"`): it decides how every tensor is read, so a key this
  release does not know means a checkpoint it cannot interpret (edited, or written by a later format),
  and is refused. A writer that adds a key changing how a tensor is read must bump `FORMAT_VERSION`; an
  optional key that only describes the checkpoint and whose absence means "unknown" (`family_provider`)
  is added within version 1: an earlier reader refuses it in one line, never misreads (see
  docs/checkpoint-format.md, Versioning).
- the manifest is open (`extra="ignore"`): it only lists files and their digests, so an added key (a
  comment, a later release's bookkeeping) changes nothing a reader relies on and is ignored.

`docs/checkpoint-format.md` is written from these models; its field tables are generated from their
JSON schemas by `python -m quantmint.formats.checkpoint_docs`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantmint.config import PTQConfig
from quantmint.errors import CheckpointError, QuantmintError, one_line
from quantmint.formats.hf import read_config_json

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "QUANT_METHOD",
    "CheckpointManifest",
    "FamilyProvider",
    "FileEntry",
    "QuantizationConfigBlock",
    "claims_quantmint",
    "read_config_dict",
]

QUANT_METHOD = "quantmint"
FORMAT_VERSION = 1
MANIFEST_NAME = "quantmint_manifest.json"
_MAX_PROBLEMS = 5


def _one_line(text: object, limit: int = 500) -> str:
    """An embedded exception's text as one line (library messages may span several)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_config_dict(path: Path, error: type[QuantmintError] = CheckpointError) -> dict[str, Any]:
    """`read_config_json`, with anything but a JSON object (a list, a string, undecodable bytes, absurd
    nesting or integers) refused as `error` in one line."""
    try:
        config = read_config_json(path, error)
    except QuantmintError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, huge integers, deep nesting
        raise error(f"{path}/config.json is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(config, dict):
        raise error(
            f"{path}/config.json holds a JSON {type(config).__name__}, not an object: it is not a model "
            "config (the file was edited or is corrupt)"
        )
    return config


def claims_quantmint(block: Any) -> bool:
    """Whether a `quantization_config` value says it is quantmint's (whatever else it holds): which
    loader a directory goes to. `QuantizationConfigBlock.from_block` then checks all of it."""
    return isinstance(block, dict) and block.get("quant_method") == QUANT_METHOD


# --- describing validation errors ---------------------------------------------------------------------
def _shown(value: Any) -> str:
    """A JSON value in a few words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {_one_line(repr(value), 40)}"
    if isinstance(value, str):
        return f"the string {_one_line(repr(value), 60)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return f"a {type(value).__name__}"


def _where(loc: tuple[Any, ...]) -> str:
    """`modules['model.layers.0.mlp.down_proj']`, `kv_cache_modules[0]` (module names hold dots)."""
    if not loc:
        return "<block>"
    head, rest = str(loc[0]), loc[1:]
    return "`" + head + "".join(f"[{_one_line(repr(p), 80)}]" for p in rest if p != "[key]") + "`"


def _problems(exc: ValidationError, model: type[BaseModel], expected: dict[str, str]) -> str:
    """One phrase per error: the field, what it holds, what it must hold."""
    out = []
    errors = exc.errors(include_url=False)
    for err in errors[:_MAX_PROBLEMS]:
        loc, kind = tuple(err["loc"]), err["type"]
        field = str(loc[0]) if loc else ""
        want = expected.get(field, "")
        if kind == "missing":
            out.append(f"{_where(loc)} is missing; it must be {want}")
        elif kind == "extra_forbidden":
            out.append(
                f"unknown key {_where(loc)} (format version {FORMAT_VERSION} has only "
                f"{', '.join(model.model_fields)}); remove it or use the quantmint release that wrote it"
            )
        elif kind == "value_error":
            text = _one_line(err.get("ctx", {}).get("error", err["msg"]), 300)
            out.append(f"{_where(loc)}: {text}" if loc else text)
        else:
            out.append(f"{_where(loc)} is {_shown(err.get('input'))}; it must be {want}")
    if len(errors) > _MAX_PROBLEMS:
        out.append(f"and {len(errors) - _MAX_PROBLEMS} more")
    return "; ".join(out)


def _exact_int(value: Any) -> Any:
    """JSON `true` and `1.0` compare equal to 1 in Python; a version is an integer, nothing else."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"must be an integer, got {_shown(value)}")
    return value


# --- config.json's quantization_config ----------------------------------------------------------------
_BLOCK_EXPECTED = {
    "quant_method": f'"{QUANT_METHOD}"',
    "format_version": f"the integer {FORMAT_VERSION}",
    "scheme": 'a string (the config\'s scheme name, e.g. "w8a16")',
    "family": 'a string (the model family, e.g. "llama")',
    "family_provider": 'null or an object {"distribution": a package name, "version": a version string}',
    "config": "an object: the quantization config (PTQConfig)",
    "modules": "an object mapping module names to scheme names",
    "kv_cache_modules": "a list of module names",
    "rotated_modules": "a list of module names",
}


# A distribution name as PEP 508 spells it, and a version string: both end up in a `pip install` hint, so
# nothing else (spaces, quotes, shell characters) is accepted from a checkpoint.
_DIST_NAME = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?$"
_VERSION = r"^[A-Za-z0-9](?:[A-Za-z0-9.+!_-]{0,62}[A-Za-z0-9])?$"


class FamilyProvider(BaseModel):
    """The installed distribution whose entry point registered the checkpoint's family."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, title="family_provider")

    distribution: str = Field(
        pattern=_DIST_NAME,
        description="The distribution (pip package) name, e.g. `quantmint` for a built-in family, "
        "`quantmint-opt` for a plugin's.",
    )
    version: str = Field(
        pattern=_VERSION, description="Its installed version when the checkpoint was written."
    )


class QuantizationConfigBlock(BaseModel):
    """config.json's `quantization_config` for a quantmint checkpoint (format version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, title="quantization_config")

    quant_method: Literal["quantmint"] = Field(
        description="Names the loader: transformers and vLLM dispatch on it; always `quantmint`."
    )
    format_version: Literal[1] = Field(
        description="The version of this format. A reader refuses any version it does not know."
    )
    scheme: str = Field(
        description="The scheme name of the whole config (`PTQConfig.scheme_name`, e.g. `w8a16`, "
        "`w8a8-c8`, `w4a16`). For people and tools; each layer's scheme is in `modules`."
    )
    family: str = Field(
        description="The model family that mapped the model (`llama`, `gpt2`, `bert`, or a plugin's). "
        "The loader maps the rebuilt model with the same family."
    )
    family_provider: FamilyProvider | None = Field(
        default=None,
        description="The distribution that registered `family`, by entry point: {`distribution`, `version`} "
        "(`quantmint` for the built-in families). Absent when the family was registered without a package "
        "(in-process) and in checkpoints written before it was recorded. For people and for the message "
        "naming the package to install when `family` is not registered; loading never depends on it (a "
        "different installed version loads silently).",
    )
    config: PTQConfig = Field(
        description="The quantization config the checkpoint was made with, in deploy mode "
        "(`PTQConfig.to_dict()`), parsed by `PTQConfig.from_dict`: every key of it is checked. Its "
        "`activations`, `weights` and `kvcache` say how tensors are quantized at run time."
    )
    modules: dict[str, str] = Field(
        description="Every quantized linear layer: its full module name -> its scheme (`w8a8`, `w8a16`, "
        "`w4a16`). A linear not listed stays float. The loader refuses a config that selects other layers."
    )
    kv_cache_modules: list[str] = Field(
        default=[],
        description="The attention modules whose K/V cache is int8 (C8), each with `k_scale` and "
        "`v_scale` tensors. Empty without C8.",
    )
    rotated_modules: list[str] = Field(
        default=[],
        description="The linears whose input is rotated online by a Hadamard matrix "
        "(`algorithm_args.hadamard`); their stored weights have the rotation folded in. Empty without it.",
    )

    @field_validator("format_version", mode="before")
    @classmethod
    def _integer_version(cls, value: Any) -> Any:
        return _exact_int(value)

    @field_validator("config", mode="before")
    @classmethod
    def _parse_config(cls, value: Any) -> Any:
        if isinstance(value, PTQConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"must be {_BLOCK_EXPECTED['config']}, got {_shown(value)}")
        return PTQConfig.from_dict(value)  # a ConfigError (a ValueError), reported with the field

    def to_json_dict(self) -> dict[str, Any]:
        """The block as written into config.json (the inverse of `from_block`)."""
        out: dict[str, Any] = {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "scheme": self.scheme,
            "family": self.family,
        }
        if self.family_provider is not None:  # left out when unknown, as in earlier checkpoints
            out["family_provider"] = {
                "distribution": self.family_provider.distribution,
                "version": self.family_provider.version,
            }
        out.update(
            config=self.config.to_dict(),
            modules=dict(self.modules),
            kv_cache_modules=list(self.kv_cache_modules),
            rotated_modules=list(self.rotated_modules),
        )
        return out

    @classmethod
    def from_block(
        cls,
        block: Any,
        where: str | os.PathLike[str],
        error: type[CheckpointError] = CheckpointError,
    ) -> QuantizationConfigBlock:
        """Parse a `quantization_config` value; anything else than a quantmint block of this format
        version with well-typed fields is `error`, in one line naming the field and the fix."""
        try:
            parsed = cls.model_validate(block)
        except ValidationError as exc:
            raise error(_block_message(exc, block, where)) from None
        if parsed.family_provider is not None:  # so that a missing family names the package to install
            from quantmint.extension import registry

            provider = parsed.family_provider
            registry.note_recorded_provider(parsed.family, provider.distribution, provider.version)
        return parsed

    @classmethod
    def from_config_json(
        cls, path: str | os.PathLike[str], error: type[CheckpointError] = CheckpointError
    ) -> QuantizationConfigBlock:
        """The block of checkpoint directory `path`'s config.json."""
        path = Path(path)
        return cls.from_block(read_config_dict(path, error).get("quantization_config"), path, error)


def _block_message(exc: ValidationError, block: Any, where: str | os.PathLike[str]) -> str:
    fields = {err["loc"][0] for err in exc.errors() if err["loc"]}
    if not claims_quantmint(block):
        method = block.get("quant_method") if isinstance(block, dict) else None
        return one_line(
            f"{where} is not a quantmint checkpoint (quantization_config.quant_method={method!r}); "
            "quantize the float model with `quantmint quantize` first"
        )
    if "format_version" in fields:
        version = f"{block.get('format_version')!r:.40}"
        return one_line(
            f"{where}: checkpoint format_version {version} is not {FORMAT_VERSION}, the version this "
            "quantmint reads: use the quantmint release that wrote it, or re-quantize"
        )
    problems = _problems(exc, QuantizationConfigBlock, _BLOCK_EXPECTED)
    return one_line(
        f"{where}: quantization_config is malformed ({problems}); the checkpoint was edited or is corrupt: "
        "re-quantize or copy it again"
    )


# --- quantmint_manifest.json --------------------------------------------------------------------------
def _plain_name(name: str) -> str:
    if (
        name in ("", ".", "..")
        or any(sep in name for sep in ("/", "\\", "\0"))
        or os.path.isabs(name)
        or os.path.basename(name) != name
    ):
        raise ValueError(
            f"{_one_line(repr(name), 120)} is not a plain file name inside the checkpoint directory"
        )
    return name


class FileEntry(BaseModel):
    """A file the manifest covers: its sha256 and size."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file, 64 lowercase hex digits.")
    bytes: int = Field(ge=0, description="Size of the file in bytes.")


_MANIFEST_EXPECTED = {
    "quant_method": f'"{QUANT_METHOD}"',
    "format_version": f"the integer {FORMAT_VERSION}",
    "shards": "a non-empty object mapping file names to {sha256 (64 hex digits), bytes (an integer >= 0)}",
    "files": "an object mapping file names to {sha256 (64 hex digits), bytes (an integer >= 0)}",
    "aliases": "an object mapping tensor names to tensor names",
}


class CheckpointManifest(BaseModel):
    """`quantmint_manifest.json`: what the checkpoint holds, for verification before anything is read."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, title="quantmint_manifest.json")

    quant_method: Literal["quantmint"] = Field(description="Always `quantmint`.")
    format_version: Literal[1] = Field(description="The format version, as in config.json.")
    shards: dict[str, FileEntry] = Field(
        min_length=1,
        description="Every safetensors shard: file name -> {sha256, bytes}. A reader refuses a shard "
        "or index not listed here.",
    )
    files: dict[str, FileEntry] | None = Field(
        default=None,
        description="Every other file written (config.json, the shard index, tokenizer and generation "
        "config) but the calibration report: name -> {sha256, bytes}; always checked. Absent in "
        "manifests of releases before it existed (loaded with a warning).",
    )
    aliases: dict[str, str] = Field(
        default={},
        description="Tied tensors stored once: tensor name -> the stored tensor it shares (e.g. "
        "`lm_head.weight` -> `model.embed_tokens.weight`).",
    )

    @field_validator("format_version", mode="before")
    @classmethod
    def _integer_version(cls, value: Any) -> Any:
        return _exact_int(value)

    @field_validator("shards", "files")
    @classmethod
    def _plain_names(cls, entries: dict[str, FileEntry] | None) -> dict[str, FileEntry] | None:
        for name in entries or {}:
            _plain_name(name)
        return entries

    @model_validator(mode="after")
    def _covers_config(self) -> CheckpointManifest:
        if self.files is not None and "config.json" not in self.files:
            raise ValueError("`files` does not cover config.json")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """The manifest as written (keys in this order; `files` left out when None)."""
        out: dict[str, Any] = {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "shards": {name: {"sha256": e.sha256, "bytes": e.bytes} for name, e in self.shards.items()},
        }
        if self.files is not None:
            out["files"] = {name: {"sha256": e.sha256, "bytes": e.bytes} for name, e in self.files.items()}
        out["aliases"] = dict(self.aliases)
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str | os.PathLike[str]) -> CheckpointManifest:
        """Parse a manifest's JSON value; a one-line `CheckpointError` naming the field otherwise."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise CheckpointError(_manifest_message(exc, raw, where)) from None


def _manifest_message(exc: ValidationError, raw: Any, where: str | os.PathLike[str]) -> str:
    fields = {err["loc"][0] for err in exc.errors() if err["loc"]}
    if not isinstance(raw, dict):
        return f"{where} is not a JSON object: the manifest is corrupt"
    if fields & {"quant_method", "format_version"}:
        return one_line(
            f"{where} is not a quantmint format-{FORMAT_VERSION} manifest (quant_method="
            f"{raw.get('quant_method')!r:.80}, format_version={raw.get('format_version')!r:.40})"
        )
    return one_line(
        f"{where} is malformed ({_problems(exc, CheckpointManifest, _MANIFEST_EXPECTED)}); the manifest is "
        "corrupt or was edited: copy the checkpoint again"
    )
