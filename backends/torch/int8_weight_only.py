"""W8A16: int8 weights with one float scale per output channel; activations stay float.

Three kernels, chosen per layer by what the CPU has:
- AMX-BF16 CPUs serving bf16: `amx_woq_linear` (`csrc/woq.c`, the AMX tile unit);
- other x86 CPUs with AVX-512 or AVX2+FMA, float32 or bf16 activations: `simd_woq_linear`
  (`csrc/w8a16.c`: int8 widened to float32 in registers, exact FMAs, float32 sums);
- elsewhere (fp16/fp64, other CPUs, no C compiler, ``QUANTMINT_NATIVE=0``): `int8_weight_only_linear`'s
  torch path.

Why our own SIMD kernel rather than torch's: torch 2.13 on CPU has no weight-only int8 GEMM that beats
its own float32 F.linear on this CPU class (`aten._weight_int8pack_mm` is 15-45x slower than the
alternatives from 16 rows and reads out of bounds in bf16 when `in` % 16 != 0, `torch._int_mm` and
oneDNN/mkldnn int8 linear quantize the activations (W8A8, not W8A16), and the cast-then-F.linear path
pays a float copy of the weight per call), while streaming 1 byte per weight instead of 4 is what makes
decode faster than float32 (benchmarks/int8_matmul.py).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.numerics import native

__all__ = [
    "Int8WeightOnlyLinear",
    "SimdKernel",
    "amx_woq_linear",
    "amx_woq_supported",
    "int8_weight_only_linear",
    "pack_weight_for_amx",
    "pack_weight_for_simd",
    "simd_woq_kernel",
    "simd_woq_linear",
    "simd_woq_supported",
]


def int8_weight_only_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias, without keeping a float copy of the weight.

    Args:
        x: [..., in] float (float32, bfloat16, float16, float64).
        weight: [out, in] int8, contiguous.
        scale: [out] in x's dtype, one per output channel.
        bias: [out] or None.
    Returns:
        [..., out] in x's dtype.

    This functional form runs torch only (it keeps no packed weight); `Int8WeightOnlyLinear` and the vLLM
    plugin run the native kernels of this module first (AMX, then AVX-512/AVX2) and this where neither
    applies. Two torch kernels, chosen by what benchmarks/int8_matmul.py measured on CPU (torch 2.13):
    - `aten._weight_int8pack_mm` converts the weight inside the GEMM. It is the fastest for decode
      (one row) in bf16/fp16 (0.35-0.8x the time of fp32 F.linear) and in fp32 on large layers
      (4096x4096: 4.7 ms vs 16 ms), but 15-45x slower than the alternative at 16+ rows. In bf16 it
      reads out of bounds when `in` is not a multiple of 16, so it is never used there.
    - Otherwise the int8 weight is cast to x's dtype (exact: every int8 fits bf16 and wider) and the
      per-channel scale is applied to the output, (x @ q.T) * scale: one cheap pass over the weight,
      about 2x faster than dequantize-weight-then-matmul.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if _use_int8pack(x, weight, rows):
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, shape[-1]).contiguous(), weight, scale)
        y = y.reshape(*shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight.to(x.dtype)) * scale
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


_INT8PACK_MAX_ROWS_HALF = 4  # measured: fastest at 1 row, slower than the cast path at 16 rows
_INT8PACK_MIN_WEIGHT_FP32 = 1 << 22  # fp32 one-row: faster only once the cast of the weight dominates


def _use_int8pack(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    if x.device.type != "cpu" or rows == 0 or not weight.is_contiguous():
        return False
    if x.dtype in (torch.bfloat16, torch.float16):
        return rows <= _INT8PACK_MAX_ROWS_HALF and weight.shape[1] % 16 == 0
    if x.dtype == torch.float32:
        return rows == 1 and weight.numel() >= _INT8PACK_MIN_WEIGHT_FP32
    return False


# --- the AVX-512 / AVX2 kernel (csrc/w8a16.c) -------------------------------------------------------------
SIMD_SOURCE = Path(__file__).resolve().parent / "csrc" / "w8a16.c"
_SIMD: dict[tuple[str, ...], SimdKernel | None] = {}
_SIMD_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class SimdKernel:
    """The compiled `csrc/w8a16.c`: `isa` 512 (AVX-512) or 256 (AVX2+FMA), `bf16dot` whether bf16
    activations of 4 rows or more run vdpbf16ps (built with ``-DQM_WANT_BF16DOT`` on an AVX512-BF16 CPU;
    see `bf16dot_by_default`), `panel` the output channels per packed panel (2 vectors), `fn` the ctypes
    function of the matmul, `quantize_rows` and `scale_rows` those of the W8A8 activation rounding and
    output scaling (`int8_linear.py`)."""

    def __init__(self, lib: Any) -> None:
        lib.qm_w8a16_isa.restype = ctypes.c_int
        lib.qm_w8a16_panel.restype = ctypes.c_int
        lib.qm_w8a16_bf16dot.restype = ctypes.c_int
        self.isa: int = lib.qm_w8a16_isa()
        self.panel: int = lib.qm_w8a16_panel()
        self.bf16dot = bool(lib.qm_w8a16_bf16dot())
        isa = {512: "AVX-512", 256: "AVX2+FMA"}.get(self.isa, "none")
        self.isa_name = isa
        self.name = f"{isa} BF16" if self.bf16dot else isa
        fn = lib.qm_w8a16_linear
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
        fn.restype = ctypes.c_int
        self.fn = fn
        quantize = lib.qm_w8a8_quantize_rows
        quantize.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ctypes.c_float, ptr, ptr]
        quantize.restype = None
        self.quantize_rows = quantize
        scale_rows = lib.qm_w8a8_scale_rows
        scale_rows.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int]
        scale_rows.restype = None
        self.scale_rows = scale_rows

    def name_for(self, dtype: torch.dtype) -> str:
        """What serves `dtype` activations: "AVX-512 BF16" (vdpbf16ps, bf16 of 4 rows or more) or the ISA."""
        return self.name if dtype == torch.bfloat16 else self.isa_name


BF16DOT_ENV = "QUANTMINT_W8A16_BF16DOT"


def bf16dot_by_default() -> bool:
    """Whether this CPU's own W8A16 kernel runs bf16 activations on vdpbf16ps (``-DQM_WANT_BF16DOT``):
    on AMD CPUs with AVX512-BF16 (Zen 4 and later), where it measured 1.2-2x the float32 path's speed
    from 4 rows up (docs/benchmarks.md), and not on Intel's: Sapphire Rapids ran it 1.5-1.9x slower (and
    serves bf16 on AMX), Cooper Lake is unmeasured. ``QUANTMINT_W8A16_BF16DOT=1`` or ``=0`` overrides
    the choice (``=1`` only takes effect on a CPU with AVX512-BF16)."""
    chosen = os.environ.get(BF16DOT_ENV, "").strip()
    if chosen in ("0", "1"):
        return chosen == "1"
    if chosen:
        raise ValueError(
            f"{BF16DOT_ENV}={chosen!r}: set it to 1 (vdpbf16ps) or 0 (the float32 path), or unset it"
        )
    vendor, flags = native.cpu_features()
    return vendor == "AuthenticAMD" and "avx512_bf16" in flags


def simd_woq_kernel(flags: tuple[str, ...] = ()) -> SimdKernel | None:
    """The AVX-512 / AVX2 W8A16 kernel built for this CPU (with extra compiler `flags`, e.g. `-mno-avx512f`
    to build the AVX2 path on an AVX-512 CPU), or None where no path compiles (no AVX2+FMA, not x86, no
    compiler, ``QUANTMINT_NATIVE=0``). Without `flags`, this CPU's own choice (`bf16dot_by_default`).
    Looked up once per process and flags."""
    kernel = _SIMD.get(flags, False)
    if kernel is False:
        own = ("-DQM_WANT_BF16DOT",) if not flags and bf16dot_by_default() else ()
        lib = native.library("w8a16", SIMD_SOURCE, (*WOQ_FLAGS, *flags, *own))
        kernel = SimdKernel(lib) if lib is not None else None
        if kernel is not None and kernel.isa == 0:
            kernel = None
        _SIMD[flags] = kernel
    return kernel  # type: ignore[return-value]


def simd_woq_supported(weight: torch.Tensor, dtype: torch.dtype, kernel: SimdKernel | None = None) -> bool:
    """Whether `simd_woq_linear` serves this int8 weight [out, in] for `dtype` activations here: a CPU
    with AVX-512 or AVX2+FMA (and a C compiler), float32 or bf16 activations. Any shape (tails of `out`
    and `in` are handled) and any int8 value."""
    return (
        dtype in _SIMD_DTYPES
        and weight.device.type == "cpu"
        and weight.dtype == torch.int8
        and weight.dim() == 2
        and weight.numel() > 0
        and (kernel or simd_woq_kernel()) is not None
    )


def pack_weight_for_simd(weight: torch.Tensor, kernel: SimdKernel | None = None) -> torch.Tensor:
    """int8 [out, in] -> what `simd_woq_linear` reads: panels of `kernel.panel` output channels, each
    [in][panel] contiguous, the last zero-padded: [ceil(out / panel), in, panel] int8, where element
    (n, k) sits at [n // panel, k, n % panel]."""
    kernel = kernel or simd_woq_kernel()
    if kernel is None:
        raise ValueError("no AVX-512 / AVX2 W8A16 kernel here: check simd_woq_supported first")
    nb = kernel.panel
    out_features, in_features = weight.shape
    padded = -out_features % nb
    if padded:
        weight = torch.cat([weight, weight.new_zeros(padded, in_features)])
    return weight.reshape(-1, nb, in_features).transpose(1, 2).contiguous()


def simd_woq_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    kernel: SimdKernel | None = None,
) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias with `csrc/w8a16.c`, for a weight packed by
    `pack_weight_for_simd` (with the same `kernel`) and checked by `simd_woq_supported`.

    x: [..., in] float32 or bf16; scale: [out] float32 (one per output channel); bias: [out] float32 or
    None. Exact products, float32 sums, scale and bias in float32, one rounding to x's dtype. Never falls
    back to torch: it raises where the kernel cannot run.
    """
    kernel = kernel or _SIMD.get(()) or simd_woq_kernel()
    bf16 = _SIMD_DTYPES.get(x.dtype)
    if kernel is None or bf16 is None or scale.dtype != torch.float32:
        raise ValueError(
            f"simd_woq_linear takes float32 or bf16 activations and float32 scales on an AVX2/AVX-512 CPU "
            f"(got {x.dtype}, {scale.dtype}, kernel {'built' if kernel else 'unavailable'}): "
            "check simd_woq_supported first"
        )
    out_features, in_features = scale.shape[0], x.shape[-1]
    x2, rows, row_stride = _kernel_rows(x, in_features)
    y = torch.empty((rows, out_features), dtype=x.dtype)
    if rows and not kernel.fn(
        x2.data_ptr(), bf16, rows, in_features, row_stride, packed.data_ptr(), out_features,
        scale.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
    ):  # fmt: skip
        raise RuntimeError("the W8A16 SIMD kernel could not run (no workspace memory)")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def _kernel_rows(x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int, int]:
    """x [..., in] as the native kernels read it: (rows [rows, in] with unit column stride and rows at
    least `in` apart, copied only where needed; the number of rows; the row stride in elements)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    rows, (row_stride, col_stride) = x2.shape[0], x2.stride()
    if col_stride != 1 or (rows > 1 and row_stride < in_features):
        x2, row_stride = x2.contiguous(), in_features
    return x2, rows, row_stride


