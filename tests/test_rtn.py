from __future__ import annotations

import pytest
import torch

from quantmint import PTQ, ConfigError, quant_state, quantize
from quantmint.backends.torch import Int8WeightOnlyLinear
from quantmint.cells import FakeQuantLinear
from quantmint.numerics.quant_math import sqnr_db
from tests.conftest import build_tiny, model_output

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "bert"]


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_w8a16_sqnr_vs_float(family: str, input_ids: torch.Tensor) -> None:
    model = build_tiny(family)
    ref = model_output(model, input_ids)
    quantize(model, "w8a16")
    out = model_output(model, input_ids)
    assert sqnr_db(ref, out) >= 35.0
    cells = [m for m in model.modules() if isinstance(m, Int8WeightOnlyLinear)]
    assert len(cells) == len(quant_state(model).modules) > 0
    assert all(c.weight.dtype == torch.int8 for c in cells)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_phase_predicts_the_converted_model(family: str, input_ids: torch.Tensor) -> None:
    model = build_tiny(family)
    ptq = PTQ("w8a16")
    ptq.apply(model)
    assert any(isinstance(m, FakeQuantLinear) for m in model.modules())
    fake = model_output(model, input_ids)
    ptq.convert(model)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    real = model_output(model, input_ids)
    assert sqnr_db(fake, real) > 80  # the same math, up to float rounding


def test_gpt2_conv1d_becomes_an_int8_cell_with_out_in_weight() -> None:
    model = build_tiny("gpt2")
    quantize(model, "w8a16")
    cell = model.transformer.h[0].attn.c_attn
    assert isinstance(cell, Int8WeightOnlyLinear)
    assert (cell.out_features, cell.in_features) == (192, 64)


def test_lm_head_and_outside_modules_stay_float() -> None:
    model = build_tiny("llama")
    quantize(model, "w8a16")
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert not any("lm_head" in name for name in quant_state(model).modules)


@pytest.mark.parametrize(
    ("pattern", "kept"),
    [
        ("down_proj", {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
        ("model.layers.1.self_attn.q_proj", {"model.layers.1.self_attn.q_proj"}),
        (
            "re:model\\.layers\\.0\\..*",
            {
                f"model.layers.0.{p}"
                for p in (
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                )
            },
        ),
    ],
)
def test_ignore_list_is_honoured(pattern: str, kept: set[str]) -> None:
    model = build_tiny("llama")
    quantize(model, {"ignore": ["lm_head", pattern]})
    for name in kept:
        assert isinstance(model.get_submodule(name), torch.nn.Linear), name
        assert name not in quant_state(model).modules
    assert len(quant_state(model).modules) == 14 - len(kept)


def test_ignoring_everything_is_an_error() -> None:
    with pytest.raises(ConfigError, match="nothing is left to quantize"):
        quantize(build_tiny("llama"), {"ignore": ["re:.*"]})


def test_per_tensor_weights(input_ids: torch.Tensor) -> None:
    model = build_tiny("llama")
    ref = model_output(model, input_ids)
    quantize(model, {"weights": {"strategy": "tensor"}})
    cell = model.model.layers[0].self_attn.q_proj
    assert cell.weight_scale.shape == (1, 1)
    assert sqnr_db(ref, model_output(model, input_ids)) > 25


def test_quantizing_twice_is_refused() -> None:
    model = build_tiny("llama")
    quantize(model, "w8a16")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(model, "w8a16")


def test_bf16_model(input_ids: torch.Tensor) -> None:
    model = build_tiny("llama").to(torch.bfloat16)
    ref = model_output(model, input_ids).float()
    quantize(model, "w8a16")
    out = model_output(model, input_ids)
    assert out.dtype == torch.bfloat16
    assert sqnr_db(ref, out.float()) > 25  # bf16 itself limits this
