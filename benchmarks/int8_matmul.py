"""Benchmark int8 matmul kernels against float matmul on the CPU, side by side in one run.

Every kernel computes ``y = x @ W^T`` for a linear layer whose weight ``W`` is stored ``[N, K]`` (out x in,
like ``nn.Linear``) and quantized symmetrically per output channel: ``scale[N] = absmax(W[n, :]) / 127``,
``w_int8 = round(W / scale).clamp(-127, 127)``.  Kernels measured (``kind`` in the output):

Layers are named ``NxK`` (576x1536, 1536x576, 576x576: SmolLM2-135M MLP/attention; 4096x4096), with activation
rows M in {1, 16, 256}.

* ``float``   -- ``F.linear`` with the dequantized weight, fp32 and bf16 (the baselines).
* ``w8``      -- weight-only int8, activations stay float:
  ``aten._weight_int8pack_mm`` (fp32 / bf16; scales must have x's dtype),
  dequantize-then-``F.linear`` done on every call (fp32 / bf16), quantmint's AMX kernel
  ``amx_woq_linear`` (bf16, CPUs with AMX-BF16; csrc/woq.c) and its SIMD kernel ``simd_woq_linear``
  (fp32 / bf16, csrc/w8a16.c: the AVX-512 path where the CPU has it, else AVX2+FMA; on an AVX-512 CPU
  also the AVX2 path, built with ``-mno-avx512f``, as ``[avx2]``; on an AVX512-BF16 CPU also whichever
  bf16 path this CPU's own kernel does not run: vdpbf16ps, built with ``-DQM_WANT_BF16DOT``, as
  ``[bf16dot]`` (Intel), or the float32 path, built with ``-mno-avx512bf16``, as ``[nobf16dot]`` (AMD)).
* ``w8a8``    -- int8 weights *and* int8 activations, dynamic activation quantization included in the time:
  ``torch._int_mm`` with per-token quantization + rescale (fp32 / bf16),
  ``torch.ao.nn.quantized.dynamic.Linear`` (engine ``x86``, else ``fbgemm``; per-channel qint8 weight; the
  module always passes ``reduce_range=True``, i.e. 7-bit activations),
  ``quantized::linear_dynamic`` called directly (fbgemm with ``reduce_range=False`` -- fp32 only, so the bf16
  variant includes the casts -- and onednn),
  ``onednn::qlinear_pointwise`` with per-tensor s8 activations (the inductor x86 path; fp32 / bf16 out) and
  the legacy ``aten.fbgemm_linear_int8_weight_fp32_activation`` (per-tensor weight, requantized by fbgemm).
* ``w8a8_core`` -- bare ``torch._int_mm`` on ready int8 operands (int32 out), no quant/dequant overhead, with
  the weight as the free ``q.t()`` view and as a contiguous ``[K, N]`` copy.

``constraints`` records small probes of dtype / shape / layout requirements (errors as strings); the one
known to crash (bf16 ``_weight_int8pack_mm`` with K % 16 != 0) runs in a child process.

For each (layer, M, kernel) it reports the median time in microseconds, the ratio to fp32 ``F.linear`` on the
same shape, and the numerical error against a float64 reference ``x_used @ dequant(W)^T`` where ``x_used`` is
the activation the kernel is given (so bf16 kernels are not charged for rounding their input to bf16):
``max_rel_err = max|y - ref| / max|ref|`` and ``sqnr_db = 10 log10(sum ref^2 / sum (y - ref)^2)`` (``null``
means bit-exact).  W8A8 errors include activation quantization noise by design; ``weight_quant_sqnr_db`` per
layer gives the cost of the int8 weight itself for comparison.  ``best`` names, per (layer, M, activation
dtype), the fastest ``w8`` and the fastest ``w8a8`` kernel.

Run::

    python benchmarks/int8_matmul.py [--threads N] [--quick] [--layers 576x1536,4096x4096] [--ms 1,16,256]

To approximate an AVX2-only CPU on a newer one, cap the ISA of ATen, oneDNN, MKL and fbgemm; the caps in
effect are echoed under ``cpu.isa_overrides``::

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/int8_matmul.py --layers 576x1536,1536x576,576x576

(4096x4096 is best skipped there: bf16-output oneDNN int8 matmul falls back to a reference kernel.)

``saturation`` is a worst-case probe (x in [0, 1), every weight at +127): without VNNI, fbgemm's u8*s8 pair
products saturate int16 unless ``reduce_range=True``; the probe shows whether a kernel does on this CPU.

One JSON line goes to stdout; progress goes to stderr.  ``--quick`` runs one layer and M in {1, 16} with a
short time budget (a CI smoke test, ~6 s).  The full run takes about 70 s on 2 idle cores; timings from a
busy machine are meaningless (the load average at start is recorded and warned about).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Fn = Callable[[], torch.Tensor]

FULL_LAYERS: tuple[tuple[int, int], ...] = ((576, 1536), (1536, 576), (576, 576), (4096, 4096))
FULL_MS: tuple[int, ...] = (1, 16, 256)
QUICK_LAYERS: tuple[tuple[int, int], ...] = ((576, 1536),)
QUICK_MS: tuple[int, ...] = (1, 16)
CPU_FLAGS: tuple[str, ...] = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)
ISA_ENV_VARS: tuple[str, ...] = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "FBGEMM_ENABLE_INSTRUCTIONS",
)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------


def cpu_info() -> dict[str, object]:
    """CPU model, the SIMD flags that matter for int8/bf16 GEMM, and torch's dispatch capability."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "model name":
                    model = value.strip()
    except OSError:
        pass
    return {
        "model": model,
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_overrides": isa_overrides(),
    }


