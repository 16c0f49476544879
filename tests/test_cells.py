from __future__ import annotations

import pytest
import torch

from quantmint.backends.torch import Int8WeightOnlyLinear, int8_weight_only_linear
from quantmint.cells import FakeQuantLinear
from quantmint.numerics import quant_math


def _cell(
    out_features: int = 48, in_features: int = 80, bias: bool = True
) -> tuple[Int8WeightOnlyLinear, torch.nn.Linear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    q, scale = quant_math.quantize_symmetric(linear.weight.data, "channel")
    fake = FakeQuantLinear(quant_math.dequantize(q, scale), linear.bias, scale, "w8a16")
    return Int8WeightOnlyLinear.from_fake_quant(fake), linear


@pytest.mark.parametrize("shape", [(1, 80), (5, 80), (2, 7, 80)])
def test_matches_dequantized_reference_fp32(shape: tuple[int, ...]) -> None:
    cell, _ = _cell()
    x = torch.randn(*shape)
    ref = torch.nn.functional.linear(x, cell.dequantized_weight(), cell.bias)
    out = cell(x)
    assert out.shape == (*shape[:-1], 48) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_activations() -> None:
    cell, _ = _cell()
    x = torch.randn(4, 80)
    out = cell(x.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.linear(x, cell.dequantized_weight(), cell.bias)
    assert quant_math.sqnr_db(ref, out.float()) > 35


def test_close_to_float_linear() -> None:
    cell, linear = _cell(bias=False)
    x = torch.randn(16, 80)
    assert quant_math.sqnr_db(linear(x), cell(x)) > 35


def test_float64_falls_back_to_dequantize() -> None:
    cell, _ = _cell()
    x = torch.randn(3, 80, dtype=torch.float64)
    ref = torch.nn.functional.linear(x, cell.dequantized_weight().double(), cell.bias.double())
    out = int8_weight_only_linear(x, cell.weight, cell.weight_scale.reshape(-1).double(), cell.bias.double())
    assert out.dtype == torch.float64 and torch.allclose(out, ref)


def test_tensor_names_follow_compressed_tensors() -> None:
    cell, _ = _cell()
    sd = cell.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.int8 and sd["weight_scale"].shape == (48, 1)


def test_empty_then_load_reproduces_the_cell() -> None:
    cell, _ = _cell()
    empty = Int8WeightOnlyLinear.empty(80, 48, True, torch.float32, (48, 1))
    x = torch.randn(2, 80)
    empty(x)  # fills the scale cache with garbage, which loading must clear
    empty.load_state_dict(cell.state_dict())
    assert torch.equal(empty(x), cell(x))


def test_rejects_float_weight() -> None:
    with pytest.raises(ValueError, match="int8"):
        Int8WeightOnlyLinear(torch.randn(4, 4), torch.ones(4, 1))


@pytest.mark.parametrize(
    ("dtype", "rows", "out_features", "in_features"),
    [
        (torch.bfloat16, 1, 48, 80),  # fused int8pack kernel (in % 16 == 0)
        (torch.bfloat16, 1, 48, 72),  # in % 16 != 0: the fused bf16 kernel is unsafe, cast path instead
        (torch.bfloat16, 16, 48, 80),  # cast path
        (torch.float16, 2, 48, 64),
        (torch.float32, 1, 2048, 2048),  # large fp32 layer, one row: fused kernel
        (torch.float32, 3, 2048, 2048),
    ],
)
def test_every_kernel_path_matches_the_reference(dtype, rows, out_features, in_features) -> None:
    cell, _ = _cell(out_features, in_features)
    x = torch.randn(rows, in_features)
    ref = torch.nn.functional.linear(x.double(), cell.dequantized_weight().double(), cell.bias.double())
    out = cell(x.to(dtype))
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert quant_math.sqnr_db(ref, out.double()) > (100 if dtype == torch.float32 else 35)


def test_weight_only_cell_refuses_a_static_input_scale() -> None:
    with pytest.raises(ValueError, match="w8a8"):
        Int8WeightOnlyLinear.empty(8, 4, False, torch.float32, (4, 1), static_input=True)
