"""What a quantmint checkpoint holds, read from its headers without loading any tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from quantmint.errors import CheckpointError
from quantmint.formats.checkpoint import _read_manifest, read_quantization_config
from quantmint.formats.checkpoint_format import CheckpointManifest

__all__ = ["checkpoint_summary"]

_DTYPE_BYTES = {"I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8, "BOOL": 1}
_BF16 = 2


def _tensor_headers(path: Path, shards: list[str]) -> dict[str, tuple[str, list[int]]]:
    headers = {}
    for shard in shards:
        if (path / shard).is_symlink():
            raise CheckpointError(
                f"shard {path / shard} is a symbolic link; a checkpoint's files must be files"
            )
        try:
            with safe_open(str(path / shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    piece = f.get_slice(key)
                    headers[key] = (piece.get_dtype(), list(piece.get_shape()))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # SafetensorError, a missing file, the Rust panic of a bad header
            raise CheckpointError(f"cannot read {path / shard}: {' '.join(str(exc).split())[:300]}") from None
    return headers


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _DTYPE_BYTES.get(dtype, 4)


def _packed_weight_shape(
    path: Path, manifest: CheckpointManifest, module: str, packed: list[int]
) -> list[int]:
    """[out, in] of a packed 4-bit weight, read from its `weight_shape` tensor."""
    name = f"{module}.weight_shape"
    for shard in manifest.shards:
        with safe_open(str(path / shard), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118
                shape = f.get_tensor(name).tolist()
                if isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape):
                    return shape
                raise CheckpointError(
                    f"tensor {name!r} in {path / shard} is not an [out, in] pair: {shape!r:.80}"
                )
    return [packed[0], packed[1] * 8]


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """Scheme and bytes of every quantized layer, and of the whole checkpoint, vs bf16.

    `bytes_bf16` is what the same tensors take in bfloat16 (the usual serving dtype), counting an int8
    weight (int8, or 4-bit packed in int32) as a bf16 weight of the same shape and its scales (and zero
    points) as nothing. A layer's `weight` reads `int4[out, in]`, or `uint4+zp[out, in]` for asymmetric
    4-bit weights, whose `zero_points` is true.
    """
    path = Path(path)
    block = read_quantization_config(path)  # parsed by its schema: one-line CheckpointErrors
    manifest = _read_manifest(path)  # likewise: structure and plain shard names checked
    headers = _tensor_headers(path, list(manifest.shards))
    layers = []
    quantized_tensors: set[str] = set()
    for module, scheme in block.modules.items():
        names = [n for n in headers if n.startswith(module + ".")]
        quantized_tensors.update(names)
        after = sum(_nbytes(*headers[n]) for n in names)
        weight_dtype, weight_shape = headers.get(f"{module}.weight", ("?", []))
        if f"{module}.weight_packed" in headers:  # 4-bit: eight values per int32
            packed_shape = headers[f"{module}.weight_packed"][1]
            # Asymmetric: unsigned codes [0, 15] with a zero point per group (`weight_zero_point`).
            weight_dtype = "uint4+zp" if f"{module}.weight_zero_point" in headers else "int4"
            weight_shape = _packed_weight_shape(path, manifest, module, packed_shape)
        before = _nbytes("BF16", weight_shape) + (
            _nbytes("BF16", headers[f"{module}.bias"][1]) if f"{module}.bias" in headers else 0
        )
        layers.append(
            {
                "module": module,
                "scheme": scheme,
                "weight": f"{weight_dtype.lower()}{weight_shape}",
                "zero_points": f"{module}.weight_zero_point" in headers,
                "bytes": after,
                "bytes_bf16": before,
            }
        )
    linear_after = sum(layer["bytes"] for layer in layers)
    linear_before = sum(layer["bytes_bf16"] for layer in layers)
    other_bytes = sum(_nbytes(*headers[n]) for n in headers if n not in quantized_tensors)
    other_bf16 = sum(
        _nbytes("BF16", shape) if dtype in ("F32", "F16", "BF16") else _nbytes(dtype, shape)
        for n, (dtype, shape) in headers.items()
        if n not in quantized_tensors
    )
    files_bytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {
        "path": str(path),
        "scheme": block.scheme,
        "family": block.family,
        "quantized_layers": len(layers),
        "quantized_linear_bytes": linear_after,
        "quantized_linear_bytes_bf16": linear_before,
        "quantized_linear_ratio_vs_bf16": round(linear_after / linear_before, 5) if linear_before else None,
        "other_tensor_bytes": other_bytes,
        "tensor_bytes": linear_after + other_bytes,
        "tensor_bytes_bf16": linear_before + other_bf16,
        "checkpoint_files_bytes": files_bytes,
        "tied_aliases": dict(manifest.aliases),
        "layers": layers,
    }
