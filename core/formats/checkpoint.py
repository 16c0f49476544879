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
The `quantization_config` block and the manifest are typed in `quantmint.formats.checkpoint_format`: written
by
their `to_json_dict` and read back only through their schemas (docs/checkpoint-format.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quantmint.algorithms.ptq import PTQ, STATE_ATTR, quant_state
from quantmint.errors import CheckpointError, ConfigError, QuantmintError
from quantmint.extension import registry
from quantmint.formats.checkpoint_format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUANT_METHOD,
    CheckpointManifest,
    FamilyProvider,
    FileEntry,
    QuantizationConfigBlock,
    _one_line,
    read_config_dict,  # noqa: F401 (re-exported: quantmint.io.models and the vLLM backend import it from here)
)
from quantmint.formats.hf import build_skeleton, model_class, staged_directory
from quantmint.formats.safetensors_io import INDEX_NAME, ShardWriter, TensorSpec, plan_shards, shard_names

__all__ = [
    "CALIBRATION_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "QUANT_METHOD",
    "CheckpointManifest",
    "QuantizationConfigBlock",
    "UncoveredFilesWarning",
    "load_quantized",
    "save_quantized",
    "verify_checkpoint",
]

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
    """Write one shard, fetching each tensor only when its turn comes; returns its manifest entry.
    A scale that loading would refuse (NaN, inf, <= 0) is refused here, before anything is renamed."""
    writer = ShardWriter(path, specs, SHARD_METADATA)
    try:
        for spec in specs:
            tensor = fetch(spec.name)
            if spec.name.endswith("_scale"):
                _check_values(spec.name, tensor, path, "the model being saved holds it; it would not load")
            writer.write(spec.name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# Writes every planned shard into a directory: [(file name, specs)] -> {file name: manifest entry}.
ShardsWriter = Callable[[Path, list[tuple[str, list[TensorSpec]]]], dict[str, dict[str, Any]]]


def quantization_config_block(model: nn.Module) -> QuantizationConfigBlock:
    """The `quantization_config` entry of config.json for a converted model."""
    state = quant_state(model)
    assert state is not None
    provider = registry.family_distribution(state.family)  # None: registered in-process, nothing recorded
    return QuantizationConfigBlock(
        quant_method=QUANT_METHOD,
        format_version=FORMAT_VERSION,
        scheme=state.config.scheme_name,
        family=state.family,
        family_provider=None
        if provider is None
        else FamilyProvider(distribution=provider[0], version=provider[1]),
        config=state.config.with_updates(mode="deploy"),
        modules=dict(state.modules),
        kv_cache_modules=list(state.kv_modules),
        rotated_modules=list(state.rotated),
    )


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
    of core (`quantmint.algorithms.streaming`), or, with `write_shards`, by the caller (streaming RTN)."""
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
    config_dict["quantization_config"] = quantization_config_block(model).to_json_dict()
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
    state = quant_state(model)
    if state is not None and state.calibration:
        (tmp / CALIBRATION_NAME).write_text(json.dumps(state.calibration, indent=1) + "\n")
    # Written last: it covers every other file (`files`: config.json, the index, tokenizer, ...) but the
    # calibration report, whose timings differ from run to run (the manifest stays deterministic).
    files = {
        item.name: {"sha256": _sha256(item), "bytes": item.stat().st_size}
        for item in sorted(tmp.iterdir())
        if item.is_file()
        and item.name not in shard_info
        and item.name not in (MANIFEST_NAME, CALIBRATION_NAME)
    }
    manifest = CheckpointManifest(
        quant_method=QUANT_METHOD,
        format_version=FORMAT_VERSION,
        shards=shard_info,
        files=files,
        aliases=aliases,
    )
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json_dict(), indent=2) + "\n")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# --- loading --------------------------------------------------------------------------------------
def _mismatch_cause(block: QuantizationConfigBlock) -> str:
    """Why the installed family may select other modules than a checkpoint lists: another version (or
    package) of the family than the one it recorded, else an edited or corrupt checkpoint."""
    recorded = block.family_provider
    current = registry.family_distribution(block.family)
    if recorded is None or current is None or current == (recorded.distribution, recorded.version):
        return "the checkpoint was edited or is corrupt"
    made = f"{recorded.distribution} {recorded.version}"
    return (
        f"it was made with the family from {made} and family {block.family!r} now comes from {current[0]} "
        f"{current[1]}, whose declaration selects other modules: pip install "
        f"'{recorded.distribution}=={recorded.version}', or re-quantize with the installed one (or the "
        "checkpoint was edited)"
    )


class UncoveredFilesWarning(UserWarning):
    """The checkpoint's manifest predates `files`: its config.json is not covered by a sha256."""


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_quantization_config(path: str | os.PathLike[str]) -> QuantizationConfigBlock:
    """config.json's `quantization_config` block of a quantmint checkpoint, parsed by its schema (one-line
    `CheckpointError` naming the field otherwise)."""
    return QuantizationConfigBlock.from_config_json(path)


def _read_manifest(path: Path) -> CheckpointManifest:
    """The checkpoint's manifest, parsed by its schema: `shards` and `files` map plain file names to
    {sha256, bytes}; `files` is None in a manifest written before it existed."""
    manifest_file = path / MANIFEST_NAME
    if manifest_file.is_symlink():
        raise CheckpointError(f"{manifest_file} is a symbolic link; a checkpoint's manifest must be a file")
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_NAME}: the checkpoint is incomplete; re-quantize it")
    try:
        raw = json.loads(manifest_file.read_text())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise CheckpointError(f"{manifest_file} is not valid JSON: {_one_line(exc)}") from None
    return CheckpointManifest.from_json(raw, manifest_file)


