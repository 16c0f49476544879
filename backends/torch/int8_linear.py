"""W8A8: int8 weights per output channel, int8 activations per token (dynamic) or per tensor (static),
an int8 x int8 -> int32 matmul, and the scales applied to the int32 result."""

from __future__ import annotations

import functools

import torch

from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.numerics import quant_math

__all__ = [
    "Int8Linear",
    "int8_int8_matmul",
    "int8_linear",
    "int8_matmul_path",
    "int_mm_is_exact",
    "quantize_activations",
]


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether `torch._int_mm` on this CPU accumulates int8 products exactly in int32.

    Without VNNI, x86 int8 GEMMs may add pairs of products in saturating 16-bit integers. The probe
    (every activation 127, every weight 127) saturates such a kernel: 2 * 127 * 127 > 32767.
    """
    k = 64
    a = torch.full((4, k), 127, dtype=torch.int8)
    b = torch.full((k, 8), 127, dtype=torch.int8)
    try:
        out = torch._int_mm(a, b)
    except RuntimeError:
        return False
    return bool(torch.all(out == 127 * 127 * k))


@functools.cache
def int8_matmul_path() -> str:
    """Which exact int8 product `int8_int8_matmul` runs on the CPU: "torch._int_mm" where the probe shows it
    exact and the CPU has VNNI (int8 dot products in hardware; AVX512-VNNI, which AMX CPUs have too), else
    "float32 chunks". Without VNNI `torch._int_mm` either saturates 16-bit pair sums or, exact, runs a
    scalar loop: 14 ms for 16 x 576 x 1536 on an AVX2-only AMD EPYC, where the float32 chunks took 0.7-2.3
    ms at 16 rows (1.3-3.8x fp32 F.linear: the weight is converted on every call)."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    return "torch._int_mm" if vnni and int_mm_is_exact() else "float32 chunks"


# 128 * 128 * 1024 = 2**24: every partial sum of int8 products over at most this many columns, in any
# order, is an integer of magnitude at most 2**24, which float32 holds exactly.
EXACT_FLOAT32_COLUMNS = 1024


def int8_int8_matmul(x_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation of x_q [rows, in] int8 @ weight.T [in, out] -> [rows, out] int32.

    On the CPU, `int8_matmul_path()`: `torch._int_mm` where it is exact and fast (VNNI); elsewhere float32
    matmuls over chunks of `EXACT_FLOAT32_COLUMNS` input columns, each exact whatever order the kernel sums
    in, added in int32 (float32 GEMMs run at twice the float64 rate and read half the bytes of one
    float64 matmul, the fallback before).
    """
    if x_q.device.type == "cpu" and int8_matmul_path() == "torch._int_mm":
        return torch._int_mm(x_q, weight.t())
    rows, k = x_q.shape
    if x_q.device.type == "cuda" and rows > 16 and k % 8 == 0 and weight.shape[0] % 8 == 0:
        return torch._int_mm(x_q, weight.t())  # cuBLAS int8 GEMM's shape rules
    out: torch.Tensor | None = None
    for start in range(0, k, EXACT_FLOAT32_COLUMNS):
        cols = slice(start, start + EXACT_FLOAT32_COLUMNS)
        part = (x_q[:, cols].float() @ weight[:, cols].float().t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    if out is None:  # no input columns
        return torch.zeros(rows, weight.shape[0], dtype=torch.int32, device=x_q.device)
    return out


class Int8Linear(QuantizedLinear):
    """W8A8 linear (scheme `w8a8`).

    Tensors (compressed-tensors names): `weight` int8 [out, in], `weight_scale` float32 [out, 1],
    `input_scale` float32 [1] when activations are static per tensor (absent: dynamic per token),
    `bias` [out] in the model's float dtype.
    """

    scheme = "w8a8"

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias)

    @classmethod
    def from_fake_quant(cls, layer: FakeQuantLinear) -> Int8Linear:
        q = layer.integer_weight(8)
        bias = None if layer.bias is None else layer.bias.data.clone()
        input_scale = None if layer.input_scale is None else layer.input_scale.clone()
        return cls(q, layer.weight_scale.clone(), bias, input_scale)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        scale_shape: tuple[int, ...],
        static_input: bool = False,
    ) -> Int8Linear:
        return cls(
            torch.empty(out_features, in_features, dtype=torch.int8),
            torch.empty(scale_shape, dtype=torch.float32),
            torch.empty(out_features, dtype=dtype) if bias else None,
            torch.empty(1, dtype=torch.float32) if static_input else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)


def quantize_activations(
    x2: torch.Tensor, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round activation rows x2 [rows, in] to int8: per token (`input_scale` None; scales [rows, 1]) or
    with the static per-tensor scale ([1, 1]). Returns (x_q int8, scale float32)."""
    return quant_math.quantize_activation(x2, input_scale)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = dequant(quant(x) @ weight.T) + bias, with an exact int32 accumulation.

    Args:
        x: [..., in] float.
        weight: [out, in] int8.
        weight_scale: [out] or [out, 1] float32, one per output channel.
        input_scale: one float32 (static per-tensor activation scale), or None for dynamic per-token
            scales computed from x.
        bias: [out] or None.
    Returns:
        [..., out] in x's dtype.
    """
    shape = x.shape
    x_q, x_scale = quantize_activations(x.reshape(-1, shape[-1]), input_scale)
    # Scales are applied in place on the int32 result converted once to float32.
    y = int8_int8_matmul(x_q, weight).float()
    y.mul_(x_scale).mul_(weight_scale.reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
