"""The native per-channel RTN kernel (`csrc/rtn.c`, built by `native`) called through ctypes: on a weight
in memory (`rtn_channel`, the fast path of `quant_math.quantize_weight`) and on a weight read from a
safetensors file a chunk of rows at a time (`quantize_weight_from_file`, for streaming RTN).

Both give exactly the integers and scales of the torch passes in `quant_math` (tested), and return None
wherever they do not apply, so that the caller runs those instead.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from quantmint.numerics import native, quant_math

__all__ = ["quantize_weight_from_file", "rtn_channel"]

_NATIVE_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
# Below this many elements a call is not split over threads (each part would be too small to pay).
_NATIVE_SPLIT_ELEMENTS = 1 << 20
_NATIVE_POOL: list[ThreadPoolExecutor] = []


def _native_rtn_fn(dtype: torch.dtype, from_file: bool = False) -> Callable[..., int] | None:
    lib = native.library("rtn")
    if lib is None:
        return None
    fn = getattr(lib, f"qm_rtn_channel_{'file_' if from_file else ''}{_NATIVE_DTYPES[dtype]}")
    if fn.argtypes is None:
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        if from_file:
            fn.argtypes = [ctypes.c_int, i64, i64, i64, f32, f32, ptr, ptr, ptr, i64]
        else:
            fn.argtypes = [ptr, i64, i64, i64, f32, f32, ptr, ptr]
        fn.restype = i64
    return fn


def _split_rows(run: Callable[[int, int], int], rows: int, numel: int) -> int:
    """`run(lo, hi)` over all rows, split among torch's thread count when the weight is large enough;
    returns the largest status (0 when every part succeeded)."""
    parts = min(torch.get_num_threads(), max(1, numel // _NATIVE_SPLIT_ELEMENTS), rows)
    if parts <= 1:
        return run(0, rows)
    if not _NATIVE_POOL:
        _NATIVE_POOL.append(ThreadPoolExecutor(thread_name_prefix="quantmint-rtn"))
    bounds = [rows * i // parts for i in range(parts + 1)]
    return max(_NATIVE_POOL[0].map(run, bounds[:-1], bounds[1:]), key=abs)


def rtn_channel(weight: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`csrc/rtn.c` on a CPU weight [out, in] (rows may be strided), or None where it does not apply:
    another device or dtype, no built kernel, or a row holding inf or NaN (torch decides those)."""
    if (
        weight.dim() != 2
        or weight.device.type != "cpu"
        or weight.dtype not in _NATIVE_DTYPES
        or weight.numel() == 0
        or (weight.shape[1] > 1 and weight.stride(1) != 1)
    ):
        return None
    fn = _native_rtn_fn(weight.dtype)
    if fn is None:
        return None
    weight = weight.detach()
    rows, cols = weight.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    scale = torch.empty((rows, 1), dtype=torch.float32)

    def run(lo: int, hi: int) -> int:
        return fn(
            weight[lo].data_ptr(), hi - lo, cols, weight.stride(0), float(qmax), quant_math._MIN_SCALE,
            q[lo].data_ptr(), scale[lo].data_ptr(),
        )  # fmt: skip

    return None if _split_rows(run, rows, weight.numel()) else (q, scale)


# Rows are read this many bytes at a time: the chunk is rounded while it is still in the L2 cache.
_FILE_CHUNK = 512 << 10


def quantize_weight_from_file(
    fd: int,
    offset: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    strategy: str,
    num_bits: int = 8,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`quantize_weight` of a weight [out, in] stored contiguously at byte `offset` of the open file
    `fd` (a safetensors tensor), read and rounded a chunk of rows at a time by the native kernel.

    Streaming RTN uses it: reading a large weight whole and rounding it afterwards crosses memory twice
    more than rounding each chunk as it arrives (bf16 weights of an 8 GB checkpoint from the page cache,
    one core: 1.7-2.3 GB/s read-then-round, 3.0 GB/s this way, 4.7 GB/s into reused `out`). Returns the same
    (q, scale) as `quantize_weight` on the weight read into memory (tested), or None where that is the
    only way: no native kernel, a strategy other than per-channel, a dtype it does not take, a row holding
    inf or NaN, or a file that ends early (reading it the ordinary way then says what is wrong).
    `out` (int8, contiguous, of `shape`) receives q when given.
    """
    if strategy != "channel" or num_bits > 8 or dtype not in _NATIVE_DTYPES or len(shape) != 2 or 0 in shape:
        return None
    fn = _native_rtn_fn(dtype, from_file=True)
    if fn is None:
        return None
    rows, cols = shape
    row_bytes = cols * dtype.itemsize
    if out is not None and (out.dtype != torch.int8 or tuple(out.shape) != shape or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous int8 tensor of shape {list(shape)}")
    q = torch.empty((rows, cols), dtype=torch.int8) if out is None else out
    scale = torch.empty((rows, 1), dtype=torch.float32)
    qmax = float(2 ** (num_bits - 1) - 1)

    def run(lo: int, hi: int) -> int:
        buffer = torch.empty(max(_FILE_CHUNK, row_bytes), dtype=torch.uint8)
        return fn(
            fd, offset + lo * row_bytes, hi - lo, cols, qmax, quant_math._MIN_SCALE,
            q[lo].data_ptr(), scale[lo].data_ptr(), buffer.data_ptr(), buffer.numel(),
        )  # fmt: skip

    return None if _split_rows(run, rows, rows * cols) else (q, scale)
