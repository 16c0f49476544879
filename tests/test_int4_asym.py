"""Asymmetric 4-bit weights (zero points): math, RTN, GPTQ per layer, cells, checkpoint round trip and
its refusals, `quantmint inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, model_output

from quantmint.algorithms.ptq import PTQ, quantize
from quantmint.backends.torch import Int4WeightOnlyLinear
from quantmint.config import PTQConfig
from quantmint.errors import CheckpointError, ConfigError
from quantmint.formats.checkpoint import load_quantized, save_quantized
from quantmint.formats.summary import checkpoint_summary
from quantmint.numerics import quant_math

ASYM_G32 = {
    "mode": "quantize",
    "weight_dtype": "int4",
    "weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32},
}


def test_zero_points_pack_along_the_output_dimension() -> None:
    zp = torch.randint(0, 16, (13, 5), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = quant_math.pack_zero_points(zp)
    assert packed.dtype == torch.int32 and packed.shape == (2, 5)
    assert torch.equal(quant_math.unpack_zero_points(packed, 13), zp)
    # Row r in nibble r % 8 of word r // 8 of its column; padding nibbles 0.
    assert int(packed[1, 2]) & 0xF == int(zp[8, 2]) and (int(packed[1, 2]) >> 20) == 0
    q = torch.randint(0, 16, (3, 19), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(quant_math.unpack_uint4(quant_math.pack_uint4(q), 19), q)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        quant_math.pack_uint4(q - 1)


@pytest.mark.parametrize(("strategy", "group_size"), [("group", 32), ("channel", None)])
def test_asymmetric_rtn_beats_symmetric_on_a_skewed_weight(strategy: str, group_size: int | None) -> None:
    """Each row mostly positive (an offset of ~2 standard deviations): the symmetric grid wastes its
    negative half; the zero point does not."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02 + 0.04 * torch.rand(64, 1, generator=g) + 0.02
    w[:, 5] = 0.0
    q, scale, zp = quant_math.quantize_weight_asymmetric(w, strategy, 4, group_size)
    assert q.dtype == torch.int8 and int(q.min()) >= 0 and int(q.max()) <= 15
    assert zp.shape == scale.shape and int(zp.min()) >= 0 and int(zp.max()) <= 15
    asym = quant_math.dequantize_weight(q, scale, torch.float32, group_size, zp)
    sym = quant_math.dequantize_weight(
        *quant_math.quantize_weight(w, strategy, 4, group_size), group_size=group_size
    )
    sqnr_asym, sqnr_sym = quant_math.sqnr_db(w, asym), quant_math.sqnr_db(w, sym)
    print(strategy, round(sqnr_asym, 2), round(sqnr_sym, 2))
    assert sqnr_asym > sqnr_sym + 3
    # Rounding error at most half a step, and 0 exact (the range holds 0).
    step = quant_math.expand_weight_scale(scale, w.shape, group_size)
    assert bool(((w - asym).abs() <= step / 2 + 1e-6).all())
    assert float(asym[:, 5].abs().max()) == 0.0


def test_config_accepts_asymmetric_w4a16_only() -> None:
    config = PTQConfig.from_dict(ASYM_G32)
    assert config.scheme_name == "w4a16-asym"
    assert PTQConfig.from_yaml(config.to_yaml()) == config
    assert PTQConfig.from_dict({**ASYM_G32, "gptq": {}}).scheme_name == "w4a16-asym-gptq"
    for bad, words in [
        ({"weight_dtype": "int8", "weights": {"symmetric": False}}, "4-bit only"),
        ({**ASYM_G32, "activation_dtype": "int8"}, "weight-only"),
        ({**ASYM_G32, "block_ptq": {}}, "block PTQ"),
    ]:
        with pytest.raises((ConfigError, ValueError), match=words) as info:
            PTQConfig.from_dict(bad)
        assert "symmetric: true" in str(info.value) and "\n" not in str(info.value)
    # MindFormers' block carries it in algorithm_args, next to quantmint's group_size extension.
    block = PTQConfig.from_dict(ASYM_G32).to_mindformers()
    assert block["algorithm_args"] == {"group_size": 32, "symmetric": False}
    assert PTQConfig.from_mindformers(block) == config