def isa_overrides() -> dict[str, str]:
    """Environment variables that cap the ISA of ATen / oneDNN / MKL (to emulate an older CPU)."""
    return {name: os.environ[name] for name in ISA_ENV_VARS if name in os.environ}


def pick_engine(preferred: tuple[str, ...] = ("x86", "fbgemm")) -> str | None:
    """Select the first quantized engine in ``preferred`` that this torch build supports."""
    for engine in preferred:
        if engine in torch.backends.quantized.supported_engines:
            try:
                torch.backends.quantized.engine = engine
                return engine
            except RuntimeError:
                continue
    return None


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Layer:
    n: int
    k: int
    w: torch.Tensor  # original fp32 [N, K]
    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # fp32 [N]
    w_dq: torch.Tensor  # fp32 [N, K], q * scale

    @property
    def name(self) -> str:
        return f"{self.n}x{self.k}"


def make_layer(n: int, k: int, gen: torch.Generator) -> Layer:
    w = torch.randn(n, k, generator=gen) * (1.0 / math.sqrt(k))
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Layer(n=n, k=k, w=w, q=q, scale=scale, w_dq=q.float() * scale[:, None])


def quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-row quantization, computed in fp32; returns (int8 [M, K], fp32 scale [M, 1])."""
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(xf / s).clamp(-127, 127).to(torch.int8), s


def quant_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-tensor quantization; returns (int8 [M, K], fp32 0-dim scale)."""
    xf = x.float()
    s = xf.abs().amax().clamp(min=1e-12) / 127.0
    return torch.round(xf / s).clamp(-127, 127).to(torch.int8), s


# ----------------------------------------------------------------------------------------------------------
# Kernels: each builder does the untimed setup (packing, casting) and returns the timed closure, plus an
# optional float64 reference when the default one (x_used @ w_dq^T) does not apply.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    fn: Fn
    ref: torch.Tensor | None = None


Builder = Callable[[Layer, torch.Tensor], Prepared]


@dataclass
class Kernel:
    name: str
    kind: str  # float | w8 | w8a8 | w8a8_core
    act: str  # fp32 | bf16 | int8
    build: Builder


def build_float(dtype: torch.dtype) -> Builder:
    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        xd, wd = x.to(dtype), layer.w_dq.to(dtype)
        return Prepared(lambda: F.linear(xd, wd))

    return build


def build_int8pack(dtype: torch.dtype) -> Builder:
    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        if dtype == torch.bfloat16 and layer.k % 16:
            # see UNSAFE_PROBE: this reads out of bounds in torch 2.13 and may kill the process
            raise ValueError(f"skipped: bf16 _weight_int8pack_mm with K={layer.k} (K % 16 != 0) is unsafe")
        xd, q, s = x.to(dtype), layer.q.contiguous(), layer.scale.to(dtype)
        return Prepared(lambda: torch.ops.aten._weight_int8pack_mm(xd, q, s))

    return build


