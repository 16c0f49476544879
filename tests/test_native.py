"""The native RTN kernel (`csrc/rtn.c`) against the torch passes it stands in for: same integers, same
scales, on every dtype, bit width and shape it takes, and a clean fallback where it cannot be used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from quantmint.numerics import native, native_rtn
from quantmint.numerics import quant_math as qm

needs_compiler = pytest.mark.skipif(
    os.environ.get("CC") is None and not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
    reason="no C compiler on this machine: the native kernels fall back to torch",
)


def torch_rtn(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch passes `quantize_weight` runs without the native kernel."""
    scale = qm.qparams_from_absmax(qm.weight_absmax(weight, "channel"), bits)
    return qm.quantize(weight, scale, num_bits=bits), scale


def awkward_weight(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows spanning the dtype's range, an all-zero row, a row below the smallest scale, and a row of
    exact ties (x / scale = k + 0.5) that round-half-to-even must settle."""
    generator = torch.Generator().manual_seed(seed)
    high = 2 if dtype == torch.float16 else 4
    weight = torch.randn(rows, cols, generator=generator) * torch.logspace(-6, high, rows).reshape(-1, 1)
    if rows >= 3:
        weight[0] = 0
        weight[1] = 1e-14 if dtype != torch.float16 else 0  # scale clamps to the minimum
        ties = torch.arange(cols, dtype=torch.float32) % 9 - 4.5  # amax 127 -> scale 1
        ties[0] = 127
        weight[2] = ties
    return weight.to(dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 1), (3, 33), (64, 4097), (300, 4096)])
def test_native_kernel_gives_the_torch_integers_and_scales(dtype, bits, shape) -> None:
    weight = awkward_weight(*shape, dtype)
    native_result = native_rtn.rtn_channel(weight, 2 ** (bits - 1) - 1)
    assert native_result is not None, "the native kernel did not run"
    expected = torch_rtn(weight, bits)
    assert torch.equal(native_result[0], expected[0])
    assert torch.equal(native_result[1], expected[1])
    assert native_result[1].shape == (shape[0], 1)


@needs_compiler
def test_native_kernel_splits_large_weights_over_threads_with_the_same_result() -> None:
    weight = awkward_weight(2 * native_rtn._NATIVE_SPLIT_ELEMENTS // 512 + 5, 512, torch.bfloat16, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_rtn.rtn_channel(weight, 127)
        torch.set_num_threads(3)
        split = native_rtn.rtn_channel(weight, 127)
    finally:
        torch.set_num_threads(threads)
    assert one is not None and split is not None
    assert torch.equal(one[0], split[0]) and torch.equal(one[1], split[1])
    assert torch.equal(split[0], torch_rtn(weight, 8)[0])


@needs_compiler
def test_native_kernel_reads_strided_rows() -> None:
    wide = awkward_weight(40, 96, torch.bfloat16)
    weight = wide[:, 10:60]
    assert weight.stride(0) == 96
    result = native_rtn.rtn_channel(weight, 127)
    assert result is not None
    assert torch.equal(result[0], torch_rtn(weight, 8)[0]) and torch.equal(result[1], torch_rtn(weight, 8)[1])
    assert native_rtn.rtn_channel(wide.t(), 127) is None  # columns not contiguous: torch's job


@needs_compiler
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_rows_with_inf_or_nan_are_left_to_torch(bad) -> None:
    weight = awkward_weight(8, 64, torch.bfloat16)
    weight[5, 3] = bad
    assert native_rtn.rtn_channel(weight, 127) is None
    q, scale = qm.quantize_weight(weight, "channel")
    expected = torch_rtn(weight, 8)
    assert torch.equal(q[:5], expected[0][:5]) and torch.equal(scale[:5], expected[1][:5])


def test_without_a_working_compiler_quantization_falls_back_to_torch(tmp_path) -> None:
    """A fresh cache and a compiler that always fails: a one-line notice, the torch result, no leftovers."""
    script = (
        "import torch; from quantmint import quant_math as qm, native\n"
        "w = torch.randn(16, 40)\n"
        "assert native.library('rtn') is None\n"
        "q, s = qm.quantize_weight(w, 'channel')\n"
        "scale = qm.qparams_from_absmax(qm.weight_absmax(w, 'channel'))\n"
        "assert torch.equal(q, qm.quantize(w, scale)) and torch.equal(s, scale)\n"
    )
    env = {**os.environ, "CC": "false", "QUANTMINT_CACHE": str(tmp_path / "cache")}
    env.pop("QUANTMINT_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "native kernel 'rtn' unavailable, using torch instead (false failed" in done.stderr
    assert not list((tmp_path / "cache").glob("*")), "a failed build left a file behind"


def test_quantmint_native_0_turns_the_kernels_off(monkeypatch) -> None:
    monkeypatch.setenv("QUANTMINT_NATIVE", "0")
    assert native.library("rtn") is None
    assert native_rtn.rtn_channel(torch.randn(4, 8), 127) is None


@needs_compiler
def test_the_kernel_is_built_once_per_source_and_cpu(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QUANTMINT_CACHE", str(tmp_path))
    compiler = native._compiler()
    assert compiler is not None
    first = native._build("rtn", native._SOURCES / "rtn.c", compiler)
    mtime = first.stat().st_mtime_ns
    again = native._build("rtn", native._SOURCES / "rtn.c", compiler)
    assert again == first and again.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left


@needs_compiler
def test_a_kernel_built_for_one_cpu_is_not_reused_on_another(tmp_path, monkeypatch) -> None:
    # -march=native: a library built on an AMX or AVX-512 machine would fault (SIGILL) on another CPU
    # sharing the cache directory, so the CPU's feature flags are part of the cache key.
    monkeypatch.setenv("QUANTMINT_CACHE", str(tmp_path))
    compiler = native._compiler()
    assert compiler is not None
    if os.path.exists("/proc/cpuinfo"):
        assert native._cpu_signature().startswith(("flags", "Features"))
    here = native._build("rtn", native._SOURCES / "rtn.c", compiler)
    monkeypatch.setattr(native, "_cpu_signature", lambda: "flags\t\t: fpu sse sse2 avx avx2")
    other = native._build("rtn", native._SOURCES / "rtn.c", compiler)
    assert other != here and sorted(p.name for p in tmp_path.iterdir()) == sorted([here.name, other.name])


def _cpu_has_amx_bf16() -> bool:
    try:
        flags = native._cpu_signature().split()
    except OSError:
        return False
    return "amx_bf16" in flags and "amx_tile" in flags


@pytest.mark.skipif(_cpu_has_amx_bf16(), reason="this CPU has AMX-BF16: the AMX tests above cover it")
def test_amx_kernel_is_off_where_the_cpu_has_no_amx() -> None:
    # csrc/woq.c built with -march=native on a CPU without AMX compiles no tile instruction and says so;
    # W8A16 then runs csrc/w8a16.c (AVX-512 or AVX2+FMA) or torch, bf16 included.
    from quantmint.backends.torch import int8_weight_only as woq

    lib = woq.woq_library()
    if lib is not None:
        assert lib.qm_woq_available() == 0
    assert woq._woq_function() is None
    weight = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    assert not woq.amx_woq_supported(weight, torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()
    scale = torch.rand(64).bfloat16()
    want = x.float() @ (weight.float() * scale.float()[:, None]).t()  # |want| ~ 300: bf16 rounds ~1
    torch.testing.assert_close(
        woq.int8_weight_only_linear(x, weight, scale).float(), want, rtol=1e-2, atol=1.0
    )


# --- rounding as the weight is read (streaming RTN) ----------------------------------------------------
def _stored(tmp_path, weight: torch.Tensor, lead: int = 24, tail: int = 8):
    """`weight`'s bytes in a file between `lead` and `tail` bytes of other data: (path, offset)."""
    path = tmp_path / "weights.bin"
    raw = weight.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    path.write_bytes(b"h" * lead + raw + b"t" * tail)
    return path, lead


def _from_file(path, offset, weight, bits=8, strategy="channel", **kwargs):
    fd = os.open(path, os.O_RDONLY)
    try:
        shape = tuple(weight.shape)
        return native_rtn.quantize_weight_from_file(fd, offset, weight.dtype, shape, strategy, bits, **kwargs)
    finally:
        os.close(fd)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [8, 4])
