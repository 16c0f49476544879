"""The native GPTQ block kernel (`csrc/gptq.c`, built by `native` without floating-point contraction)
called through ctypes by `quantmint.algorithms.gptq.gptq_quantize`, which runs its torch loop wherever
this returns False. Both give the same integers (tested against each other)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from quantmint.numerics import native, quant_math
from quantmint.numerics.native_rtn import _split_rows

__all__ = ["gptq_block"]

# -ffp-contract=off: a product then a difference, each rounded, as the torch loop computes them.
_FLAGS = ("-ffp-contract=off",)


def _fn() -> Callable[..., None] | None:
    lib = native.library("gptq", flags=_FLAGS)
    if lib is None:
        return None
    fn = lib.qm_gptq_block
    if fn.argtypes is None:
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        fn.argtypes = [
            ptr,
            i64,
            ptr,
            i64,
            ptr,
            i64,
            ptr,
            i64,
            ptr,
            i64,
            ptr,
            i64,
            i64,
            i64,
            i64,
            i64,
            f32,
            f32,
        ]
        fn.restype = None
    return fn


def _float_rows(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)


def gptq_block(
    w: torch.Tensor,
    hinv: torch.Tensor,
    col_scale: torch.Tensor,
    q: torch.Tensor,
    err: torch.Tensor,
    first: int,
    group: int,
    qmax: int,
    col_zero: torch.Tensor | None = None,
) -> bool:
    """GPTQ's column loop on the block `w` [rows, n] (a view, updated in place) with the block `hinv`
    [n, n] of the inverse Hessian's upper Cholesky factor: writes the integers (as floats) to `q` and the
    scaled errors to `err` (both [rows, n]); with `group` > 0 (dynamic groups, each inside the block) also
    each group's scale to `col_scale` [rows, n] when the loop reaches column `first + i` with
    `(first + i) % group == 0`. With `col_zero` [rows, n] (float32 zero points, asymmetric weights on
    the unsigned grid [0, qmax]), the zero points are read, and written with the dynamic scales, like
    them. Returns False, touching nothing, where the kernel cannot run (no built kernel, tensors not
    float32 rows on the CPU)."""
    rows, n = w.shape
    zeros = () if col_zero is None else (col_zero,)
    if not _float_rows(w, hinv, col_scale, q, err, *zeros) or rows == 0 or n == 0:
        return False
    fn = _fn()
    if fn is None:
        return False

    def run(lo: int, hi: int) -> int:
        fn(
            w[lo].data_ptr(), w.stride(0), hinv.data_ptr(), hinv.stride(0), col_scale[lo].data_ptr(),
            col_scale.stride(0), None if col_zero is None else col_zero[lo].data_ptr(),
            0 if col_zero is None else col_zero.stride(0), q[lo].data_ptr(), q.stride(0),
            err[lo].data_ptr(), err.stride(0),
            hi - lo, n, group, first, float(qmax), quant_math._MIN_SCALE,
        )  # fmt: skip
        return 0

    _split_rows(run, rows, rows * n * n // 2)
    return True
