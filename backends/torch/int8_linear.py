"""W8A8: int8 weights per output channel, int8 activations per token (dynamic) or per tensor (static),
an int8 x int8 -> int32 matmul, and the scales applied to the int32 result."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from quantmint.backends.torch.int8_weight_only import (
    _version,
    pack_weight_for_simd,
    simd_woq_kernel,
    simd_woq_linear,
)
from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.numerics import quant_math

__all__ = [
    "Int8Linear",
    "Int8Panels",
    "int8_int8_matmul",
    "int8_linear",
    "int8_matmul_path",
    "int_mm_is_exact",
    "pack_int8_weight",
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
    """Which exact int8 product `int8_int8_matmul` runs on the CPU:
    - "torch._int_mm" where the probe shows it exact and the CPU has VNNI (int8 dot products in hardware;
      AVX512-VNNI, which AMX CPUs have too);
    - "w8a16.c float32" elsewhere on x86 with AVX2+FMA or AVX-512, for weights packed by
      `pack_int8_weight` (the cells and the vLLM plugin pack at load): the W8A16 SIMD kernel
      (`csrc/w8a16.c`) on the int8 activations as floats, over chunks of at most `EXACT_FLOAT32_COLUMNS`
      input columns, with unit scales. It reads the int8 weight and widens it in registers, where the
      float32 chunks convert the whole weight to float32 on every call;
    - "float32 chunks" otherwise (and for unpacked weights): float32 matmuls over the same chunks.
    Without VNNI `torch._int_mm` either saturates 16-bit pair sums or, exact, runs a scalar loop: 14 ms for
    16 x 576 x 1536 on an AVX2-only AMD EPYC, where the float32 chunks took 0.7-2.3 ms at 16 rows (1.3-3.8x
    fp32 F.linear) and the W8A16 kernel runs at about the fp32 F.linear rate or faster
    (benchmarks/int8_matmul.py, docs/benchmarks.md)."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    if vnni and int_mm_is_exact():
        return "torch._int_mm"
    return "w8a16.c float32" if simd_woq_kernel() is not None else "float32 chunks"


# 128 * 128 * 1024 = 2**24: every partial sum of int8 products over at most this many columns, in any
# order, is an integer of magnitude at most 2**24, which float32 holds exactly.
EXACT_FLOAT32_COLUMNS = 1024


@dataclass(frozen=True)
class Int8Panels:
    """An int8 weight [out, in] packed for `int8_int8_matmul`'s "w8a16.c float32" path: `chunks` holds
    (first column, last column + 1, `pack_weight_for_simd` panels) for input chunks of at most
    `EXACT_FLOAT32_COLUMNS` columns (as equal as they come), `ones` the unit scales [out] the kernel
    multiplies by. As many bytes as the weight, padded to whole panels."""

    out_features: int
    in_features: int
    chunks: tuple[tuple[int, int, torch.Tensor], ...] = field(repr=False)
    ones: torch.Tensor = field(repr=False)


