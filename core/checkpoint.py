"""The quantmint checkpoint format: a Hugging Face model directory with int8 safetensors.

Lifecycle:
- `save_quantized` writes, into a temporary sibling directory that is renamed into place at the end,
  safetensors shards (`model.safetensors`, or `model-0000i-of-0000n.safetensors` plus the usual
  `model.safetensors.index.json` above `max_shard_size`), `config.json` with a `quantization_config`
  block, the tokenizer and generation config, and `quantmint_manifest.json` (sha256 and size of each
  shard, tied-tensor aliases). A failure leaves no output directory behind.
- `load_quantized` is deploy mode: it builds the model skeleton without allocating float weights,
  converts its structure from the saved config, then loads the int8 tensors. A missing, extra,
  mis-shaped, mistyped or corrupt tensor or shard is refused with a message that names it.

Tensors are stored with compressed-tensors names (`weight` int8, `weight_scale`, ...). Never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantmint.algorithms.ptq import PTQ, STATE_ATTR, quant_state
from quantmint.config import PTQConfig
from quantmint.errors import CheckpointError, ConfigError, QuantmintError
from quantmint.hf import model_class, read_config_json, staged_directory
from quantmint.safetensors_io import INDEX_NAME, ShardWriter, TensorSpec, plan_shards, shard_names

__all__ = [
    "CALIBRATION_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "QUANT_METHOD",
    "load_quantized",
    "save_quantized",
]

QUANT_METHOD = "quantmint"
FORMAT_VERSION = 1
MANIFEST_NAME = "quantmint_manifest.json"
# What calibration measured (samples, seconds, peak RSS; block PTQ's per-block MSE log): for reports.
CALIBRATION_NAME = "quantmint_calibration.json"
SHARD_METADATA = {"format": "pt"}

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """`2GB`, `500MiB`, `1048576` -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"invalid size {size!r}; use bytes or a number with KB, MB, GB, KiB, MiB or GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _split_aliases(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied embeddings); safetensors refuses them.

    Tensors on the `meta` device (a streamed model's skeleton) have no storage: they alias only when
    they are the same object, so pass `state_dict(keep_vars=True)`.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in state_dict.items():
        if tensor.is_meta:
            key: tuple[Any, ...] = ("meta", id(tensor))
        else:
            key = (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tensor.shape,
                tensor.stride(),
                tensor.dtype,
            )
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor
    return unique, aliases


def write_shard(path: Path, specs: list[TensorSpec], fetch: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    """Write one shard, fetching each tensor only when its turn comes; returns its manifest entry."""
    writer = ShardWriter(path, specs, SHARD_METADATA)
    try:
        for spec in specs:
            writer.write(spec.name, fetch(spec.name))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# Writes every planned shard into a directory: [(file name, specs)] -> {file name: manifest entry}.
ShardsWriter = Callable[[Path, list[tuple[str, list[TensorSpec]]]], dict[str, dict[str, Any]]]


def quantization_config_block(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a converted model."""
    state = quant_state(model)
    assert state is not None
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "scheme": state.config.scheme_name,
        "family": state.family,
        "config": state.config.with_updates(mode="deploy").to_dict(),
        "modules": dict(state.modules),
        "kv_cache_modules": list(state.kv_modules),
        "rotated_modules": list(state.rotated),
    }


# The files a Hugging Face tokenizer is made of (those present are copied; see `save_quantized`).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of model directory `src` into `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if not copied:
        raise CheckpointError(f"{src} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return copied


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write a converted model as a quantmint checkpoint directory; returns its path.

    Args:
        model: a model returned by `quantize` (or `load_quantized`).
        out_dir: the directory to create. It must not exist unless `overwrite=True`.
        tokenizer: saved alongside, so the directory is self-contained (optional): a tokenizer object
            (written with its `save_pretrained`) or a model directory whose tokenizer files are copied
            as they are (`TOKENIZER_FILES`; what the CLI does: no tokenizer is loaded to save it).
        max_shard_size: shards are split above this many bytes (`"2GB"`, `500_000_000`).
        overwrite: replace an existing directory, only once the new one is complete.
    """
    state = quant_state(model)
    if state is None:
        raise ConfigError(
            "save_quantized needs a model quantized by quantmint: call quantmint.quantize first"
        )
    if state.phase != "converted":
        raise ConfigError("the model is fake-quantized (apply phase): call PTQ.convert(model) before saving")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; remove it or pass overwrite=True")
    max_bytes = parse_size(max_shard_size)
    with staged_directory(out, overwrite=overwrite, inputs=[_source_dir(model)]) as tmp:
        write_checkpoint(model, tmp, tokenizer, max_bytes)
    return out


def _source_dir(model: nn.Module) -> str | None:
    """The directory `model` was loaded from, if it is one: a checkpoint is never written over it."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name and Path(name).is_dir() else None


def write_checkpoint(
    model: nn.Module,
    tmp: Path,
    tokenizer: Any,
    max_bytes: int,
    write_shards: ShardsWriter | None = None,
) -> None:
    """Write `model` into `tmp`. Its tensors are planned from the state dict's names, dtypes and
    shapes, then fetched one at a time: from memory, from the block store of a model calibrated out
    of core (`quantmint.streaming`), or, with `write_shards`, by the caller (streaming RTN)."""
    tensors, aliases = _split_aliases(model.state_dict(keep_vars=True))
    shards = plan_shards([TensorSpec.of(name, t) for name, t in tensors.items()], max_bytes)
    planned = list(zip(shard_names(len(shards)), shards, strict=True))
    if write_shards is None:
        state = quant_state(model)
        store = state.block_store if state is not None else None

        def fetch(name: str) -> torch.Tensor:
            tensor = tensors[name]
            if tensor.is_meta:
                if store is None:
                    raise CheckpointError(f"tensor {name!r} of the model has no data (meta device)")
                return store.read(name)
            return tensor.detach()

        shard_info = {name: write_shard(tmp / name, specs, fetch) for name, specs in planned}
    else:
        shard_info = write_shards(tmp, planned)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(spec.nbytes for shard in shards for spec in shard)},
            "weight_map": {spec.name: name for name, specs in planned for spec in specs},
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))

    config = model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["quantization_config"] = quantization_config_block(model)
    config_dict["dtype"] = str(_float_dtype(model)).removeprefix("torch.")
    config_dict["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(tmp)
    if isinstance(tokenizer, (str, os.PathLike)):
        copy_tokenizer_files(Path(tokenizer), tmp)
    elif tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    manifest = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "shards": shard_info,
        "aliases": aliases,
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    state = quant_state(model)
    if state is not None and state.calibration:
        (tmp / CALIBRATION_NAME).write_text(json.dumps(state.calibration, indent=1) + "\n")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# --- loading --------------------------------------------------------------------------------------
def read_quantization_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json's `quantization_config` block of a quantmint checkpoint, checked for version."""
    path = Path(path)
    config = read_config_json(path, CheckpointError)
    block = config.get("quantization_config")
    if not isinstance(block, dict) or block.get("quant_method") != QUANT_METHOD:
        method = block.get("quant_method") if isinstance(block, dict) else None
        raise CheckpointError(
            f"{path} is not a quantmint checkpoint (quantization_config.quant_method={method!r}); "
            "quantize the float model with `quantmint quantize` first"
        )
    if block.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {block.get('format_version')!r}; this quantmint reads "
            f"version {FORMAT_VERSION}: upgrade quantmint or re-quantize"
        )
    return block


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_NAME}: the checkpoint is incomplete; re-quantize it")
    try:
        return json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_file} is not valid JSON: {exc}") from None