def _check_file(path: Path, name: str, info: FileEntry, verify: bool, what: str) -> None:
    file = path / name
    if file.is_symlink():
        raise CheckpointError(
            f"{what} {file} listed in {MANIFEST_NAME} is a symbolic link; a checkpoint's files must be "
            "regular files inside it: copy the checkpoint with its files, not links"
        )
    if not file.is_file():
        raise CheckpointError(f"{what} {file} listed in {MANIFEST_NAME} is missing")
    size = file.stat().st_size
    if size != info.bytes:
        raise CheckpointError(
            f"{what} {file} has {size} bytes, the manifest says {info.bytes}: the file is truncated "
            "or was replaced; re-quantize or copy the checkpoint again"
        )
    if verify and _sha256(file) != info.sha256:
        raise CheckpointError(
            f"{what} {file} fails its sha256 check: the file is corrupt or was edited; copy it again"
        )


def _check_files(path: Path, manifest: CheckpointManifest, verify: bool) -> None:
    """Sizes and sha256 of the shards (sha256 only with `verify`) and of the files the manifest covers
    (always: they are small); no other safetensors shard or index may lie in the directory, since
    vLLM would read it."""
    files = manifest.files
    if files is None:
        warnings.warn(
            f"{path}: its manifest was written by an earlier quantmint and does not cover config.json; "
            "it is loaded without that check (save it again with this quantmint to cover it)",
            UncoveredFilesWarning,
            stacklevel=3,
        )
    else:
        for name, info in files.items():
            _check_file(path, name, info, True, "file")
    for item in path.iterdir():
        stray_shard = item.name.endswith(".safetensors") and item.name not in manifest.shards
        stray_index = files is not None and item.name.endswith(".index.json") and item.name not in files
        if stray_shard or stray_index:
            raise CheckpointError(
                f"{item} is not listed in {MANIFEST_NAME}, and a server would read it: remove it or copy "
                "the checkpoint again"
            )
    for name, info in manifest.shards.items():
        _check_file(path, name, info, verify, "shard")


