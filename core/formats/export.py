"""Export a quantmint checkpoint to the compressed-tensors format, which plain vLLM (no plugin) and
transformers (with the `compressed-tensors` package) load with no quantmint installed.

quantmint already stores its tensors under compressed-tensors names (`weight` int8 [out, in],
`weight_scale` float32 [out, 1], `input_scale` [1]; 4-bit: `weight_packed` int32 [out, ceil(in / 8)] packed
as compressed-tensors' `pack_to_int32` packs, `weight_scale` [out, groups], `weight_shape`), so the shards
are copied unchanged (after checking their sha256 against the manifest) and only config.json's
`quantization_config` is rewritten: one config group for the W8A8 layers (`format: int-quantized`,
per-channel weights, per-token dynamic or per-tensor static activations) or for the W4A16 layers (`format:
pack-quantized`, 4-bit weights per group or channel, symmetric or with packed `weight_zero_point`), every
other linear layer in `ignore`.

Refused, with the reason: C8 (vLLM accepts only an fp8 KV-cache scheme), W8A16 layers (compressed-tensors
describes them only in its packed int32 layout, which vLLM runs on GPU kernels alone: serve the quantmint
checkpoint through the plugin instead), W4A8, 4-bit layers whose last group is shorter than group_size,
per-tensor 4-bit scales, and families whose declaration lists transposed linears
(`ServingNeeds.transposed_linears`, GPT2's Conv1D: not `Linear` to compressed-tensors, and vLLM transposes
their weights on load).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from quantmint.errors import CheckpointError, QuantmintError
from quantmint.extension import registry
from quantmint.formats.checkpoint import MANIFEST_NAME, _read_manifest, _read_shards, read_quantization_config
from quantmint.formats.checkpoint_format import QuantizationConfigBlock
from quantmint.formats.hf import build_skeleton, model_class, read_config_json, staged_directory
from quantmint.io.outdir import prepare_output

__all__ = ["EXPORT_FORMATS", "export_checkpoint"]

EXPORT_FORMATS = ("compressed-tensors",)

_INT8 = {"num_bits": 8, "type": "int", "symmetric": True}


def _linear_names(path: Path, config: dict[str, Any]) -> dict[str, int]:
    """Every `nn.Linear` of the checkpoint's architecture -> its input features, from a skeleton with its
    parameters on the meta device."""
    import transformers

    cls = model_class(config.get("architectures"), path, CheckpointError)
    hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    skeleton = build_skeleton(cls, hf_config, on_meta=True)
    modules = skeleton.named_modules()
    return {name: module.in_features for name, module in modules if isinstance(module, nn.Linear)}


def _refuse(path: Path, block: QuantizationConfigBlock) -> None:
    if block.kv_cache_modules:
        raise QuantmintError(
            f"{path} has an int8 KV cache (C8, scheme {block.scheme}): compressed-tensors can name "
            "one, but vLLM accepts only an fp8 kv_cache_scheme. Export a checkpoint quantized without C8, or "
            "serve this one with the quantmint plugin (quantmint serve)"
        )
    if block.rotated_modules:
        raise QuantmintError(
            f"{path} rotates the inputs of {len(block.rotated_modules)} layers by a Hadamard matrix "
            "(algorithm_args.hadamard), which a compressed-tensors checkpoint cannot describe. Serve it with "
            "the quantmint plugin (quantmint serve), or quantize it again with --no-hadamard "
            "(hadamard: false) to export"
        )
    try:  # the family's declaration says how engines read its layers
        transposed = registry.family_named(block.family).serving.transposed_linears
    except QuantmintError as exc:
        raise QuantmintError(f"{path}: {exc}") from None
    if transposed:
        raise QuantmintError(
            f"{path}: model family {block.family!r} declares that its linears {', '.join(transposed)} store "
            "their weight [in, out] (Conv1D-style, ServingNeeds.transposed_linears): compressed-tensors "
            "reads them as Linear and vLLM transposes them on load. Serve it with the quantmint plugin "
            "(quantmint serve)"
        )
    schemes = set(block.modules.values())
    if "w4a8" in schemes:
        raise QuantmintError(
            f"{path} has w4a8 layers (4-bit weights, int8 activations), which compressed-tensors checkpoints "
            "vLLM serves cannot hold. Export a w4a16 or w8a8 checkpoint, or run this one with quantmint's "
            "torch runtime (quantmint eval, quantmint.load_quantized)"
        )
    if "w4a16" in schemes:
        weights = block.config.weights
        if schemes != {"w4a16"}:
            raise QuantmintError(
                f"{path} mixes w4a16 layers with {', '.join(sorted(schemes - {'w4a16'}))} layers, which one "
                "compressed-tensors config group cannot describe. Serve it with the quantmint plugin "
                "(quantmint serve)"
            )
        if weights.strategy not in ("group", "channel"):
            raise QuantmintError(
                f"{path} has 4-bit weights with one scale per {weights.strategy}: compressed-tensors' "
                "pack-quantized layers that vLLM serves take a scale per channel or per group. Requantize "
                "with weights.strategy channel or group"
            )
        return
    other = sorted(s for s in schemes if s != "w8a8")
    if other:
        raise QuantmintError(
            f"{path} has {', '.join(other)} layers: compressed-tensors describes int8 weight-only layers "
            "only in its packed int32 layout, which vLLM runs on GPU kernels alone. Export a w8a8 or w4a16 "
            "checkpoint, or serve this one with the quantmint plugin (quantmint serve)"
        )
    if not block.modules:
        raise QuantmintError(f"{path} has no quantized layers to export")


def _refuse_ragged_groups(path: Path, block: QuantizationConfigBlock, linears: dict[str, int]) -> None:
    """compressed-tensors' groups (and vLLM's kernels) must tile each row: refuse a shorter last group."""
    group_size = block.config.weights.group_size
    if block.config.weights.strategy != "group" or group_size is None:
        return
    ragged = {name: linears[name] for name in block.modules if name in linears and linears[name] % group_size}
    if ragged:
        name, features = next(iter(ragged.items()))
        raise QuantmintError(
            f"{path}: {len(ragged)} w4a16 layer(s), e.g. {name} with {features} input features, end in a "
            f"group shorter than group_size {group_size} ({features % group_size} columns), which "
            "compressed-tensors' pack-quantized format and vLLM's kernels cannot describe. Requantize with a "
            "group_size that divides every layer's input features (or strategy: channel), or serve this "
            "checkpoint with the quantmint plugin (quantmint serve) or quantmint's torch runtime"
        )


def compressed_tensors_config(block: QuantizationConfigBlock, linear_names: list[str]) -> dict[str, Any]:
    """The compressed-tensors `quantization_config` equivalent to a quantmint W8A8 or W4A16 block."""
    quantized = set(block.modules)
    common = {
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "ignore": [name for name in linear_names if name not in quantized],
        "kv_cache_scheme": None,
        "producer": {"name": "quantmint", "scheme": block.scheme, "family": block.family},
    }
    if set(block.modules.values()) == {"w4a16"}:
        # quantmint's 4-bit tensors are compressed-tensors' pack-quantized ones: `weight_packed` int32
        # [out, ceil(in / 8)] (code + 8, element j in nibble j % 8 of word j // 8), `weight_scale`
        # [out, groups], `weight_shape` [2]; asymmetric ones add `weight_zero_point` int32
        # [ceil(out / 8), groups], packed as compressed-tensors packs it (`pack_to_int32(zp, 4,
        # packed_dim=0)`: zp + 8 of its signed grid, i.e. quantmint's unsigned zero point).
        weights = block.config.weights
        group = weights.strategy == "group"
        return {
            **common,
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": weights.symmetric,
                        "strategy": weights.strategy,
                        "group_size": weights.group_size if group else None,
                        "dynamic": False,
                        "observer": "minmax",
                        "actorder": None,
                    },
                    "input_activations": None,
                    "output_activations": None,
                    "format": "pack-quantized",
                }
            },
        }
    dynamic = block.config.activations.dynamic
    input_activations = {
        **_INT8,
        "strategy": "token" if dynamic else "tensor",
        "dynamic": dynamic,
        **({} if dynamic else {"observer": "minmax"}),
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**_INT8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                "input_activations": input_activations,
                "output_activations": None,
            }
        },
        "ignore": [name for name in linear_names if name not in quantized],
        "kv_cache_scheme": None,
        "producer": {"name": "quantmint", "scheme": block.scheme, "family": block.family},
    }


def export_checkpoint(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: str = "compressed-tensors",
    overwrite: bool = False,
) -> Path:
    """Write `src` (a quantmint checkpoint) to `out` in format `fmt`; returns `out`.

    The shards are verified against the manifest before anything is written; the output directory is
    staged and renamed into place, so a failure leaves nothing behind.
    """
    if fmt not in EXPORT_FORMATS:
        raise QuantmintError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    src, out = Path(src), Path(out)
    block = read_quantization_config(src)
    _refuse(src, block)
    if out.exists() and not overwrite:
        raise QuantmintError(f"output directory {out} already exists; pass overwrite=True (--overwrite)")
    prepare_output(out, [src], overwrite)
    manifest = _read_manifest(src)
    _read_shards(
        src, manifest, verify=True, zero_points=not block.config.weights.symmetric
    )  # sha256 and tensor checks: never export a damaged checkpoint
    config = read_config_json(src, CheckpointError)
    linears = _linear_names(src, config)
    _refuse_ragged_groups(src, block, linears)
    config["quantization_config"] = compressed_tensors_config(block, list(linears))
    with staged_directory(out, overwrite=overwrite, inputs=[src]) as tmp:
        for item in src.iterdir():
            if item.name in (MANIFEST_NAME, "config.json") or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
