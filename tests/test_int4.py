"""4-bit weights: grouped scales, int32 packing, the W4A16 / W4A8 cells and their checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny, model_output

from quantmint.algorithms.ptq import PTQ, quantize
from quantmint.backends.torch import Int4Linear, Int4WeightOnlyLinear
from quantmint.formats.checkpoint import load_quantized, save_quantized
from quantmint.formats.summary import checkpoint_summary
from quantmint.numerics import quant_math


@pytest.mark.parametrize("cols", [8, 13, 64, 130])
def test_pack_unpack_round_trip(cols: int) -> None:
    q = torch.randint(-8, 8, (5, cols), dtype=torch.int8)
    packed = quant_math.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols // 8))
    assert torch.equal(quant_math.unpack_int4(packed, cols), q)


def test_pack_refuses_values_outside_int4() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        quant_math.pack_int4(torch.tensor([[9]], dtype=torch.int8))


def test_group_scales_cover_a_ragged_last_group() -> None:
    w = torch.randn(6, 200)
    q, scale = quant_math.quantize_weight(w, "group", num_bits=4, group_size=64)
    assert scale.shape == (6, 4) and int(q.abs().max()) == 7
    err = (quant_math.dequantize_weight(q, scale, group_size=64) - w).abs()
    # Round to nearest: at most half a step of the weight's own group.
    step = quant_math.expand_weight_scale(scale, w.shape, 64)
    assert torch.equal(step[:, 192:], scale[:, 3:].expand(6, 8))
    with pytest.raises(ValueError, match="needs its group_size"):
        quant_math.expand_weight_scale(scale, w.shape)
    assert bool((err <= step / 2 + 1e-6).all())
    assert float(scale[:, -1].min()) > 0


def test_groups_beat_one_scale_per_row() -> None:
    w = torch.randn(64, 512) * torch.linspace(0.1, 3, 512)
    per_row = quant_math.dequantize_weight(*quant_math.quantize_weight(w, "channel", 4))
    grouped = quant_math.dequantize_weight(*quant_math.quantize_weight(w, "group", 4, 128), group_size=128)
    assert quant_math.sqnr_db(w, grouped) > quant_math.sqnr_db(w, per_row) + 2


@pytest.mark.parametrize(
    ("config", "cell"),
    [
        ({"weight_dtype": "int4", "weights": {"strategy": "group", "group_size": 32}}, Int4WeightOnlyLinear),
        ({"weight_dtype": "int4"}, Int4WeightOnlyLinear),
        (
            {
                "weight_dtype": "int4",
                "activation_dtype": "int8",
                "weights": {"strategy": "group", "group_size": 32},
            },
            Int4Linear,
        ),
        ({"weight_dtype": "int4", "activation_dtype": "int8"}, Int4Linear),
    ],
)
def test_int4_cells_compute_what_fake_quant_did(config: dict, cell: type, input_ids: torch.Tensor) -> None:
    model = build_tiny("llama")
    ptq = PTQ({"mode": "quantize", **config})
    ptq.apply(model)
    fake = model_output(model, input_ids)
    ptq.convert(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, cell)
    real = model_output(model, input_ids)
    assert quant_math.sqnr_db(fake, real) > 60
    reference = model_output(build_tiny("llama"), input_ids)
    assert quant_math.sqnr_db(reference, real) > 15


def test_int4_checkpoint_is_half_of_int8_and_loads_exactly(tmp_path: Path, input_ids: torch.Tensor) -> None:
    w4 = save_quantized(quantize(build_tiny("llama"), "w4a16"), tmp_path / "w4")
    w8 = save_quantized(quantize(build_tiny("llama"), "w8a16"), tmp_path / "w8")
    s4, s8 = checkpoint_summary(w4), checkpoint_summary(w8)
    assert s4["scheme"] == "w4a16"
    assert s4["quantized_linear_bytes_bf16"] == s8["quantized_linear_bytes_bf16"]
    assert s4["layers"][0]["weight"].startswith("int4")
    # Half a byte per weight plus one float32 scale per row (per channel here): about half of int8.
    assert s4["quantized_linear_bytes"] < 0.6 * s8["quantized_linear_bytes"]
    model = quantize(build_tiny("llama"), "w4a16")
    assert torch.equal(model_output(model, input_ids), model_output(load_quantized(w4), input_ids))