@pytest.mark.parametrize("preset", ["w4a16-asym"])
def test_asymmetric_cells_compute_what_fake_quant_did(preset: str, input_ids: torch.Tensor) -> None:
    model = build_tiny("llama")
    ptq = PTQ(preset)
    ptq.apply(model)
    fake = model_output(model, input_ids)
    ptq.convert(model)
    cell = model.model.layers[0].self_attn.q_proj
    assert isinstance(cell, Int4WeightOnlyLinear) and cell.weight_zero_point is not None
    assert cell.weight_zero_point.dtype == torch.int32
    assert cell.weight_zero_point.shape == (-(-cell.out_features // 8), cell.weight_scale.shape[1])
    real = model_output(model, input_ids)
    assert quant_math.sqnr_db(fake, real) > 60
    # The cell's weight is (q - zp) * s exactly.
    q, zp = cell.weight, cell.zero_point
    assert zp is not None
    want = (q.float() - quant_math.expand_weight_scale(zp, q.shape, cell.group_size).float()) * (
        quant_math.expand_weight_scale(cell.weight_scale, q.shape, cell.group_size)
    )
    assert torch.equal(cell.dequantized_weight(), want)
    assert quant_math.sqnr_db(model_output(build_tiny("llama"), input_ids), real) > 15


def test_asymmetric_checkpoint_round_trip_and_inspect(tmp_path: Path, input_ids: torch.Tensor) -> None:
    out = save_quantized(quantize(build_tiny("llama"), ASYM_G32), tmp_path / "asym")
    model = quantize(build_tiny("llama"), ASYM_G32)
    loaded = load_quantized(out)
    assert torch.equal(model_output(model, input_ids), model_output(loaded, input_ids))
    summary = checkpoint_summary(out)
    assert summary["scheme"] == "w4a16-asym"
    layer = summary["layers"][0]
    assert layer["weight"].startswith("uint4+zp") and layer["zero_points"] is True
    sym = checkpoint_summary(save_quantized(quantize(build_tiny("llama"), "w4a16"), tmp_path / "sym"))
    assert sym["layers"][0]["zero_points"] is False


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit the tensors of a one-shard checkpoint and re-sign it (sha256 in the manifest), as a tool that
    rewrote it would: only the value checks can catch the edit."""
    from safetensors.torch import load_file, save_file

    from quantmint.formats.checkpoint import MANIFEST_NAME, _sha256

    shard = path / "model.safetensors"
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["shards"]["model.safetensors"] = {"sha256": _sha256(shard), "bytes": shard.stat().st_size}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("tamper", ["unpacked", "dropped", "added_to_symmetric"])
def test_tampered_zero_points_are_refused_in_one_line(tmp_path: Path, tamper: str) -> None:
    name = "model.layers.0.self_attn.q_proj.weight_zero_point"
    config = "w4a16" if tamper == "added_to_symmetric" else ASYM_G32
    out = save_quantized(quantize(build_tiny("llama"), config), tmp_path / "ckpt")

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        if tamper == "unpacked":  # int8 [out, groups] instead of compressed-tensors' packed int32
            tensors[name] = quant_math.unpack_zero_points(tensors[name], 64)
        elif tamper == "dropped":
            del tensors[name]
        else:
            tensors[name] = torch.zeros(8, 2, dtype=torch.int32)

    _rewrite(out, edit)
    with pytest.raises(CheckpointError) as info:
        load_quantized(out)
    message = str(info.value)
    assert "weight_zero_point" in message and "\n" not in message
    print(message)


def test_symmetric_checkpoint_still_refuses_the_code_minus_8(tmp_path: Path) -> None:
    """The nibble 0 is a code of asymmetric weights but -8 of symmetric ones (never written)."""
    out = save_quantized(quantize(build_tiny("llama"), "w4a16"), tmp_path / "ckpt")
    name = "model.layers.0.self_attn.q_proj.weight_packed"
    _rewrite(out, lambda t: t[name].__setitem__((0, 0), 0))
    with pytest.raises(CheckpointError, match="code -8"):
        load_quantized(out)