# --- the AMX kernel (csrc/woq.c) -----------------------------------------------------------------------
_WOQ: dict[str, Any] = {}  # "fn": the kernel's ctypes function, or None where it cannot run
WOQ_SOURCE = Path(__file__).resolve().parent / "csrc" / "woq.c"
WOQ_FLAGS = ("-fopenmp",)  # shares torch's OpenMP thread pool (see `quantmint.numerics.native.library`)


def woq_library() -> Any:
    """The compiled `csrc/woq.c` (`quantmint.numerics.native.library`), or None where it cannot be built."""
    return native.library("woq", WOQ_SOURCE, WOQ_FLAGS)


def _woq_function() -> Any:
    """The AMX kernel, looked up once per process (a call costs microseconds: it runs per layer)."""
    if "fn" not in _WOQ:
        lib = woq_library()
        fn = None
        if lib is not None:
            lib.qm_woq_available.restype = ctypes.c_int
            if lib.qm_woq_available():
                fn = lib.qm_woq_linear_bf16
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
                fn.restype = ctypes.c_int
        _WOQ["fn"] = fn
    return _WOQ["fn"]


def amx_woq_supported(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `amx_woq_linear` serves this int8 weight [out, in] for `dtype` activations here: a CPU
    with AMX-BF16 (and a C compiler), bf16 activations, `in` a multiple of 32 and `out` of 16, and
    values in [-127, 127] (quantmint's symmetric rounding never writes -128; see `pack_weight_for_amx`)."""
    return (
        dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.dtype == torch.int8
        and weight.dim() == 2
        and weight.shape[1] % 32 == 0
        and weight.shape[0] % 16 == 0
        and weight.numel() > 0
        and _woq_function() is not None
        and int(weight.min()) > -128
    )


def pack_weight_for_amx(weight: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] in [-127, 127] -> what `amx_woq_linear` reads: w + 128 as uint8 (1..255, so the
    kernel widens it with no sign or zero to handle; it takes 128 * sum(x) back off) in the AMX tile
    order [out/16, in/32, 16, 16, 2], where element (n, k) sits at
    [n // 16, k // 32, (k % 32) // 2, n % 16, k % 2]. As many bytes as the weight."""
    if weight.numel() and int(weight.min()) < -127:
        raise ValueError("the AMX kernel takes int8 weights in [-127, 127]; this one holds -128")
    out_features, in_features = weight.shape
    offset = (weight.to(torch.int16) + 128).to(torch.uint8)
    blocks = offset.reshape(out_features // 16, 16, in_features // 32, 16, 2)
    return blocks.permute(0, 2, 3, 1, 4).contiguous()


def amx_woq_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias on the AMX tile unit (`csrc/woq.c`), for a weight packed by
    `pack_weight_for_amx` and checked by `amx_woq_supported`.

    x: [..., in] bf16; scale: [out] float32 (one per output channel: a per-tensor scale is expanded by
    the caller); bias: [out] float32 or None. Accumulates in float32,
    applies scale and bias in float32 and rounds once to bf16 (the cast path rounds x @ q.T to bf16
    before scaling).
    """
    fn = _WOQ.get("fn") or _woq_function()
    if fn is None or x.dtype != torch.bfloat16 or scale.dtype != torch.float32:
        raise ValueError(
            f"amx_woq_linear takes bf16 activations and float32 scales on an AMX CPU (got {x.dtype}, "
            f"{scale.dtype}, kernel {'built' if fn else 'unavailable'}): check amx_woq_supported first"
        )
    # Runs once per layer and decode step: every torch call here costs about a microsecond.
    out_features, in_features = scale.shape[0], x.shape[-1]
    x2, rows, row_stride = _kernel_rows(x, in_features)
    y = torch.empty((rows, out_features), dtype=torch.bfloat16)
    if rows and not fn(
        x2.data_ptr(), rows, in_features, row_stride, packed.data_ptr(), out_features,
        scale.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
    ):  # fmt: skip
        raise RuntimeError("the AMX W8A16 kernel could not run (no workspace memory)")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


_NativeEntry = tuple[str, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be written outside it)
        return -1


class Int8WeightOnlyLinear(QuantizedLinear):
    """Weight-only int8 linear (scheme `w8a16`).

    Tensors (compressed-tensors names): `weight` int8 [out, in], `weight_scale` float32 [out, 1]
    (or [1, 1] per tensor), `bias` [out] in the model's float dtype, if the layer has one.
    """

    scheme = "w8a16"

    def __init__(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias)
        # Scales in the activation dtype, made on first use, so the forward pass casts nothing twice.
        self._scale_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        # The native kernel's view of the layer, made on first use per activation dtype: (kernel name,
        # packed weight, float32 scale [out], float32 bias or None), or None for the torch path.
        self._native_cache: dict[torch.dtype, tuple[tuple[Any, ...], _NativeEntry | None]] = {}

    @classmethod
    def from_fake_quant(cls, layer: FakeQuantLinear) -> Int8WeightOnlyLinear:
        q = layer.integer_weight(8)
        bias = None if layer.bias is None else layer.bias.data.clone()
        return cls(q, layer.weight_scale.clone(), bias)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        scale_shape: tuple[int, ...],
        static_input: bool = False,
    ) -> Int8WeightOnlyLinear:
        if static_input:
            raise ValueError("W8A16 keeps activations float: a static input scale belongs to the w8a8 cell")
        return cls(
            torch.empty(out_features, in_features, dtype=torch.int8),
            torch.empty(scale_shape, dtype=torch.float32),
            torch.empty(out_features, dtype=dtype) if bias else None,
        )

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._scale_cache.clear()
        self._native_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._scale_cache.clear()
        self._native_cache.clear()
        return super()._apply(fn, recurse)

    def _scale_for(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        scale = self._scale_cache.get(key)
        if scale is None:
            scale = self.weight_scale.reshape(-1).expand(self.out_features).to(x.dtype).contiguous()
            self._scale_cache[key] = scale
        return scale

    def kernel_for(self, dtype: torch.dtype) -> str:
        """Which kernel serves `dtype` activations: "amx" (`csrc/woq.c`), "avx512" / "avx2"
        (`csrc/w8a16.c`) or "torch"."""
        entry = self._native_for(dtype)
        return "torch" if entry is None else entry[0]

    def _native_for(self, dtype: torch.dtype) -> _NativeEntry | None:
        # Keyed on the tensors' identity and version counters too: a weight written in place (copy_) or
        # replaced after the first call is packed again, never served stale.
        stamp = tuple(
            (id(t), t.data_ptr(), _version(t)) if t is not None else None
            for t in (self.weight, self.weight_scale, self.bias)
        )
        cached = self._native_cache.get(dtype)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        entry = None
        weight = self.weight
        if weight.device.type == "cpu":
            with torch.no_grad():
                scale = self.weight_scale.reshape(-1).expand(self.out_features).float().contiguous()
                bias = None if self.bias is None else self.bias.float().contiguous()
                if amx_woq_supported(weight, dtype):
                    entry = ("amx", pack_weight_for_amx(weight), scale, bias)
                else:
                    kernel = simd_woq_kernel()
                    if kernel is not None and simd_woq_supported(weight, dtype, kernel):
                        name = "avx512" if kernel.isa == 512 else "avx2"
                        entry = (name, pack_weight_for_simd(weight, kernel), scale, bias)
        self._native_cache[dtype] = (stamp, entry)
        return entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The packed copy is made once per dtype (as many bytes as the int8 weight; `weight` stays for the
        # state dict) and not tracked by autograd: the native kernels serve inference only.
        if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            entry = self._native_for(x.dtype)
            if entry is not None:
                name, packed, scale, bias = entry
                if name == "amx":
                    return amx_woq_linear(x, packed, scale, bias)
                return simd_woq_linear(x, packed, scale, bias)
        return int8_weight_only_linear(x, self.weight, self._scale_for(x), self.bias)