def build_dequant(dtype: torch.dtype) -> Builder:
    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        xd, q, s = x.to(dtype), layer.q, layer.scale.to(dtype)[:, None]
        return Prepared(lambda: F.linear(xd, q.to(dtype) * s))

    return build


def build_int_mm_dynamic(dtype: torch.dtype) -> Builder:
    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        xd, w_t, s_w = x.to(dtype), layer.q.t(), layer.scale[None, :]

        def fn() -> torch.Tensor:
            xq, s_x = quant_per_token(xd)
            acc = torch._int_mm(xq, w_t)
            return (acc * s_x * s_w).to(dtype)

        return Prepared(fn)

    return build


def build_int_mm_bare(contiguous_kn: bool) -> Builder:
    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        xq, _ = quant_per_token(x)
        w_t = layer.q.t().contiguous() if contiguous_kn else layer.q.t()
        ref = xq.double() @ layer.q.double().t()
        return Prepared(lambda: torch._int_mm(xq, w_t), ref)

    return build


def qint8_per_channel(layer: Layer) -> torch.Tensor:
    zp = torch.zeros(layer.n, dtype=torch.int64)
    return torch._make_per_channel_quantized_tensor(layer.q, layer.scale.double(), zp, 0)


@contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Temporarily select a quantized engine (weights are packed for the engine active at prepack time)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def build_ao_dynamic_linear(engine: str) -> Builder:
    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        with quantized_engine(engine):
            mod = torch.ao.nn.quantized.dynamic.Linear(layer.k, layer.n, bias_=False, dtype=torch.qint8)
            mod.set_weight_bias(qint8_per_channel(layer), None)
        return Prepared(lambda: mod(x))

    return build


def build_linear_dynamic_op(engine: str, reduce_range: bool, dtype: torch.dtype = torch.float32) -> Builder:
    """``quantized::linear_dynamic`` on a weight prepacked under ``engine``.

    The op only takes fp32 input, so for bf16 activations the up/down casts are part of the timed call.
    """

    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        with quantized_engine(engine):
            packed = torch.ops.quantized.linear_prepack(qint8_per_channel(layer), None)
        op = torch.ops.quantized.linear_dynamic
        if dtype == torch.float32:
            return Prepared(lambda: op(x, packed, reduce_range))
        xd = x.to(dtype)
        return Prepared(lambda: op(xd.float(), packed, reduce_range).to(dtype))

    return build


def build_onednn_qlinear(dtype: torch.dtype) -> Builder:
    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        xd = x.to(dtype)
        packed = torch.ops.onednn.qlinear_prepack(layer.q, list(x.shape))
        w_zp = torch.zeros(layer.n, dtype=torch.int64)
        x_zp = torch.zeros((), dtype=torch.int64)
        op = torch.ops.onednn.qlinear_pointwise.tensor

        def fn() -> torch.Tensor:
            xq, s_x = quant_per_tensor(xd)
            return op(xq, s_x, x_zp, packed, layer.scale, w_zp, None, 1.0, 0, dtype, "none", [], "")

        return Prepared(fn)

    return build


def build_fbgemm_legacy(layer: Layer, x: torch.Tensor) -> Prepared:
    wq, col_offsets, w_scale, w_zp = torch.fbgemm_linear_quantize_weight(layer.w_dq)
    packed = torch.fbgemm_pack_quantized_matrix(wq)
    bias = torch.zeros(layer.n)
    op = torch.fbgemm_linear_int8_weight_fp32_activation
    return Prepared(lambda: op(x, wq, packed, col_offsets, w_scale, w_zp, bias))


def build_convert_scale_out(dtype: torch.dtype) -> Builder:
    """Cast the int8 weight to x's dtype (exact) and apply the per-channel scale to the output."""

    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        xd, q, s = x.to(dtype), layer.q, layer.scale.to(dtype)
        return Prepared(lambda: F.linear(xd, q.to(dtype)) * s)

    return build


