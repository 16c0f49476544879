from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantmint.numerics import quant_math as qm


def test_int_ranges() -> None:
    assert qm.int_range(8, symmetric=True) == (-127, 127)
    assert qm.int_range(8, symmetric=False) == (-128, 127)


@pytest.mark.parametrize(
    ("granularity", "scale_shape"), [("channel", (6, 1)), ("token", (6, 1)), ("tensor", ())]
)
def test_scale_shapes(granularity: str, scale_shape: tuple) -> None:
    x = torch.randn(6, 10)
    q, scale = qm.quantize_symmetric(x, granularity)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape


def test_largest_value_of_each_row_maps_to_127() -> None:
    x = torch.randn(8, 32)
    q, _ = qm.quantize_symmetric(x, "channel")
    assert torch.equal(q.abs().amax(dim=1), torch.full((8,), 127, dtype=torch.int8))


def test_zero_rows_stay_zero() -> None:
    x = torch.zeros(3, 4)
    q, scale = qm.quantize_symmetric(x, "channel")
    assert torch.equal(q, torch.zeros_like(q, dtype=torch.int8))
    assert torch.all(scale > 0)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 8),
    cols=st.integers(1, 64),
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_at_most_half_a_step(rows: int, cols: int, magnitude: float, seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(rows, cols) * magnitude
    q, scale = qm.quantize_symmetric(x, "channel")
    err = (qm.dequantize(q, scale) - x).abs()
    assert torch.all(err <= scale * 0.5 + 1e-6 * magnitude)


def test_affine_qparams_represent_zero_exactly() -> None:
    x = torch.rand(4, 16) * 3 + 0.5  # all positive: the range is widened to include 0
    lo, hi = qm.minmax(x, "channel")
    scale, zp = qm.qparams_from_minmax(lo, hi)
    assert zp.dtype == torch.int32
    q = qm.quantize(torch.zeros(4, 1), scale, zp)
    assert torch.allclose(qm.dequantize(q, scale, zp), torch.zeros(4, 1))
    recon = qm.dequantize(qm.quantize(x, scale, zp), scale, zp)
    assert (recon - x).abs().max() <= scale.max() * 0.5 + 1e-6


def test_fake_quantize_keeps_dtype_and_sqnr() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    fq = qm.fake_quantize(w, "channel")
    assert fq.dtype == torch.bfloat16
    # 8-bit RTN of Gaussian rows: about 6 dB per bit minus the peak-to-rms loss, so ~38 dB
    assert qm.sqnr_db(w.float(), fq.float()) > 35


def test_sqnr() -> None:
    x = torch.ones(10)
    assert qm.sqnr_db(x, x) == float("inf")
    assert qm.sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)


def test_unknown_granularity() -> None:
    with pytest.raises(ValueError, match="granularity"):
        qm.absmax(torch.ones(2, 2), "group")


def test_row_absmax_is_the_inf_norm_of_each_row() -> None:
    """The per-token absmax of activation rounding: equal to torch's inf-norm, NaN and inf included."""
    torch.manual_seed(0)
    x = torch.randn(7, 33) * 5
    x[1] = float("nan")
    x[2, 3] = float("-inf")
    x[3] = 0.0
    x[4] = -1.5  # a row whose largest magnitude is negative
    want = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)
    got = qm.row_absmax(x)
    assert got.shape == (7, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got[1]).all() and float(got[2]) == float("inf") and float(got[4]) == 1.5
    assert not torch.signbit(got[3]).any()  # an all-zero row: +0.0, as the inf-norm
    assert qm.row_absmax(x, keepdim=False).shape == (7,)
