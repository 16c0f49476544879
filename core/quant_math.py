"""Quantization math: small pure functions on tensors, no modules and no state.

Affine quantization maps a float `x` to an integer `q = clamp(round(x / scale) + zero_point, qmin, qmax)`
and back with `x̂ = (q - zero_point) * scale`. Symmetric quantization fixes `zero_point = 0` and uses the
signed range [-(2^(b-1) - 1), 2^(b-1) - 1] (for int8, [-127, 127]: dropping -128 keeps the grid symmetric,
as compressed-tensors and vLLM's int8 kernels expect).

Granularity decides which elements share one scale; for a 2-D tensor of shape [rows, cols]:

| granularity | reduced over      | scale / zero-point shape | typical use |
| ----------- | ----------------- | ------------------------ | ----------- |
| channel     | cols (dim -1)     | [rows, 1]                | weights [out, in] |
| token       | hidden (dim -1)   | [..., tokens, 1]         | activations [..., tokens, hidden] |
| tensor      | everything        | [] (a 0-d tensor)        | static activations |

Per-channel and per-token are the same reduction (over the last dim); they differ in what the rows are.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "Granularity",
    "absmax",
    "dequantize",
    "fake_quantize",
    "int_range",
    "minmax",
    "qparams_from_absmax",
    "qparams_from_minmax",
    "quantize",
    "quantize_symmetric",
    "sqnr_db",
]

Granularity = Literal["channel", "token", "tensor"]

# Smallest scale: keeps all-zero rows from dividing by zero while mapping them to q = 0.
_MIN_SCALE = 1e-12


def int_range(num_bits: int = 8, symmetric: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of the signed integer grid: (-127, 127) symmetric, (-128, 127) affine for 8 bits."""
    qmax = 2 ** (num_bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def _reduce_dims(x: torch.Tensor, granularity: Granularity) -> tuple[int, ...] | None:
    if granularity == "tensor":
        return None
    if granularity in ("channel", "token"):
        return (-1,)
    raise ValueError(f"unknown granularity {granularity!r}; expected 'channel', 'token' or 'tensor'")


def absmax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """max |x| over each group: shape [..., 1] for channel/token, [] for tensor; dtype float32."""
    dims = _reduce_dims(x, granularity)
    x = x.detach().float()
    if dims is None:
        return x.abs().amax()
    return x.abs().amax(dim=dims, keepdim=True)


def minmax(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over each group, shapes as in `absmax`; dtype float32."""
    dims = _reduce_dims(x, granularity)
    x = x.detach().float()
    if dims is None:
        return x.amin(), x.amax()
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def qparams_from_absmax(amax: torch.Tensor, num_bits: int = 8) -> torch.Tensor:
    """Symmetric scale = absmax / qmax (float32, same shape as `amax`); the zero point is 0."""
    _, qmax = int_range(num_bits, symmetric=True)
    return (amax.float() / qmax).clamp_min(_MIN_SCALE)


def qparams_from_minmax(
    xmin: torch.Tensor, xmax: torch.Tensor, num_bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine (scale float32, zero_point int32) covering [min(xmin, 0), max(xmax, 0)] exactly at 0."""
    qmin, qmax = int_range(num_bits, symmetric=False)
    lo = xmin.float().clamp_max(0.0)
    hi = xmax.float().clamp_min(0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_MIN_SCALE)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    num_bits: int = 8,
    dtype: torch.dtype = torch.int8,
) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero_point, qmin, qmax) as `dtype` (int8); `scale` broadcasts to x."""
    qmin, qmax = int_range(num_bits, symmetric=zero_point is None)
    q = torch.round(x.float() / scale.float())
    if zero_point is not None:
        q = q + zero_point
    return q.clamp_(qmin, qmax).to(dtype)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x̂ = (q - zero_point) * scale, computed in float32 and returned as `dtype`."""
    x = q.float()
    if zero_point is not None:
        x = x - zero_point.float()
    return (x * scale.float()).to(dtype)


def quantize_symmetric(
    x: torch.Tensor, granularity: Granularity, num_bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric quantization with MinMax (absmax) range.

    For a weight [out, in] with granularity 'channel': returns (q int8 [out, in], scale float32 [out, 1]).
    """
    scale = qparams_from_absmax(absmax(x, granularity), num_bits)
    return quantize(x, scale, num_bits=num_bits), scale


def fake_quantize(x: torch.Tensor, granularity: Granularity, num_bits: int = 8) -> torch.Tensor:
    """dequantize(quantize(x)): x rounded onto its int grid, same shape and dtype as x."""
    q, scale = quantize_symmetric(x, granularity, num_bits)
    return dequantize(q, scale, dtype=x.dtype)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖ref‖² / ‖ref − approx‖²) in dB (inf if equal)."""
    ref = reference.detach().double()
    noise = (ref - approximation.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