def build_quantmint_cell(dtype: torch.dtype) -> Builder:
    """What quantmint's Int8WeightOnlyLinear actually runs (its own kernel choice)."""

    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        from quantmint.backends.torch import Int8WeightOnlyLinear

        cell = Int8WeightOnlyLinear(layer.q.contiguous(), layer.scale.reshape(-1, 1))
        xd = x.to(dtype)
        cell(xd)
        return Prepared(lambda: cell(xd))

    return build


def build_quantmint_w8a8_cell(dtype: torch.dtype) -> Builder:
    """What quantmint's W8A8 cell Int8Linear runs: per-token int8 activations and its exact int32 matmul
    (`torch._int_mm` where exact here with VNNI, else the W8A16 SIMD kernel `csrc/w8a16.c` on the int8
    activations over input chunks of at most 1,024 columns, else float32 matmuls over such chunks)."""

    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        from quantmint.backends.torch import Int8Linear

        cell = Int8Linear(layer.q.contiguous(), layer.scale.reshape(-1, 1))
        xd = x.to(dtype)
        xq, s_x = quant_per_token(xd)
        ref = (xq.double() * s_x.double()) @ layer.w_dq.double().t()
        return Prepared(lambda: cell(xd), ref)

    return build


def build_float64_exact(layer: Layer, x: torch.Tensor) -> Prepared:
    """The exact int32 product as one float64 matmul (quantmint's fallback before the float32 chunks)."""
    xq, _ = quant_per_token(x)
    q = layer.q
    return Prepared(lambda: (xq.double() @ q.double().t()).to(torch.int32), (xq.double() @ q.double().t()))


def build_amx_woq(layer: Layer, x: torch.Tensor) -> Prepared:
    """quantmint's AMX W8A16 kernel (csrc/woq.c), what the vLLM plugin serves bf16 W8A16 layers with."""
    from quantmint.backends.torch.int8_weight_only import (
        amx_woq_linear,
        amx_woq_supported,
        pack_weight_for_amx,
    )

    if not amx_woq_supported(layer.q, torch.bfloat16):
        raise ValueError("skipped: no AMX-BF16 kernel here (CPU, compiler, or K % 32 / N % 16)")
    xd, packed, s = x.to(torch.bfloat16), pack_weight_for_amx(layer.q), layer.scale.float().contiguous()
    return Prepared(lambda: amx_woq_linear(xd, packed, s))


def build_simd_woq(dtype: torch.dtype, flags: tuple[str, ...] = ()) -> Builder:
    """quantmint's AVX-512 / AVX2 W8A16 kernel (csrc/w8a16.c), what the runtime and the vLLM plugin serve
    W8A16 layers with where AMX does not apply; `flags` cap the ISA (``-mno-avx512f``: the AVX2 path) or
    choose the bf16 path (``-DQM_WANT_BF16DOT``: vdpbf16ps; ``-mno-avx512bf16``: the float32 path)."""

    def build(layer: Layer, x: torch.Tensor) -> Prepared:
        from quantmint.backends.torch.int8_weight_only import (
            pack_weight_for_simd,
            simd_woq_kernel,
            simd_woq_linear,
        )

        kernel = simd_woq_kernel(flags)
        if kernel is None:
            raise ValueError("skipped: no AVX2/AVX-512 W8A16 kernel here (CPU or compiler)")
        if "-DQM_WANT_BF16DOT" in flags and not kernel.bf16dot:
            raise ValueError("skipped: no AVX512-BF16 here (or not AVX-512): the bf16dot path is not built")
        own = simd_woq_kernel()
        if flags and own is not None and (own.isa, own.bf16dot) == (kernel.isa, kernel.bf16dot):
            raise ValueError(f"skipped: this CPU's own kernel is already {kernel.name}")
        xd, s = x.to(dtype), layer.scale.float().contiguous()
        packed = pack_weight_for_simd(layer.q, kernel)
        return Prepared(lambda: simd_woq_linear(xd, packed, s, None, kernel))

    return build


W8A16_SUMMARY_KERNELS = (
    "F.linear[bf16]",
    "quantmint.simd_woq_linear[fp32]",
    "quantmint.simd_woq_linear[bf16]",
    "quantmint.simd_woq_linear[avx2][fp32]",
    "quantmint.simd_woq_linear[avx2][bf16]",
    "quantmint.simd_woq_linear[bf16dot][bf16]",
    "quantmint.simd_woq_linear[nobf16dot][bf16]",
    "quantmint.amx_woq_linear[bf16]",
    "_weight_int8pack_mm[fp32]",
    "_weight_int8pack_mm[bf16]",
    "convert+F.linear*scale[fp32]",
    "convert+F.linear*scale[bf16]",
)