def _check_values(
    name: str,
    tensor: torch.Tensor,
    file: Path,
    why: str = "the checkpoint is corrupt or was edited",
    zero_points: bool = False,
) -> None:
    """Refuse values quantmint never writes: non-finite floats, scales <= 0, int8 weight code -128
    and 4-bit code -8 (its symmetric grids are [-127, 127] and [-7, 7]). With `zero_points` (asymmetric
    4-bit weights, codes on [0, 15]) every nibble of `weight_packed` is a valid code."""
    if tensor.numel() == 0:
        return
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"tensor {name!r} in {file} holds NaN or inf values: {why}")
        if name.endswith("_scale") and not bool((tensor > 0).all()):
            raise CheckpointError(
                f"scale tensor {name!r} in {file} holds zero or negative values; quantmint scales are "
                f"positive: {why}"
            )
    elif tensor.dtype == torch.int8 and name.endswith(".weight"):
        if int(tensor.min()) < -127:
            raise CheckpointError(
                f"int8 weight {name!r} in {file} holds -128, outside the symmetric range [-127, 127] "
                f"quantmint writes: {why}"
            )
    elif tensor.dtype == torch.int32 and name.endswith(".weight_packed") and not zero_points:
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        if bool((((tensor.unsqueeze(-1) >> shifts) & 0xF) == 0).any()):
            raise CheckpointError(
                f"4-bit weight {name!r} in {file} holds the code -8, outside the symmetric range [-7, 7] "
                f"quantmint writes: {why}"
            )