def _read_shards(path: Path, manifest: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard, info in manifest["shards"].items():
        file = path / shard
        if not file.is_file():
            raise CheckpointError(f"shard {file} listed in {MANIFEST_NAME} is missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"shard {file} has {size} bytes, the manifest says {info['bytes']}: the file is truncated "
                "or was replaced; re-quantize or copy the checkpoint again"
            )
        if verify and _sha256(file) != info["sha256"]:
            raise CheckpointError(f"shard {file} fails its sha256 check: the file is corrupt; copy it again")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in tensors:
                        raise CheckpointError(f"tensor {key!r} appears in more than one shard ({file})")
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"shard {file} is not a readable safetensors file: {exc}") from None
    return tensors


def _check_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "it was not written by this model's quantization, or is incomplete"
        )
    extra = sorted(set(loaded) - set(expected))
    if extra:
        raise CheckpointError(
            f"checkpoint {path} has unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
            "that the model does not have; config.json and the shards do not belong together"
        )
    for name, want in expected.items():
        got = loaded[name]
        if got.shape != want.shape:
            raise CheckpointError(
                f"tensor {name!r} in {path} has shape {tuple(got.shape)}, "
                f"the model expects {tuple(want.shape)}"
            )
        if got.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {name!r} in {path} has dtype {got.dtype}, the model expects {want.dtype}"
            )


def load_quantized(
    path: str | os.PathLike[str], verify: bool = True, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a quantized model from a quantmint checkpoint (deploy mode).

    Args:
        path: a directory written by `save_quantized`.
        verify: check every shard's sha256 against the manifest (reads each file once more).
        device: where to put the model.
    Returns:
        The model in eval mode, with real int8 layers and its `QuantState`.
    """
    import transformers
    from transformers.initialization import no_init_weights

    path = Path(path)
    block = read_quantization_config(path)
    manifest = _read_manifest(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises several types for a bad config
        raise CheckpointError(f"{path}/config.json cannot be read by transformers: {exc}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_cls = model_class(getattr(config, "architectures", None), path, CheckpointError)
    try:
        ptq_config = PTQConfig.from_dict(block.get("config", {}))
    except QuantmintError as exc:
        raise CheckpointError(f"{path}/config.json has an invalid quantization_config: {exc}") from None
    dtype = getattr(torch, str(config.to_dict().get("dtype") or "float32"))
    # Deploy mode: the skeleton's float weights are allocated lazily and never touched, so memory holds
    # only what is loaded from the checkpoint.
    with no_init_weights():
        model = model_cls._from_config(config, dtype=dtype)
    ptq = PTQ(ptq_config.with_updates(mode="deploy"), family=block.get("family"))
    saved_modules = block.get("modules", {})
    ptq.apply(model, schemes=saved_modules if isinstance(saved_modules, dict) else None)
    if quant_state(model).kv_modules != block.get("kv_cache_modules", []):
        raise CheckpointError(
            f"{path}: the kv-cache modules listed in config.json do not match the model's attention modules; "
            "the checkpoint was edited or is corrupt"
        )
    if quant_state(model).modules != saved_modules:
        built = set(quant_state(model).modules)
        raise CheckpointError(
            f"{path}: the quantized modules listed in config.json do not match what its config selects in "
            f"{model_cls.__name__} (only in checkpoint: {sorted(set(saved_modules) - built)[:3]}, only "
            f"selected: {sorted(built - set(saved_modules))[:3]}); the checkpoint was edited or is corrupt"
        )
    loaded = _read_shards(path, manifest, verify)
    aliases = manifest.get("aliases", {})
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    _check_tensors(loaded, expected, path)
    for alias, source in aliases.items():
        loaded[alias] = loaded[source]
    model.load_state_dict(loaded, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    getattr(model, STATE_ATTR).config = ptq_config
    return model.to(device)