def w8a16_summary(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Per layer and row count: fp32 F.linear's time over each W8A16 kernel's (and bf16 F.linear's), i.e.
    speed-ups over fp32 (above 1: faster than fp32)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["kernel"] in W8A16_SUMMARY_KERNELS and r.get("ratio_vs_fp32"):
            key = f"{r['layer']}/M={r['M']}"
            out.setdefault(key, {})[str(r["kernel"])] = round(1.0 / float(r["ratio_vs_fp32"]), 2)
    return out


def kernels(engine: str | None) -> list[Kernel]:
    ks: list[Kernel] = []
    for act, dtype in DTYPES.items():
        ks += [
            Kernel(f"F.linear[{act}]", "float", act, build_float(dtype)),
            Kernel(f"_weight_int8pack_mm[{act}]", "w8", act, build_int8pack(dtype)),
            Kernel(f"dequant+F.linear[{act}]", "w8", act, build_dequant(dtype)),
            Kernel(f"convert+F.linear*scale[{act}]", "w8", act, build_convert_scale_out(dtype)),
            Kernel(f"quantmint.Int8WeightOnlyLinear[{act}]", "w8", act, build_quantmint_cell(dtype)),
            Kernel(f"_int_mm+per_token_quant[{act}]", "w8a8", act, build_int_mm_dynamic(dtype)),
            Kernel(f"quantmint.Int8Linear[{act}]", "w8a8", act, build_quantmint_w8a8_cell(dtype)),
            Kernel(
                f"onednn.qlinear_pointwise+per_tensor_quant[{act}]", "w8a8", act, build_onednn_qlinear(dtype)
            ),
            Kernel(
                f"quantized.linear_dynamic[fbgemm,rr=False][{act}]",
                "w8a8",
                act,
                build_linear_dynamic_op("fbgemm", False, dtype),
            ),
        ]
    ks.append(Kernel("quantmint.amx_woq_linear[bf16]", "w8", "bf16", build_amx_woq))
    for act, dtype in DTYPES.items():
        ks.append(Kernel(f"quantmint.simd_woq_linear[{act}]", "w8", act, build_simd_woq(dtype)))
        ks.append(
            Kernel(
                f"quantmint.simd_woq_linear[avx2][{act}]", "w8", act, build_simd_woq(dtype, ("-mno-avx512f",))
            )
        )
    # On an AVX512-BF16 CPU, the bf16 path its own kernel does not run (each is skipped where it is the
    # CPU's own): vdpbf16ps on int8 widened to bf16 pairs, and the float32 path (AVX-512 without BF16).
    ks.append(
        Kernel(
            "quantmint.simd_woq_linear[bf16dot][bf16]",
            "w8",
            "bf16",
            build_simd_woq(torch.bfloat16, ("-DQM_WANT_BF16DOT",)),
        )
    )
    ks.append(
        Kernel(
            "quantmint.simd_woq_linear[nobf16dot][bf16]",
            "w8",
            "bf16",
            build_simd_woq(torch.bfloat16, ("-mno-avx512bf16",)),
        )
    )
    if engine is not None:
        ks.append(
            Kernel(
                f"ao.dynamic.Linear[{engine},rr=True][fp32]", "w8a8", "fp32", build_ao_dynamic_linear(engine)
            )
        )
    ks += [
        Kernel(
            "quantized.linear_dynamic[onednn][fp32]", "w8a8", "fp32", build_linear_dynamic_op("onednn", False)
        ),
        Kernel(
            "fbgemm_linear_int8_weight_fp32_activation[per_tensor_w][fp32]",
            "w8a8",
            "fp32",
            build_fbgemm_legacy,
        ),
        Kernel("float64_exact_bare", "w8a8_core", "int8", build_float64_exact),
        Kernel("_int_mm_bare[w=q.t() view]", "w8a8_core", "int8", build_int_mm_bare(False)),
        Kernel("_int_mm_bare[w=[K,N] contiguous]", "w8a8_core", "int8", build_int_mm_bare(True)),
    ]
    return ks


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------


def time_median_us(fn: Fn, budget_s: float, min_reps: int = 5, max_reps: int = 3000) -> tuple[float, int]:
    """Median wall time of ``fn`` in microseconds and the number of timed calls (fn has already run once).

    One more warm-up call doubles as the cost estimate; fast kernels get two further warm-ups, and the repeat
    count is sized so the timed loop takes about ``budget_s`` (at least ``min_reps`` calls, except for calls
    slower than ``budget_s`` -- e.g. a reference fallback -- which get only as many as fit in 3 budgets).
    """
    t0 = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - t0, 1e-7)
    if estimate * min_reps < budget_s:
        for _ in range(2):
            fn()
    if estimate > budget_s:
        reps = max(1, min(min_reps, int(3 * budget_s / estimate)))
    else:
        reps = int(min(max(budget_s / estimate, min_reps), max_reps))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6, reps


def error_stats(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float | None]:
    diff = y.double() - ref
    noise = float(diff.pow(2).sum())
    signal = float(ref.pow(2).sum())
    max_ref = float(ref.abs().max())
    return {
        "max_rel_err": float(diff.abs().max()) / max_ref if max_ref > 0 else None,
        "sqnr_db": round(10 * math.log10(signal / noise), 2) if noise > 0 else None,
    }


def reference(layer: Layer, x: torch.Tensor, act: str) -> torch.Tensor:
    x_used = x.to(DTYPES[act]) if act in DTYPES else x
    return x_used.double() @ layer.w_dq.double().t()


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300]


