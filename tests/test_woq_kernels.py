"""The W8A16 SIMD kernels (backends/torch/csrc/w8a16.c): each ISA path this CPU can run, built from the one
source with the ISA capped by compiler flags, held to the torch reference F.linear(x, w.float()) * scale +
bias. Tolerances hold across kernels (float32 sums in any order), never bit-for-bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantmint.backends.torch import int8_weight_only as woq
from quantmint.numerics import native


def _cpu_flags() -> set[str]:
    try:
        return set(native._cpu_signature().split())
    except OSError:
        return set()


FLAGS = _cpu_flags()
# (path, compiler flags that cap the ISA to it, the isa the library must report, whether it runs vdpbf16ps
# on bf16, CPU flags it needs)
PATHS = {
    "avx512bf16": (("-DQM_WANT_BF16DOT",), 512, True, {"avx512f", "avx512bw", "avx512_bf16"}),
    "avx512": (("-mno-avx512bf16",), 512, False, {"avx512f"}),
    "avx2": (("-mno-avx512f",), 256, False, {"avx2", "fma"}),
}


def _kernel(path: str) -> woq.SimdKernel:
    flags, isa, bf16dot, needs = PATHS[path]
    if not needs <= FLAGS:
        pytest.skip(f"this CPU has no {'/'.join(sorted(needs - FLAGS))}: the {path} path cannot run here")
    if native._compiler() is None:
        pytest.skip("no C compiler: W8A16 runs its torch path")
    kernel = woq.simd_woq_kernel(flags)
    assert kernel is not None, f"csrc/w8a16.c did not build for the {path} path"
    assert kernel.isa == isa and kernel.panel == 2 * isa // 32 and kernel.bf16dot == bf16dot
    return kernel


def _reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    y = F.linear(x.double(), weight.double()) * scale.double()
    return y if bias is None else y + bias.double()


def _check(y: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == want.shape
    if dtype == torch.float32:
        # float32 sums in another order than the reference: far below 1e-4 of the largest output
        assert (y.double() - want).abs().max() <= 1e-4 * want.abs().max() + 1e-30
    else:
        # one rounding of a float32 result to bf16: within one bf16 ulp of the exact value
        assert torch.all((y.double() - want).abs() <= want.abs() * 2**-7 + 1e-4 * want.abs().max())


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 16, 17, 200])
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 1), (37, 53), (80, 96), (200, 333)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_matches_the_torch_reference(path, dtype, rows, out_features, in_features, with_bias) -> None:
    kernel = _kernel(path)
    generator = torch.Generator().manual_seed(rows * 7919 + out_features * 31 + in_features)
    weight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = torch.rand(out_features, generator=generator) * 0.01 + 1e-3
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    wide = torch.randn(rows, in_features + 9, generator=generator).to(dtype)
    x = wide[:, 5 : 5 + in_features]  # rows strided in memory
    y = woq.simd_woq_linear(x, woq.pack_weight_for_simd(weight, kernel), scale, bias, kernel)
    _check(y, _reference(x, weight, scale, bias), dtype)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_takes_3d_and_transposed_activations(path, dtype) -> None:
    kernel = _kernel(path)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (45, 70), dtype=torch.int8, generator=generator)
    scale = torch.rand(45, generator=generator)
    packed = woq.pack_weight_for_simd(weight, kernel)
    x3 = torch.randn(2, 5, 70, generator=generator).to(dtype)
    y3 = woq.simd_woq_linear(x3, packed, scale, None, kernel)
    assert y3.shape == (2, 5, 45)
    _check(y3, _reference(x3, weight, scale, None), dtype)
    xt = torch.randn(70, 6, generator=generator).to(dtype).t()  # columns strided: copied first
    _check(woq.simd_woq_linear(xt, packed, scale, None, kernel), _reference(xt, weight, scale, None), dtype)
    assert woq.simd_woq_linear(xt[:0], packed, scale, None, kernel).shape == (0, 45)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("rows", [2, 4, 40])  # registers as it goes (decode), widened panels (bf16 pairs)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_widens_every_int8_value_exactly(path, rows, dtype) -> None:
    kernel = _kernel(path)
    values = torch.arange(-128, 128, dtype=torch.int8)
    weight = values.reshape(1, 256).repeat(33, 1)
    y = woq.simd_woq_linear(
        torch.eye(256, dtype=dtype)[:rows],
        woq.pack_weight_for_simd(weight, kernel),
        torch.ones(33),
        None,
        kernel,
    )
    assert torch.equal(y.t(), weight[:, :rows].to(dtype))


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gives_the_same_result_on_any_thread_count(path, dtype) -> None:
    kernel = _kernel(path)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (1040, 256), dtype=torch.int8, generator=generator)
    packed, scale = woq.pack_weight_for_simd(weight, kernel), torch.rand(1040, generator=generator)
    x = torch.randn(3, 9, 256, generator=generator).to(dtype)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(woq.simd_woq_linear(x, packed, scale, None, kernel))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])  # each output is one thread's work


@pytest.mark.parametrize(
    ("vendor", "flags", "env", "want"),
    [
        ("AuthenticAMD", {"avx512f", "avx512_bf16"}, None, True),  # Zen 4: measured 1.2-2x the float32 path
        ("GenuineIntel", {"avx512f", "avx512_bf16", "amx_bf16"}, None, False),  # measured slower there
        ("AuthenticAMD", {"avx512f", "avx2"}, None, False),  # Zen 3 / Zen 4 without the flag
        ("AuthenticAMD", {"avx512f", "avx512_bf16"}, "0", False),
        ("GenuineIntel", {"avx512f", "avx512_bf16"}, "1", True),
    ],
)
def test_bf16dot_is_the_default_where_it_measured_faster(monkeypatch, vendor, flags, env, want) -> None:
    monkeypatch.setattr(native, "cpu_features", lambda: (vendor, frozenset(flags)))
    if env is None:
        monkeypatch.delenv(woq.BF16DOT_ENV, raising=False)
    else:
        monkeypatch.setenv(woq.BF16DOT_ENV, env)
    assert woq.bf16dot_by_default() is want


def test_a_bad_bf16dot_setting_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(woq.BF16DOT_ENV, "yes")
    with pytest.raises(ValueError, match="QUANTMINT_W8A16_BF16DOT='yes': set it to 1"):
        woq.bf16dot_by_default()


def test_this_cpus_own_kernel_follows_the_default() -> None:
    kernel = woq.simd_woq_kernel()
    if kernel is None:
        pytest.skip("no AVX2/AVX-512 W8A16 kernel here (CPU or compiler)")
    has_bf16 = kernel.isa == 512 and "avx512_bf16" in FLAGS and "avx512bw" in FLAGS
    assert kernel.bf16dot == (has_bf16 and woq.bf16dot_by_default())


def test_packing_puts_each_element_where_the_kernel_reads_it() -> None:
    class Fake:  # the layout depends only on the panel width
        panel = 16

    weight = (torch.arange(37 * 5) % 255 - 127).to(torch.int8).reshape(37, 5)
    packed = woq.pack_weight_for_simd(weight, Fake())  # type: ignore[arg-type]
    assert packed.shape == (3, 5, 16) and packed.dtype == torch.int8
    for n in range(37):
        for k in range(5):
            assert int(packed[n // 16, k, n % 16]) == int(weight[n, k])
    assert int(packed[2, :, 5:].abs().sum()) == 0  # the last panel padded with zeros


def test_without_avx2_the_source_builds_no_kernel_and_torch_serves() -> None:
    if native._compiler() is None:
        pytest.skip("no C compiler")
    assert woq.simd_woq_kernel(("-mno-avx2", "-mno-avx512f")) is None
    with pytest.raises(ValueError, match="check simd_woq_supported first"):
        woq.simd_woq_linear(
            torch.randn(2, 8, dtype=torch.float16), torch.zeros(1, 8, 32, dtype=torch.int8), torch.ones(8)
        )


def test_native_disabled_leaves_the_torch_path(monkeypatch) -> None:
    monkeypatch.setenv("QUANTMINT_NATIVE", "0")
    monkeypatch.setattr(woq, "_SIMD", {})
    monkeypatch.setattr(woq, "_WOQ", {})
    monkeypatch.setattr(native, "_LOADED", {})
    weight = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    assert woq.simd_woq_kernel() is None
    assert not woq.simd_woq_supported(weight, torch.float32)
    cell = woq.Int8WeightOnlyLinear(weight, torch.rand(24, 1))
    assert cell.kernel_for(torch.float32) == "torch"
    x = torch.randn(3, 40)
    _check(cell(x), _reference(x, weight, cell.weight_scale.reshape(-1), None), torch.float32)


def _native_name() -> str:
    kernel = woq.simd_woq_kernel()
    return {512: "avx512", 256: "avx2"}.get(kernel.isa, "torch") if kernel is not None else "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_runtime_cell_picks_amx_then_simd_then_torch(dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=generator)
    scale, bias = torch.rand(48, 1, generator=generator) * 0.01, torch.randn(48, generator=generator)
    cell = woq.Int8WeightOnlyLinear(weight.clone(), scale, bias.to(dtype))
    if dtype == torch.float16:
        want = "torch"
    elif dtype == torch.bfloat16 and woq.amx_woq_supported(weight, dtype):
        want = "amx"
    else:
        want = _native_name()
    assert cell.kernel_for(dtype) == want
    x = torch.randn(2, 3, 64, generator=generator).to(dtype)
    with torch.inference_mode():
        y = cell(x)
    exact = _reference(x, weight, scale.reshape(-1), bias.to(dtype))
    if dtype == torch.float32:
        _check(y, exact, dtype)
    else:  # the torch path rounds x @ q.T to the dtype before scaling: two roundings
        assert torch.all((y.double() - exact).abs() <= exact.abs() * 2**-6 + 2e-3 * exact.abs().max())
    # a weight written in place is packed again, never served stale
    cell.weight.copy_(-cell.weight)
    with torch.inference_mode():
        flipped = cell(x)
    exact = _reference(x, -weight, scale.reshape(-1), bias.to(dtype))
    assert torch.all((flipped.double() - exact).abs() <= exact.abs() * 2**-6 + 2e-3 * exact.abs().max())


@pytest.mark.slow  # importing vLLM takes 10-50 s
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_vllm_w8a16_method_repacks_at_load_and_runs_the_simd_kernel(dtype) -> None:
    pytest.importorskip("vllm")
    from quantmint.backends.vllm.linear import W8A16LinearMethod

    generator = torch.Generator().manual_seed(2)
    weight = torch.randint(-127, 128, (50, 70), dtype=torch.int8, generator=generator)
    scale, bias = torch.rand(50, 1, generator=generator) * 0.01, torch.randn(50, generator=generator)
    method, layer = W8A16LinearMethod(), torch.nn.Module()
    # what create_weights leaves (its vLLM parameters need a tensor-parallel group), as loaded
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scale.clone(), requires_grad=False)
    layer.quantmint_dtype = dtype
    method.process_weights_after_loading(layer)
    amx = layer.quantmint_amx
    assert layer.quantmint_simd == (not amx and _native_name() != "torch")
    x = torch.randn(3, 70, generator=generator).to(dtype)
    y = method.apply(layer, x, bias.to(dtype))
    exact = _reference(x, weight, scale.reshape(-1), bias.to(dtype))
    if layer.quantmint_simd or (amx and dtype == torch.bfloat16):
        _check(y, exact, dtype)
    else:
        assert torch.all((y.double() - exact).abs() <= exact.abs() * 2**-6 + 2e-3 * exact.abs().max())