# One row; rows in several chunks with a ragged last one; a row larger than a chunk.
@pytest.mark.parametrize("shape", [(1, 7), (300, 4096), (3, 200_000)])
def test_rounding_from_a_file_gives_the_in_memory_integers_and_scales(tmp_path, dtype, bits, shape) -> None:
    weight = awkward_weight(*shape, dtype)
    assert shape[0] * shape[1] * weight.element_size() > native_rtn._FILE_CHUNK or shape[0] == 1
    path, offset = _stored(tmp_path, weight)
    result = _from_file(path, offset, weight, bits)
    assert result is not None, "the native kernel did not run"
    expected = torch_rtn(weight, bits)
    assert torch.equal(result[0], expected[0]) and torch.equal(result[1], expected[1])


@needs_compiler
def test_rounding_from_a_file_splits_over_threads_and_writes_into_out(tmp_path) -> None:
    weight = awkward_weight(2 * native_rtn._NATIVE_SPLIT_ELEMENTS // 512 + 5, 512, torch.bfloat16, seed=2)
    path, offset = _stored(tmp_path, weight)
    out = torch.full(weight.shape, 99, dtype=torch.int8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        result = _from_file(path, offset, weight, out=out)
    finally:
        torch.set_num_threads(threads)
    assert result is not None and result[0] is out
    expected = torch_rtn(weight, 8)
    assert torch.equal(out, expected[0]) and torch.equal(result[1], expected[1])
    with pytest.raises(ValueError, match="contiguous int8 tensor of shape"):
        _from_file(path, offset, weight, out=torch.empty(weight.shape, dtype=torch.int16))


@needs_compiler
def test_rounding_from_a_file_declines_what_the_ordinary_read_must_handle(tmp_path) -> None:
    weight = awkward_weight(64, 256, torch.bfloat16)
    bad = weight.clone()
    bad[40, 7] = float("nan")
    path, offset = _stored(tmp_path, bad)
    assert _from_file(path, offset, bad) is None  # inf/NaN rows: torch decides
    path, offset = _stored(tmp_path, weight, tail=0)
    short = path.read_bytes()[:-100]
    path.write_bytes(short)
    assert _from_file(path, offset, weight) is None  # the file ends inside the weight
    path, offset = _stored(tmp_path, weight)
    assert _from_file(path, offset, weight, strategy="tensor") is None
    assert _from_file(path, offset, weight.to(torch.int16)) is None
    assert _from_file(path, offset, weight, bits=16) is None


# --- the AMX W8A16 kernel (csrc/woq.c) -----------------------------------------------------------------
def _amx_ready() -> bool:
    from quantmint.backends.torch import int8_weight_only

    return int8_weight_only._woq_function() is not None


needs_amx = pytest.mark.skipif(
    not _amx_ready(), reason="no AMX-BF16 here (or no C compiler): W8A16 uses csrc/w8a16.c or torch"
)


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize(("out_features", "in_features"), [(16, 32), (80, 96), (960, 576)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_amx_w8a16_kernel_matches_the_float32_product(rows, out_features, in_features, with_bias) -> None:
    from quantmint.backends.torch.int8_weight_only import amx_woq_linear, pack_weight_for_amx

    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = torch.rand(out_features, generator=generator) * 0.01
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    wide = torch.randn(rows, in_features + 32, generator=generator).bfloat16()
    x = wide[:, 7 : 7 + in_features]  # rows strided in memory
    y = amx_woq_linear(x, pack_weight_for_amx(weight), scale, bias)
    exact = (x.double() @ weight.double().t()) * scale.double() + (0 if bias is None else bias.double())
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    # float32 accumulation in another order, then one bf16 rounding: within one bf16 step
    assert torch.all((y.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-5)


@needs_amx
def test_amx_w8a16_kernel_gives_the_same_result_on_any_thread_count() -> None:
    from quantmint.backends.torch.int8_weight_only import amx_woq_linear, pack_weight_for_amx

    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (1040, 256), dtype=torch.int8, generator=generator)
    packed, scale = pack_weight_for_amx(weight), torch.rand(1040, generator=generator)
    x = torch.randn(3, 9, 256, generator=generator).bfloat16()
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(amx_woq_linear(x, packed, scale))
    finally:
        torch.set_num_threads(threads)
    assert results[0].shape == (3, 9, 1040)
    assert all(torch.equal(results[0], r) for r in results[1:])  # each output is one thread's work


def test_amx_packing_puts_each_element_where_the_kernel_reads_it() -> None:
    from quantmint.backends.torch.int8_weight_only import pack_weight_for_amx

    weight = (torch.arange(48 * 64) % 255 - 127).to(torch.int8).reshape(48, 64)
    packed = pack_weight_for_amx(weight)
    assert packed.shape == (3, 2, 16, 16, 2) and packed.dtype == torch.uint8
    for n, k in [(0, 0), (0, 1), (17, 33), (47, 63), (20, 2), (1, 63)]:
        assert int(packed[n // 16, k // 32, (k % 32) // 2, n % 16, k % 2]) == int(weight[n, k]) + 128
    assert sorted(packed.flatten().tolist()) == sorted((weight.flatten().int() + 128).tolist())


def test_amx_w8a16_kernel_refuses_what_it_cannot_serve() -> None:
    from quantmint.backends.torch.int8_weight_only import (
        amx_woq_linear,
        amx_woq_supported,
        pack_weight_for_amx,
    )

    weight = torch.zeros(64, 64, dtype=torch.int8)
    assert not amx_woq_supported(weight, torch.float32)
    assert not amx_woq_supported(weight, torch.float16)
    assert not amx_woq_supported(torch.zeros(64, 48, dtype=torch.int8), torch.bfloat16)  # in % 32
    assert not amx_woq_supported(torch.zeros(40, 64, dtype=torch.int8), torch.bfloat16)  # out % 16
    assert amx_woq_supported(weight, torch.bfloat16) == _amx_ready()
    weight[3, 5] = -128  # symmetric int8 from elsewhere: the torch path serves it
    assert not amx_woq_supported(weight, torch.bfloat16)
    with pytest.raises(ValueError, match=r"\[-127, 127\]; this one holds -128"):
        pack_weight_for_amx(weight)
    with pytest.raises(ValueError, match="bf16 activations"):
        amx_woq_linear(torch.randn(2, 64), torch.zeros(4, 2, 16, 16, 2, dtype=torch.int8), torch.ones(64))


@needs_amx
@pytest.mark.parametrize("rows", [16, 256])  # the decode path (one block of rows) and the panel path
def test_amx_kernel_widens_every_int8_value_exactly(rows) -> None:
    from quantmint.backends.torch.int8_weight_only import amx_woq_linear, pack_weight_for_amx

    values = torch.arange(-127, 128, dtype=torch.int8)
    weight = torch.cat([values, values[:1]]).reshape(1, 256).repeat(16, 1)
    y = amx_woq_linear(torch.eye(256)[:rows].bfloat16(), pack_weight_for_amx(weight), torch.ones(16))
    assert torch.equal(y.float().t(), weight[:, :rows].float())


@needs_amx
def test_amx_kernel_without_avx512_fp16_gives_the_same_results(tmp_path) -> None:
    # CPUs with AMX-BF16 but not AVX512-FP16 widen through float32: built here with that ISA extension
    # turned off, the kernel must agree bit for bit with the one quantmint built.
    import ctypes

    from quantmint.backends.torch import int8_weight_only as woq

    compiler = native._compiler()
    assert compiler is not None
    library = tmp_path / "woq-no-fp16.so"
    flags = [*native._flags(woq.WOQ_FLAGS), "-mno-avx512fp16"]
    subprocess.run([compiler, *flags, "-o", str(library), str(woq.WOQ_SOURCE)], check=True)
    lib = ctypes.CDLL(str(library))
    assert lib.qm_woq_available()
    fn = lib.qm_woq_linear_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
    generator = torch.Generator().manual_seed(5)
    weight = torch.randint(-127, 128, (80, 96), dtype=torch.int8, generator=generator)
    weight[0] = torch.arange(-127, -31).to(torch.int8)  # with the next two rows: every value
    weight[1] = torch.arange(-31, 65).to(torch.int8)
    weight[2, :63] = torch.arange(65, 128).to(torch.int8)
    packed, scale = woq.pack_weight_for_amx(weight), torch.rand(80, generator=generator)
    bias = torch.randn(80, generator=generator)
    for rows in (3, 40):  # the decode path and the panel path
        x = torch.randn(rows, 96, generator=generator).bfloat16()
        y = torch.empty(rows, 80, dtype=torch.bfloat16)
        pointers = (packed.data_ptr(), 80, scale.data_ptr(), bias.data_ptr(), y.data_ptr(), 80)
        assert fn(x.data_ptr(), rows, 96, 96, *pointers)
        assert torch.equal(y, woq.amx_woq_linear(x, packed, scale, bias)), rows