def run_kernel(kernel: Kernel, layer: Layer, x: torch.Tensor, budget_s: float) -> dict[str, object]:
    row: dict[str, object] = {
        "layer": layer.name,
        "N": layer.n,
        "K": layer.k,
        "M": x.shape[0],
        "kernel": kernel.name,
        "kind": kernel.kind,
        "act": kernel.act,
    }
    try:
        prepared = kernel.build(layer, x)
        y = prepared.fn()
        ref = prepared.ref if prepared.ref is not None else reference(layer, x, kernel.act)
        row.update(error_stats(y, ref))
        row["out_dtype"] = str(y.dtype).removeprefix("torch.")
        median_us, row["reps"] = time_median_us(prepared.fn, budget_s)
        row["median_us"] = round(median_us, 2)
    except Exception as exc:  # any kernel failure is a result to record, not a crash
        row["error"] = short_error(exc)
    return row


def add_ratios(rows: list[dict[str, object]]) -> None:
    base = {
        (r["layer"], r["M"]): r["median_us"]
        for r in rows
        if r["kernel"] == "F.linear[fp32]" and "median_us" in r
    }
    for r in rows:
        b = base.get((r["layer"], r["M"]))
        if b and "median_us" in r:
            r["ratio_vs_fp32"] = round(float(r["median_us"]) / float(b), 3)


def saturating_kernels(saturation: dict[str, float | str], limit: float = 0.05) -> set[str]:
    """Kernels (names without the activation suffix) that the saturation probe caught wrong (max relative
    error above `limit`) or failing: never the "best" kernel, however fast (random inputs may not show it)."""
    return {name for name, err in saturation.items() if isinstance(err, str) or err > limit}


def best_summary(
    rows: list[dict[str, object]], exclude: Collection[str] = ()
) -> dict[str, dict[str, object]]:
    """Fastest w8 and w8a8 kernel per (layer, M, activation dtype); float baseline of that dtype alongside.
    Kernels in `exclude` (`saturating_kernels`) are listed as `excluded`, not ranked."""
    best: dict[str, dict[str, object]] = {}
    timed = [r for r in rows if "median_us" in r]
    for r in timed:
        if r["act"] not in DTYPES:
            continue
        if str(r["kernel"]).removesuffix(f"[{r['act']}]") in exclude:
            entry = best.setdefault(f"{r['layer']}/M={r['M']}/{r['act']}", {})
            entry.setdefault("excluded", []).append(r["kernel"])  # type: ignore[union-attr]
            continue
        key = f"{r['layer']}/M={r['M']}/{r['act']}"
        entry = best.setdefault(key, {})
        kind = str(r["kind"])
        slot = "float_us" if kind == "float" else kind
        if kind == "float":
            entry[slot] = r["median_us"]
            continue
        current = entry.get(slot)
        if current is None or float(r["median_us"]) < float(current["median_us"]):  # type: ignore[index]
            entry[slot] = {
                "kernel": r["kernel"],
                "median_us": r["median_us"],
                "ratio_vs_fp32": r.get("ratio_vs_fp32"),
            }
    return best