def pack_int8_weight(weight: torch.Tensor) -> Int8Panels | None:
    """`weight` [out, in] int8 packed for the "w8a16.c float32" path of `int8_int8_matmul`, or None where
    that path is not this CPU's (VNNI CPUs run `torch._int_mm` on the plain weight; CPUs without the
    kernel run the float32 chunks) or the weight is not a non-empty int8 CPU matrix."""
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.int8
        or weight.dim() != 2
        or weight.numel() == 0
        or int8_matmul_path() != "w8a16.c float32"
    ):
        return None
    kernel = simd_woq_kernel()
    out_features, in_features = weight.shape
    parts = -(-in_features // EXACT_FLOAT32_COLUMNS)
    step = -(-in_features // parts)
    chunks = tuple(
        (start, min(start + step, in_features), pack_weight_for_simd(weight[:, start : start + step], kernel))
        for start in range(0, in_features, step)
    )
    return Int8Panels(out_features, in_features, chunks, torch.ones(out_features, dtype=torch.float32))


def int8_int8_matmul(
    x_q: torch.Tensor, weight: torch.Tensor, panels: Int8Panels | None = None
) -> torch.Tensor:
    """Exact int32 accumulation of x_q [rows, in] int8 @ weight.T [in, out] -> [rows, out] int32.

    On the CPU, `int8_matmul_path()`: `torch._int_mm` where it is exact and fast (VNNI); elsewhere, with
    `panels` (`pack_int8_weight(weight)`), the W8A16 SIMD kernel over chunks of at most
    `EXACT_FLOAT32_COLUMNS` input columns; else float32 matmuls over the same chunks. Each chunk's sums are
    exact whatever order the kernel adds in, and the chunks are added in int32.
    """
    if x_q.device.type == "cpu" and int8_matmul_path() == "torch._int_mm":
        return torch._int_mm(x_q, weight.t())
    rows, k = x_q.shape
    if x_q.device.type == "cuda" and rows > 16 and k % 8 == 0 and weight.shape[0] % 8 == 0:
        return torch._int_mm(x_q, weight.t())  # cuBLAS int8 GEMM's shape rules
    if panels is not None and x_q.device.type == "cpu" and rows:
        _check_panels(panels, weight, k)
        return _panel_sums(x_q.float(), panels).to(torch.int32)
    out: torch.Tensor | None = None
    for start in range(0, k, EXACT_FLOAT32_COLUMNS):
        cols = slice(start, start + EXACT_FLOAT32_COLUMNS)
        part = (x_q[:, cols].float() @ weight[:, cols].float().t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    if out is None:  # no input columns
        return torch.zeros(rows, weight.shape[0], dtype=torch.int32, device=x_q.device)
    return out


def _check_panels(panels: Int8Panels, weight: torch.Tensor, in_features: int) -> None:
    """The kernel reads as many input columns as the panels hold: panels of another weight, or inputs of
    another width, would read past the rows, so they are refused."""
    if (panels.out_features, panels.in_features) != tuple(weight.shape) or in_features != panels.in_features:
        raise ValueError(
            f"panels packed for a {panels.out_features}x{panels.in_features} weight, not "
            f"{tuple(weight.shape)} with {in_features} input columns: pack this weight with pack_int8_weight"
        )


def _panel_sums(x_f: torch.Tensor, panels: Int8Panels) -> torch.Tensor:
    """x_f [rows, in] (int8 values as float32) @ the packed weight.T on the W8A16 SIMD kernel: float32
    with one chunk (exact integers), int32 with several (each chunk exact, added in int32)."""
    if len(panels.chunks) == 1:
        return simd_woq_linear(x_f, panels.chunks[0][2], panels.ones)
    out = None
    for start, stop, packed in panels.chunks:
        part = simd_woq_linear(x_f[:, start:stop], packed, panels.ones).to(torch.int32)
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def _quantize_rows_to_float(
    x2: torch.Tensor, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_activations(x2, input_scale, torch.float32)` in one native pass (`csrc/w8a16.c`'s
    qm_w8a8_quantize_rows, the same bits) for float32 and bf16 rows; torch for other dtypes."""
    kernel = simd_woq_kernel()
    bf16 = {torch.float32: 0, torch.bfloat16: 1}.get(x2.dtype)
    if kernel is None or bf16 is None:
        return quantize_activations(x2, input_scale, torch.float32)
    rows, cols = x2.shape
    if x2.stride(1) != 1 or (rows > 1 and x2.stride(0) < cols):
        x2 = x2.contiguous()
    q = torch.empty((rows, cols), dtype=torch.float32)
    if input_scale is None:
        scale = torch.empty((rows, 1), dtype=torch.float32)
        static = None
    else:
        scale = input_scale.float().reshape(1, 1)
        static = scale.data_ptr()
    kernel.quantize_rows(
        x2.data_ptr(), bf16, rows, cols, x2.stride(0), static, quant_math._MIN_SCALE, q.data_ptr(),
        scale.data_ptr(),
    )  # fmt: skip
    return q, scale


def _scaled_panel_sums(
    x_q: torch.Tensor,
    panels: Int8Panels,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """(`_panel_sums` * x_scale) * weight_scale: in `dtype` (float32 or bf16) where given and the scales
    are float32 ones per row (or one) and one per output channel, in one native pass
    (`qm_w8a8_scale_rows`: the same bits as the torch ops); else float32, by torch."""
    sums = _panel_sums(x_q, panels)
    rows, out_features = sums.shape
    kernel = simd_woq_kernel()
    bf16 = {torch.float32: 0, torch.bfloat16: 1}.get(dtype) if dtype is not None else None
    native_ok = (
        kernel is not None
        and bf16 is not None
        and x_scale.dtype == torch.float32
        and x_scale.numel() in (1, rows)
        and x_scale.is_contiguous()
        and weight_scale.dtype == torch.float32
        and weight_scale.numel() == out_features
        and weight_scale.is_contiguous()
    )
    if not native_ok:
        return sums.float().mul_(x_scale).mul_(weight_scale.reshape(1, -1))
    assert kernel is not None and dtype is not None
    y = torch.empty((rows, out_features), dtype=dtype)
    kernel.scale_rows(
        sums.data_ptr(), int(sums.dtype == torch.int32), rows, out_features, x_scale.data_ptr(),
        int(x_scale.numel() > 1), weight_scale.data_ptr(), y.data_ptr(), bf16,
    )  # fmt: skip
    return y


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
        # The weight packed for `int8_int8_matmul` on CPUs without VNNI, made on first use: (stamp of the
        # weight it was packed from, `Int8Panels` or None).
        self._panels: tuple[tuple[int, int, int], Int8Panels | None] | None = None

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

    def panels(self) -> Int8Panels | None:
        """The weight packed by `pack_int8_weight` (None where this CPU runs another path), packed again
        whenever the weight is replaced or written in place (copy_, load_state_dict), never stale."""
        weight = self.weight
        stamp = (id(weight), weight.data_ptr(), _version(weight))
        if self._panels is None or self._panels[0] != stamp:
            with torch.no_grad():
                self._panels = (stamp, pack_int8_weight(weight))
        return self._panels[1]

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._panels = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._panels = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias, self.panels())


def quantize_activations(
    x2: torch.Tensor, input_scale: torch.Tensor | None, dtype: torch.dtype = torch.int8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round activation rows x2 [rows, in] to int8 values: per token (`input_scale` None; scales
    [rows, 1]) or with the static per-tensor scale ([1, 1]). Returns (x_q as `dtype`, scale float32)."""
    return quant_math.quantize_activation(x2, input_scale, dtype)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    panels: Int8Panels | None = None,
) -> torch.Tensor:
    """y = dequant(quant(x) @ weight.T) + bias, with an exact int32 accumulation.

    Args:
        x: [..., in] float.
        weight: [out, in] int8.
        weight_scale: [out] or [out, 1] float32, one per output channel.
        input_scale: one float32 (static per-tensor activation scale), or None for dynamic per-token
            scales computed from x.
        bias: [out] or None.
        panels: `pack_int8_weight(weight)`, for the SIMD path on CPUs without VNNI (None: unpacked).
    Returns:
        [..., out] in x's dtype.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    simd = panels is not None and x2.device.type == "cpu" and x2.shape[0] > 0
    if simd and int8_matmul_path() != "torch._int_mm":
        assert panels is not None
        _check_panels(panels, weight, x2.shape[1])
        # The SIMD path reads the int8 values as float32: rounded straight to float32 (no int8 round trip)
        # and, within one chunk, the kernel's float32 sums used as they are (the same values as the int32).
        x_q, x_scale = _quantize_rows_to_float(x2, input_scale)
        y = _scaled_panel_sums(x_q, panels, x_scale, weight_scale, x.dtype if bias is None else None)
        if y.dtype != x.dtype or bias is not None:
            if bias is not None:
                y.add_(bias.float())
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], weight.shape[0])
    x_q, x_scale = quantize_activations(x2, input_scale)
    # Scales are applied in place on the int32 result converted once to float32.
    y = int8_int8_matmul(x_q, weight, panels).float()
    y.mul_(x_scale).mul_(weight_scale.reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
