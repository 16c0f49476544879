"""The native RTN kernel (`csrc/rtn.c`) against the torch passes it stands in for: same integers, same
scales, on every dtype, bit width and shape it takes, and a clean fallback where it cannot be used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from quantmint import native
from quantmint import quant_math as qm

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
    native_result = qm._native_rtn_channel(weight, 2 ** (bits - 1) - 1)
    assert native_result is not None, "the native kernel did not run"
    expected = torch_rtn(weight, bits)
    assert torch.equal(native_result[0], expected[0])
    assert torch.equal(native_result[1], expected[1])
    assert native_result[1].shape == (shape[0], 1)


@needs_compiler
def test_native_kernel_splits_large_weights_over_threads_with_the_same_result() -> None:
    weight = awkward_weight(2 * qm._NATIVE_SPLIT_ELEMENTS // 512 + 5, 512, torch.bfloat16, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = qm._native_rtn_channel(weight, 127)
        torch.set_num_threads(3)
        split = qm._native_rtn_channel(weight, 127)
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
    result = qm._native_rtn_channel(weight, 127)
    assert result is not None
    assert torch.equal(result[0], torch_rtn(weight, 8)[0]) and torch.equal(result[1], torch_rtn(weight, 8)[1])
    assert qm._native_rtn_channel(wide.t(), 127) is None  # columns not contiguous: torch's job


@needs_compiler
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_rows_with_inf_or_nan_are_left_to_torch(bad) -> None:
    weight = awkward_weight(8, 64, torch.bfloat16)
    weight[5, 3] = bad
    assert qm._native_rtn_channel(weight, 127) is None
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
    assert qm._native_rtn_channel(torch.randn(4, 8), 127) is None


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