def try_call(fn: Fn) -> str:
    try:
        out = fn()
    except Exception as exc:  # recorded, not raised
        return "error: " + short_error(exc)
    return f"ok -> {tuple(out.shape)} {str(out.dtype).removeprefix('torch.')}"


# Run in a child process: with bf16 activations and K % 16 != 0, _weight_int8pack_mm reads out of bounds
# (garbage output or SIGSEGV) in torch 2.13 on AVX-512 CPUs, which must not take the benchmark down.
UNSAFE_PROBE = """
import sys, torch
dtype, m, k, n = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 32
g = torch.Generator().manual_seed(0)
x = torch.randn(m, k, generator=g).to(dtype)
w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
s = (torch.rand(n, generator=g) + 0.5).to(dtype)
y = torch.ops.aten._weight_int8pack_mm(x, w, s).double()
ref = x.double() @ (w.double() * s.double()[:, None]).t()
print(float((y - ref).abs().max() / ref.abs().max()))
"""


def probe_in_child(dtype: str, m: int, k: int) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", UNSAFE_PROBE, dtype, str(m), str(k)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        return f"crashed: returncode {proc.returncode}" + (" (SIGSEGV)" if proc.returncode == -11 else "")
    rel = float(proc.stdout.strip())
    verdict = "ok" if rel < 0.05 else "WRONG RESULT"
    return f"{verdict}: max_rel_err {rel:.3g}"


def probe_constraints() -> dict[str, str]:
    """Tiny calls that document dtype / shape / layout requirements of the int8 ops (not timed)."""
    gen = torch.Generator().manual_seed(1)
    a32 = torch.randn(3, 32, generator=gen)
    w8 = torch.randint(-127, 128, (5, 32), dtype=torch.int8, generator=gen)
    a8 = torch.randint(-127, 128, (3, 7), dtype=torch.int8, generator=gen)
    w8_odd = torch.randint(-127, 128, (5, 7), dtype=torch.int8, generator=gen)
    s32 = torch.rand(5, generator=gen)
    bf = torch.bfloat16
    int8pack = torch.ops.aten._weight_int8pack_mm
    w_pt = torch.quantize_per_tensor(w8.float(), 1.0, 0, torch.qint8)
    probes = {
        "_weight_int8pack_mm fp32 x, fp32 scales": try_call(lambda: int8pack(a32, w8, s32)),
        "_weight_int8pack_mm fp32 x, bf16 scales": try_call(lambda: int8pack(a32, w8, s32.to(bf))),
        "_weight_int8pack_mm bf16 x, fp32 scales": try_call(lambda: int8pack(a32.to(bf), w8, s32)),
        "_weight_int8pack_mm bf16 x, bf16 scales": try_call(lambda: int8pack(a32.to(bf), w8, s32.to(bf))),
        "_weight_int8pack_mm fp16 x, fp16 scales": try_call(lambda: int8pack(a32.half(), w8, s32.half())),
        "_weight_int8pack_mm weight not contiguous": try_call(
            lambda: int8pack(a32, w8.t().contiguous().t(), s32)
        ),
        "_weight_int8pack_mm 3-D x": try_call(lambda: int8pack(a32[None], w8, s32)),
        "_int_mm odd shapes M=3 K=7 N=5": try_call(lambda: torch._int_mm(a8, w8_odd.t())),
        "_int_mm M=1": try_call(lambda: torch._int_mm(a8[:1], w8_odd.t())),
        "_int_mm uint8 x": try_call(lambda: torch._int_mm(a8.to(torch.uint8), w8_odd.t())),
        "quantized.linear_dynamic bf16 x": try_call(
            lambda: torch.ops.quantized.linear_dynamic(a32.to(bf), torch.ops.quantized.linear_prepack(w_pt))
        ),
    }
    for dtype, m, k in (("bfloat16", 16, 40), ("bfloat16", 16, 48), ("float32", 16, 40)):
        probes[f"_weight_int8pack_mm {dtype} M={m} K={k} (child process)"] = probe_in_child(dtype, m, k)
    return probes


