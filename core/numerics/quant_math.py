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
| group       | runs of `group_size` cols | [rows, ceil(cols / group_size)] | 4-bit weights |

Per-channel and per-token are the same reduction (over the last dim); they differ in what the rows are.
A weight's scale is always held 2-D as [rows or 1, groups]: per channel is one group per row, per tensor
[1, 1], so `expand_weight_scale` and `dequantize_weight` serve every granularity. Group j covers columns
[j * group_size, (j + 1) * group_size); when `cols` is not a multiple of `group_size` the last group is
shorter, so the group size cannot be read off the scale's shape and is always passed.

4-bit weights are packed eight to an int32 (`pack_int4`), low nibble first, each stored as q + 8 (the
`uint4b8` layout of compressed-tensors' `pack-quantized` format).

Asymmetric 4-bit weights (`quantize_weight_asymmetric`) use the unsigned grid [0, 15] with a zero point
per scale group, also in [0, 15]: w ≈ (q - zero_point) * scale, the GPTQ / compressed-tensors `uint4`
convention. The range of each group is widened to hold 0 (`qparams_asymmetric`), so 0 is exact. Their
nibbles are q itself (`pack_uint4`), and the zero points [out, groups] are packed along the output
dimension (`pack_zero_points`: [ceil(out / 8), groups] int32, compressed-tensors' `weight_zero_point`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

__all__ = [
    "Granularity",
    "absmax",
    "dequantize",
    "dequantize_weight",
    "expand_weight_scale",
    "fake_quantize",
    "int_range",
    "minmax",
    "pack_int4",
    "pack_uint4",
    "pack_zero_points",
    "qparams_asymmetric",
    "qparams_from_absmax",
    "qparams_from_minmax",
    "quantize",
    "quantize_activation",
    "quantize_symmetric",
    "quantize_weight",
    "quantize_weight_asymmetric",
    "row_absmax",
    "sqnr_db",
    "uint_range",
    "unpack_int4",
    "unpack_uint4",
    "unpack_zero_points",
    "weight_absmax",
    "weight_minmax",
]

Granularity = Literal["channel", "token", "tensor"]

# Smallest scale: keeps all-zero rows from dividing by zero while mapping them to q = 0.
_MIN_SCALE = 1e-12


def int_range(num_bits: int = 8, symmetric: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of the signed integer grid: (-127, 127) symmetric, (-128, 127) affine for 8 bits."""
    qmax = 2 ** (num_bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def uint_range(num_bits: int = 4) -> tuple[int, int]:
    """(qmin, qmax) of the unsigned grid of asymmetric weights: (0, 15) for 4 bits."""
    return 0, 2**num_bits - 1


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


def row_absmax(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """max |x| over the last dimension (what `torch.linalg.vector_norm(x, inf, dim=-1)` computes, NaN
    and inf alike), as the larger of the row's max and its negated min: two vectorised reductions,
    several times faster on CPU than the inf-norm kernel (the last `abs_` makes an all-zero row +0.0)."""
    return torch.maximum(x.amax(dim=-1, keepdim=keepdim), x.amin(dim=-1, keepdim=keepdim).neg_()).abs_()


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


# Large 2-D tensors are processed this many elements of rows at a time: each chunk's float32
# temporaries stay in cache, which makes weight quantization several times faster than whole-tensor
# passes (see benchmarks/streaming_rtn.py). Elementwise results do not depend on the chunking.
_CHUNK_ELEMENTS = 1 << 19


def _by_rows(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    per_row: tuple[torch.Tensor | None, ...],
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """fn(x[rows], *(t[rows] for t in per_row)) written chunk by chunk into one `dtype` tensor, or None
    when x is small, not 2-D or needs gradients (then the caller runs fn once)."""
    if x.dim() != 2 or x.numel() <= _CHUNK_ELEMENTS or x.requires_grad:
        return None
    rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for i in range(0, x.shape[0], rows):
        parts = [t if t is None or t.dim() < 2 or t.shape[0] == 1 else t[i : i + rows] for t in per_row]
        out[i : i + rows] = fn(x[i : i + rows], *parts)
    return out


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    num_bits: int = 8,
    dtype: torch.dtype = torch.int8,
    unsigned: bool = False,
) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero_point, qmin, qmax) as `dtype` (int8); `scale` broadcasts to x.
    The grid is `int_range`'s, or with `unsigned` `uint_range`'s (asymmetric weights, [0, 15])."""

    def run(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        return _quantize(x, scale, zero_point, num_bits, dtype, unsigned)

    chunked = _by_rows(run, x, (scale, zero_point), dtype)
    return run(x, scale, zero_point) if chunked is None else chunked


def _quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    num_bits: int,
    dtype: torch.dtype,
    unsigned: bool = False,
) -> torch.Tensor:
    qmin, qmax = uint_range(num_bits) if unsigned else int_range(num_bits, symmetric=zero_point is None)
    scale = scale.float()
    if torch.broadcast_shapes(x.shape, scale.shape) == x.shape and not x.requires_grad:
        if x.dtype in (torch.bfloat16, torch.float16, torch.float32):
            q = torch.div(x, scale).round_()  # promotes to float32 in the same pass: one temporary
        else:
            q = x.to(torch.float32, copy=True).div_(scale).round_()
    else:
        q = torch.round(x.float() / scale)
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

    def run(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        return _dequantize(q, scale, zero_point, dtype)

    chunked = _by_rows(run, q, (scale, zero_point), dtype)
    return run(q, scale, zero_point) if chunked is None else chunked


def _dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    x = q.to(torch.float32, copy=True)
    if zero_point is not None:
        x = x - zero_point.float()
    if torch.broadcast_shapes(x.shape, scale.shape) == x.shape:
        return x.mul_(scale.float()).to(dtype)
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


def quantize_activation(
    x: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int8,
    ste: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round activations x [..., in] onto the symmetric int8 grid [-127, 127]: per token when
    `input_scale` is None (dynamic; scale = absmax of the row / 127, [..., 1]), else with the static
    per-tensor scale (a 1-element float32 tensor, returned as [1, ..., 1]).

    Returns (q as `dtype`, scale float32). The one activation rounding of quantmint: the int8 cells pass
    int8, the fake-quant layers float32 (then `q * scale` is the activation they compute with). With
    `ste`, gradients pass straight through the rounding to x and to a static `input_scale` (block PTQ
    learns that scale through it); a dynamic scale is a constant of the graph.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    if input_scale is None:
        absmax = row_absmax(xf.detach())
        scale = qparams_from_absmax(absmax)
    else:
        scale = input_scale.reshape((1,) * xf.dim())
    y = xf / scale
    if ste:
        return torch.clamp(y + (torch.round(y) - y).detach(), -127, 127).to(dtype), scale
    return y.round_().clamp_(-127, 127).to(dtype), scale


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖ref‖² / ‖ref − approx‖²) in dB (inf if equal)."""
    ref = reference.detach().double()
    noise = (ref - approximation.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


# --- weights: per channel, per tensor or per group, any bit width --------------------------------
def weight_absmax(weight: torch.Tensor, strategy: str, group_size: int | None = None) -> torch.Tensor:
    """max |W| per scale group of a weight [out, in]: float32 [out, 1] (channel), [1, 1] (tensor) or
    [out, ceil(in / group_size)] (group)."""
    weight = weight.detach()
    if strategy == "tensor":
        if weight.dim() == 2 and weight.numel() > _CHUNK_ELEMENTS:
            rows = _by_rows(lambda w: _weight_absmax(w, "channel", None), weight, (), torch.float32)
            assert rows is not None
            return rows.amax().reshape(1, 1)
        return _weight_absmax(weight, strategy, group_size)
    if strategy == "group" and (not group_size or group_size < 1):
        raise ValueError(f"strategy 'group' needs a positive group_size, got {group_size!r}")
    if strategy in ("channel", "group") and weight.dim() == 2 and weight.numel() > _CHUNK_ELEMENTS:
        rows = max(1, _CHUNK_ELEMENTS // weight.shape[1])
        return torch.cat(
            [
                _weight_absmax(weight[i : i + rows], strategy, group_size)
                for i in range(0, weight.shape[0], rows)
            ]
        )
    return _weight_absmax(weight, strategy, group_size)


def _weight_absmax(weight: torch.Tensor, strategy: str, group_size: int | None) -> torch.Tensor:
    # |w| and max are exact in any float dtype: reduce in the weight's own dtype, then widen.
    if strategy == "channel" and weight.is_floating_point() and weight.numel():
        low, high = torch.aminmax(weight, dim=1, keepdim=True)  # one pass, no |w| temporary
        return torch.maximum(low.neg(), high).float()
    w = weight.abs() if weight.is_floating_point() else weight.float().abs()
    if strategy == "tensor":
        return w.amax().reshape(1, 1).float()
    if strategy == "channel":
        return w.amax(dim=1, keepdim=True).float()
    if strategy == "group":
        if not group_size or group_size < 1:
            raise ValueError(f"strategy 'group' needs a positive group_size, got {group_size!r}")
        out, cols = w.shape
        groups = -(-cols // group_size)
        w = torch.nn.functional.pad(w, (0, groups * group_size - cols))
        return w.reshape(out, groups, group_size).amax(dim=2).float()
    raise ValueError(f"unknown weight strategy {strategy!r}; expected 'channel', 'tensor' or 'group'")


def expand_weight_scale(
    scale: torch.Tensor, shape: torch.Size | tuple[int, int], group_size: int | None = None
) -> torch.Tensor:
    """A weight scale [rows or 1, groups] broadcast to one value per element of a weight `shape`;
    `group_size` is needed when there is more than one group per row."""
    out, cols = shape
    groups = scale.shape[-1]
    if groups == 1:
        return scale.reshape(-1, 1).expand(out, cols)
    if not group_size or -(-cols // group_size) != groups:
        raise ValueError(
            f"a weight scale with {groups} groups per row of {cols} columns needs its group_size "
            f"(got {group_size!r})"
        )
    return scale.repeat_interleave(group_size, dim=1)[:, :cols].expand(out, cols)


def quantize_weight(
    weight: torch.Tensor, strategy: str, num_bits: int = 8, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest of a weight [out, in] with its MinMax range per scale group.

    Returns (q int8 [out, in] in [-(2^(b-1) - 1), 2^(b-1) - 1], scale float32 as in `weight_absmax`).
    Per-channel weights on the CPU go through the native kernel `csrc/rtn.c` where it builds
    (`native_rtn.rtn_channel`: one fused pass per row, about ten times the speed of the torch passes); it
    gives the same integers and scales as the torch passes below (tested), which run everywhere else.
    """
    if strategy == "channel" and num_bits <= 8:
        from quantmint.numerics import (
            native_rtn,  # ctypes lives there; imported here, it cannot import us back first
        )

        native = native_rtn.rtn_channel(weight, 2 ** (num_bits - 1) - 1)
        if native is not None:
            return native
    scale = qparams_from_absmax(weight_absmax(weight, strategy, group_size), num_bits)
    return quantize(weight, expand_weight_scale(scale, weight.shape, group_size), num_bits=num_bits), scale


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    group_size: int | None = None,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [out, in] (any integer dtype) times its scale [rows or 1, groups], as `dtype`; with a
    `zero_point` (integers shaped like the scale), (q - zero_point) * scale."""
    zp = None if zero_point is None else expand_weight_scale(zero_point, q.shape, group_size)
    return dequantize(q, expand_weight_scale(scale.float(), q.shape, group_size), zp, dtype=dtype)


def weight_minmax(
    weight: torch.Tensor, strategy: str, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of W per scale group of a weight [out, in], each float32 shaped as `weight_absmax`'s."""
    w = weight.detach().float()
    if strategy == "tensor":
        return w.amin().reshape(1, 1), w.amax().reshape(1, 1)
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if strategy == "group":
        if not group_size or group_size < 1:
            raise ValueError(f"strategy 'group' needs a positive group_size, got {group_size!r}")
        out, cols = w.shape
        groups = -(-cols // group_size)
        # Padding with 0 changes nothing: every group's range is widened to hold 0 anyway.
        w = torch.nn.functional.pad(w, (0, groups * group_size - cols)).reshape(out, groups, group_size)
        return w.amin(dim=2), w.amax(dim=2)
    raise ValueError(f"unknown weight strategy {strategy!r}; expected 'channel', 'tensor' or 'group'")


def qparams_asymmetric(
    wmin: torch.Tensor, wmax: torch.Tensor, num_bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric weight qparams on the unsigned grid [0, 2^b - 1] from each group's range widened to
    hold 0: scale = (max(wmax, 0) - min(wmin, 0)) / qmax (float32, at least `_MIN_SCALE`) and
    zero_point = clamp(round(-min(wmin, 0) / scale), 0, qmax) (int8), both shaped like `wmin`.

    The GPTQ reference and compressed-tensors take the same range; the torch loop of
    `algorithms.gptq.gptq_quantize` and `csrc/gptq.c` compute exactly these float32 operations."""
    _, qmax = uint_range(num_bits)
    lo = wmin.float().clamp_max(0.0)
    hi = wmax.float().clamp_min(0.0)
    scale = ((hi - lo) / qmax).clamp_min(_MIN_SCALE)
    zero_point = torch.round(lo.neg() / scale).clamp_(0, qmax).to(torch.int8)
    return scale, zero_point


def quantize_weight_asymmetric(
    weight: torch.Tensor, strategy: str, num_bits: int = 4, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest of a weight [out, in] with its MinMax range per scale group.

    Returns (q int8 [out, in] in [0, 2^b - 1], scale float32 and zero_point int8 in [0, 2^b - 1], both
    shaped as `weight_absmax`'s); `dequantize_weight(q, scale, dtype, group_size, zero_point)` is the
    rounded weight."""
    scale, zero_point = qparams_asymmetric(*weight_minmax(weight, strategy, group_size), num_bits)
    q = quantize(
        weight,
        expand_weight_scale(scale, weight.shape, group_size),
        expand_weight_scale(zero_point, weight.shape, group_size),
        num_bits=num_bits,
        unsigned=True,
    )
    return q, scale, zero_point


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values q [out, in] (int8 in [-8, 7]) into int32 [out, ceil(in / 8)].

    Element j of a row goes to nibble j % 8 (low first) of word j // 8, stored as q + 8 in [0, 15].
    """
    if q.dim() != 2:
        raise ValueError(f"pack_int4 takes a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 takes values in [-8, 7]")
    return pack_uint4(q.to(torch.int16) + 8, pad=8)


def pack_uint4(q: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Pack unsigned 4-bit values q [out, in] (in [0, 15]) into int32 [out, ceil(in / 8)]: element j of
    a row in nibble j % 8 (low first) of word j // 8, padding nibbles `pad`."""
    if q.dim() != 2:
        raise ValueError(f"pack_uint4 takes a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_uint4 takes values in [0, 15]")
    out, cols = q.shape
    words = -(-cols // 8)
    u = torch.nn.functional.pad(q.to(torch.int64), (0, words * 8 - cols), value=pad)
    u = u.reshape(out, words, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (u << shifts).sum(dim=2)
    # Values above 2^31 - 1 wrap to negative int32, keeping the bit pattern.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int32 [out, words] -> int8 [out, cols] in [-8, 7]."""
    return unpack_uint4(packed, cols).sub_(8)


def unpack_uint4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_uint4`: int32 [out, words] -> int8 [out, cols] in [0, 15]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return nibbles.reshape(packed.shape[0], -1)[:, :cols].to(torch.int8)


def pack_zero_points(zero_point: torch.Tensor) -> torch.Tensor:
    """Pack zero points [out, groups] (in [0, 15]) along the output dimension into int32
    [ceil(out / 8), groups]: row r in nibble r % 8 of word r // 8 of its group's column, padding nibbles
    0 (compressed-tensors' `pack_to_int32(zp, 4, packed_dim=0)` layout of `weight_zero_point`)."""
    return pack_uint4(zero_point.T).T.contiguous()


def unpack_zero_points(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of `pack_zero_points`: int32 [ceil(rows / 8), groups] -> int8 [rows, groups] in [0, 15]."""
    return unpack_uint4(packed.T, rows).T.contiguous()