def _iter_tensors(
    path: Path, manifest: CheckpointManifest, zero_points: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the shards, one at a time, with its values checked (`_check_values`;
    `zero_points`: the checkpoint's 4-bit weights are asymmetric)."""
    seen: set[str] = set()
    for shard in manifest.shards:
        file = path / shard
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in seen:
                        raise CheckpointError(f"tensor {key!r} appears in more than one shard ({file})")
                    seen.add(key)
                    tensor = f.get_tensor(key)
                    _check_values(key, tensor, file, zero_points=zero_points)
                    yield key, tensor
        except (CheckpointError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # SafetensorError, and the Rust panics of malformed headers
            raise CheckpointError(
                f"shard {file} is not a readable safetensors file: {_one_line(exc)}"
            ) from None


def _read_shards(
    path: Path, manifest: CheckpointManifest, verify: bool, zero_points: bool = False
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint whose manifest `_read_manifest` read: files checked first."""
    _check_files(path, manifest, verify)
    return dict(_iter_tensors(path, manifest, zero_points))


def verify_checkpoint(
    path: str | os.PathLike[str], verify: bool = True, read_tensors: bool = True
) -> tuple[QuantizationConfigBlock, CheckpointManifest]:
    """Check a quantmint checkpoint without building its model; returns its parsed quantization_config
    and manifest (`quantmint.formats.checkpoint_format`).

    Checked, each refused with a one-line `CheckpointError`: the manifest's structure and file names
    (plain names inside the directory, no symbolic links); config.json and the other files it covers
    (sha256); each shard's size and, with `verify`, sha256; no unlisted shard or index; config.json's
    `quantization_config` against its schema; with `read_tensors`, every tensor's header and values
    (finite floats, positive scales, int8 codes in [-127, 127], 4-bit codes in [-7, 7] unless
    asymmetric). `load_quantized` and `quantmint serve` both go through here.
    """
    path = Path(path)
    manifest_file = path / MANIFEST_NAME
    manifest = None
    if manifest_file.exists() or manifest_file.is_symlink():
        manifest = _read_manifest(path)
        _check_files(path, manifest, verify)  # config.json's sha256 before reading it
    block = read_quantization_config(path)
    if manifest is None:
        manifest = _read_manifest(path)  # says that there is none
    if read_tensors:
        for _ in _iter_tensors(path, manifest, not block.config.weights.symmetric):
            pass
    return block, manifest


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
        if name.endswith(".weight_shape") and not torch.equal(got, want):
            raise CheckpointError(
                f"tensor {name!r} in {path} says {got.tolist()}, the model's layer is {want.tolist()}: "
                "the checkpoint is corrupt or was edited"
            )


def _build_error(path: Path, what: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}/config.json {what}: {_one_line(exc)}; the checkpoint was edited or is corrupt"
    )


def load_quantized(
    path: str | os.PathLike[str], verify: bool = True, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a quantized model from a quantmint checkpoint (deploy mode).

    Args:
        path: a directory written by `save_quantized`.
        verify: check every shard's sha256 against the manifest (reads each file once more).
            config.json and the other small files the manifest covers are always checked.
        device: where to put the model.
    Returns:
        The model in eval mode, with real int8 layers and its `QuantState`.
    Raises:
        CheckpointError: with one line naming the file or tensor, for anything `verify_checkpoint`
            refuses and for a config.json that does not describe the shards' model.
    """
    path = Path(path)
    block, manifest = verify_checkpoint(path, verify, read_tensors=False)
    config = read_model_config(path)
    model_cls = model_class(config.architectures, path, CheckpointError)
    try:
        model = build_skeleton(model_cls, config, checkpoint_dtype(path, config))
    except Exception as exc:
        raise _build_error(path, f"does not describe a model {model_cls.__name__} can build", exc) from None
    convert_skeleton(model, block, path)
    load_tensors(model, block, manifest, path)
    return model.to(device)


def read_model_config(path: Path) -> Any:
    """The checkpoint's transformers config, without its `quantization_config` (quantmint reads that
    block itself), with `architectures` checked to be a list of class names."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises several types for a bad config
        raise CheckpointError(
            f"{path}/config.json cannot be read by transformers: {_one_line(exc)}"
        ) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not _string_list(getattr(config, "architectures", None)):
        raise CheckpointError(f"{path}/config.json: `architectures` must be a list of class names")
    return config


def checkpoint_dtype(path: Path, config: Any) -> torch.dtype:
    """The float dtype the checkpoint was saved in (config.json's `dtype`): the one it loads in."""
    dtype = getattr(torch, str(config.to_dict().get("dtype") or "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(
            f"{path}/config.json: `dtype` {config.to_dict().get('dtype')!r} is not a float dtype"
        )
    return dtype


def convert_skeleton(model: nn.Module, block: QuantizationConfigBlock, path: Path) -> None:
    """Give a float skeleton of the checkpoint's model the checkpoint's empty int8 cells (deploy mode),
    and refuse the checkpoint unless they are exactly the modules, kv-cache modules and rotated modules
    its `quantization_config` lists."""
    saved_modules = dict(block.modules)
    try:
        ptq = PTQ(block.config.with_updates(mode="deploy"), family=block.family)
        ptq.apply(model, schemes=saved_modules)
    except QuantmintError as exc:
        raise CheckpointError(f"{path}: {_one_line(exc)}") from None
    except Exception as exc:
        raise _build_error(path, "does not describe the quantized model", exc) from None
    state = quant_state(model)
    if list(state.kv_modules) != block.kv_cache_modules:
        raise CheckpointError(
            f"{path}: the kv-cache modules listed in config.json do not match the model's attention modules; "
            f"{_mismatch_cause(block)}"
        )
    if state.modules != saved_modules:
        built = set(state.modules)
        raise CheckpointError(
            f"{path}: the quantized modules listed in config.json do not match what its config selects in "
            f"{type(model).__name__} (only in checkpoint: {sorted(set(saved_modules) - built)[:3]}, only "
            f"selected: {sorted(built - set(saved_modules))[:3]}); {_mismatch_cause(block)}"
        )
    if sorted(state.rotated) != sorted(block.rotated_modules):
        raise CheckpointError(
            f"{path}: the rotated modules listed in config.json ({len(block.rotated_modules)}) do not "
            f"match what its config (algorithm_args.hadamard) rotates ({len(state.rotated)}); "
            f"{_mismatch_cause(block)}"
        )


def load_tensors(
    model: nn.Module, block: QuantizationConfigBlock, manifest: CheckpointManifest, path: Path
) -> None:
    """Fill a converted skeleton (`convert_skeleton`) with the shards' tensors, each value checked, every
    tensor of the model present with its shape and dtype, nothing else; the model ends in eval mode
    without gradients."""
    loaded = dict(_iter_tensors(path, manifest, not block.config.weights.symmetric))
    state_dict = model.state_dict()
    for alias, source in manifest.aliases.items():
        if alias not in state_dict or source not in loaded or alias in loaded:
            raise CheckpointError(
                f"{path}/{MANIFEST_NAME}: alias {alias!r} -> {source!r} does not name a tied tensor of the "
                "model and a tensor of the shards; the manifest was edited"
            )
        loaded[alias] = loaded[source]
    _check_tensors(loaded, state_dict, path)
    model.load_state_dict(loaded, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    getattr(model, STATE_ATTR).config = block.config