def saturation_probe() -> dict[str, float | str]:
    """Max relative error of w8a8 paths on an input built to overflow int16 pair sums (u8 255 * s8 127)."""
    k, n = 256, 64
    x = torch.rand(4, k, generator=torch.Generator().manual_seed(2))
    layer = Layer(n=n, k=k, w=torch.ones(n, k), q=torch.full((n, k), 127, dtype=torch.int8),
                  scale=torch.full((n,), 1 / 127), w_dq=torch.ones(n, k))  # fmt: skip
    ref = reference(layer, x, "fp32")
    variants: dict[str, Builder] = {
        "quantized.linear_dynamic[fbgemm,rr=False]": build_linear_dynamic_op("fbgemm", False),
        "quantized.linear_dynamic[fbgemm,rr=True]": build_linear_dynamic_op("fbgemm", True),
        "quantized.linear_dynamic[onednn]": build_linear_dynamic_op("onednn", False),
        "_int_mm+per_token_quant": build_int_mm_dynamic(torch.float32),
        "onednn.qlinear_pointwise+per_tensor_quant": build_onednn_qlinear(torch.float32),
    }
    out: dict[str, float | str] = {}
    for name, build in variants.items():
        try:
            out[name] = error_stats(build(layer, x).fn(), ref)["max_rel_err"] or 0.0
        except Exception as exc:  # recorded, not raised
            out[name] = "error: " + short_error(exc)
    return out


def run(
    threads: int,
    quick: bool,
    layers: tuple[tuple[int, int], ...] | None = None,
    ms: tuple[int, ...] | None = None,
) -> dict[str, object]:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None and load > 0.5:
        log(
            f"[int8_matmul] WARNING: 1-min load average is {load:.2f}; "
            "the machine is (or was just) busy, timings may be skewed"
        )
    engine = pick_engine()
    layers_spec = layers or (QUICK_LAYERS if quick else FULL_LAYERS)
    ms = ms or (QUICK_MS if quick else FULL_MS)
    budget_s = 0.1 if quick else 0.5
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, object]] = []
    layer_info: dict[str, dict[str, object]] = {}
    kernel_list = kernels(engine)
    start = time.perf_counter()
    with torch.inference_mode():
        for n, k in layers_spec:
            layer = make_layer(n, k, gen)
            x_probe = torch.randn(64, k, generator=gen)
            wq_err = error_stats(F.linear(x_probe, layer.w_dq), x_probe.double() @ layer.w.double().t())
            layer_info[layer.name] = {"weight_quant_sqnr_db": wq_err["sqnr_db"]}
            for m in ms:
                x = torch.randn(m, k, generator=gen)
                log(f"[int8_matmul] layer {layer.name} M={m} ({time.perf_counter() - start:.1f}s)")
                rows += [run_kernel(kern, layer, x, budget_s) for kern in kernel_list]
    add_ratios(rows)
    log(f"[int8_matmul] done in {time.perf_counter() - start:.1f}s")
    saturation = saturation_probe()
    return {
        "benchmark": "int8_matmul",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_1m_at_start": load,
        "quick": quick,
        "cpu": cpu_info(),
        "quantized_engine": engine,
        "supported_engines": list(torch.backends.quantized.supported_engines),
        "layers": layer_info,
        "constraints": probe_constraints(),
        "saturation": saturation,
        "results": rows,
        "best": best_summary(rows, saturating_kernels(saturation)),
        "w8a16_speedup_vs_fp32": w8a16_summary(rows),
    }


def parse_layers(text: str) -> tuple[tuple[int, int], ...]:
    pairs = [item.lower().split("x") for item in text.split(",") if item]
    return tuple((int(n), int(k)) for n, k in pairs)


def parse_ms(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="small subset for a CI smoke test (< 20 s)")
    parser.add_argument("--layers", type=parse_layers, help="override layers, e.g. 576x1536,4096x4096 (NxK)")
    parser.add_argument("--ms", type=parse_ms, help="override activation rows, e.g. 1,16,256")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.threads, args.quick, args.layers, args.ms)))


if __name__ == "__main__":
    main()
