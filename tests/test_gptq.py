"""GPTQ (`quantmint.algorithms.gptq`): measured against RTN on tiny seeded models, its config, presets,
checkpoint round trip and composition with SmoothQuant."""

from __future__ import annotations

import math

import pytest
import torch

from quantmint import PTQ, ConfigError, PTQConfig, load_quantized, quantize, save_quantized
from quantmint.algorithms.gptq import GPTQRounding, gptq_quantize
from quantmint.cells import FakeQuantLinear
from quantmint.config import QuantArgs, get_preset
from quantmint.config.steps import GPTQArgs, GPTQConfig
from quantmint.extension import registry
from quantmint.extension.family import resolve_layout
from quantmint.numerics import native_gptq, quant_math
from quantmint.numerics.quant_math import sqnr_db
from tests.conftest import VOCAB, build_tiny, model_output

GRIDS = {
    "int4-g128": dict(weight_dtype="int4", weights={"strategy": "group", "group_size": 128}),
    "int4-g32": dict(weight_dtype="int4", weights={"strategy": "group", "group_size": 32}),
    "int8-channel": dict(weight_dtype="int8", weights={"strategy": "channel"}),
    "int4-asym-g32": dict(
        weight_dtype="int4", weights={"symmetric": False, "strategy": "group", "group_size": 32}
    ),
    "int4-asym-channel": dict(weight_dtype="int4", weights={"symmetric": False, "strategy": "channel"}),
}


def _calibration(n: int = 16, length: int = 32, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


def _linear_inputs(model: torch.nn.Module, calibration: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every family linear's input over the calibration samples, in the float model: [tokens, in]."""
    layout = resolve_layout(model, registry.find_family(model))
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, []).append(
                args[0].reshape(-1, args[0].shape[-1])
            )
        )
        for name, module in layout.linears()
    ]
    with torch.no_grad():
        for sample in calibration:
            model(input_ids=sample[None])
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs).double() for name, xs in seen.items()}


def _layer_errors(family: str, grid: dict, actorder: bool) -> dict[str, tuple[float, float]]:
    """Per target linear: (||X W^T - X Q^T|| of GPTQ, the same of RTN) on the float model's calibration
    inputs (GPTQ with float inputs to every block, so each layer saw exactly these inputs)."""
    calibration = _calibration()
    float_model = build_tiny(family)
    inputs = _linear_inputs(float_model, calibration)
    adapter = registry.find_family(float_model).adapter
    weights = {n: adapter.weight(float_model.get_submodule(n)).detach().double() for n in inputs}
    gptq = build_tiny(family)
    config = PTQConfig(**grid, gptq=GPTQArgs(actorder=actorder, sequential=False))
    PTQ(config).apply(gptq, calibration=calibration)
    rtn = build_tiny(family)
    PTQ(PTQConfig(**grid)).apply(rtn, calibration=calibration)
    errors = {}
    for name, x in inputs.items():
        fake_g, fake_r = gptq.get_submodule(name), rtn.get_submodule(name)
        if not isinstance(fake_g, FakeQuantLinear):
            continue  # ignored (lm_head)
        ref = x @ weights[name].T
        errors[name] = tuple(
            float((ref - x @ fake.weight.detach().double().T).norm()) for fake in (fake_g, fake_r)
        )
    return errors


@pytest.mark.parametrize("actorder", [False, True], ids=["plain", "actorder"])
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gptq_beats_rtn_on_every_layer(family: str, grid: str, actorder: bool) -> None:
    errors = _layer_errors(family, GRIDS[grid], actorder)
    assert errors
    ratios = {name: g / r for name, (g, r) in errors.items()}
    print(family, grid, actorder, {k.split(".", 2)[-1]: round(v, 3) for k, v in ratios.items()})
    worse = {name: ratio for name, ratio in ratios.items() if not ratio < 1.0}
    assert not worse, f"GPTQ's output error is not below RTN's on {worse}"
    assert sum(ratios.values()) / len(ratios) < 0.9


def test_gptq_quantize_unit_properties() -> None:
    """On quantmint's grid (same scale shapes as RTN), integers in range, a dead column gives no NaN,
    and the layer's output error beats RTN's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=g, dtype=torch.float64) @ torch.randn(
        96, 96, generator=g, dtype=torch.float64
    )
    x[:, 7] = 0.0  # a dead input column
    weight = torch.randn(48, 96, generator=g)
    hessian = 2.0 / x.shape[0] * x.T @ x
    for args in (
        QuantArgs(num_bits=4, strategy="group", group_size=32),
        QuantArgs(num_bits=8, strategy="channel"),
        QuantArgs(num_bits=4, strategy="tensor"),
        QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
        QuantArgs(num_bits=4, symmetric=False, strategy="channel"),
    ):
        for actorder in (False, True):
            q, scale, zp = gptq_quantize(weight, hessian, args, block_size=32, actorder=actorder)
            if args.symmetric:
                q_rtn, scale_rtn = quant_math.quantize_weight(
                    weight, args.strategy, args.num_bits, args.group_size
                )
                zp_rtn = None
                assert zp is None and int(q.abs().max()) <= 2 ** (args.num_bits - 1) - 1
            else:
                q_rtn, scale_rtn, zp_rtn = quant_math.quantize_weight_asymmetric(
                    weight, args.strategy, args.num_bits, args.group_size
                )
                assert zp is not None and zp.dtype == torch.int8 and zp.shape == scale.shape
                assert int(q.min()) >= 0 and int(q.max()) <= 15 and int(zp.min()) >= 0 and int(zp.max()) <= 15
            assert q.dtype == torch.int8 and q.shape == weight.shape and scale.shape == scale_rtn.shape
            assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
            deq = quant_math.dequantize_weight(q, scale, torch.float64, args.group_size, zp)
            deq_rtn = quant_math.dequantize_weight(q_rtn, scale_rtn, torch.float64, args.group_size, zp_rtn)
            assert (
                float(deq[:, 7].abs().max()) == 0.0
            )  # the dead column's weight is dropped, as in the reference
            ref = x @ weight.double().T
            assert (ref - x @ deq.T).norm() < 0.9 * (ref - x @ deq_rtn.T).norm()


@pytest.mark.skipif(native_gptq._fn() is None, reason="no C compiler here: GPTQ runs its torch loop only")
@pytest.mark.parametrize(
    "args",
    [
        QuantArgs(num_bits=4, strategy="group", group_size=32),  # dynamic groups inside each block
        QuantArgs(num_bits=4, strategy="group", group_size=48),  # groups across blocks: the torch loop
        QuantArgs(num_bits=8, strategy="channel"),
        QuantArgs(num_bits=4, strategy="tensor"),
        QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
        QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=48),
        QuantArgs(num_bits=4, symmetric=False, strategy="channel"),
    ],
    ids=["g32", "g48", "channel", "tensor", "asym-g32", "asym-g48", "asym-channel"],
)
@pytest.mark.parametrize("actorder", [False, True])
def test_native_column_loop_gives_the_torch_loops_integers(
    args: QuantArgs, actorder: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`numerics/csrc/gptq.c` rounds each product and difference as the torch loop does: the same
    integers, scales (and zero points, asymmetric) on a weight whose columns span several blocks (the
    last one partial) and whose rows are split among threads, with a dead column."""
    ran: list[bool] = []
    block = native_gptq.gptq_block
    monkeypatch.setattr(native_gptq, "gptq_block", lambda *a: ran.append(block(*a)) or ran[-1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 160, generator=g, dtype=torch.float64) * torch.rand(
        160, generator=g, dtype=torch.float64
    )
    x[:, 3] = 0.0
    weight = torch.randn(300, 160, generator=g) * 0.05
    hessian = 2.0 / x.shape[0] * x.T @ x
    if not args.symmetric:  # skewed rows: zero points away from the middle of the grid
        weight = weight + 0.03 * torch.rand(300, 1, generator=g)
    native_q, native_scale, native_zp = gptq_quantize(weight, hessian, args, block_size=64, actorder=actorder)
    torch_q, torch_scale, torch_zp = gptq_quantize(
        weight, hessian, args, block_size=64, actorder=actorder, use_native=False
    )
    # Groups of 48 straddle blocks of 64 (dynamic groups without act-order): the torch loop only.
    assert ran == ([] if args.group_size == 48 and not actorder else [True] * 3)
    assert torch.equal(native_scale, torch_scale)
    assert (native_zp is None) == args.symmetric and (torch_zp is None) == args.symmetric
    if native_zp is not None:
        assert torch.equal(native_zp, torch_zp)
    same = (native_q == torch_q).float().mean().item()
    assert same >= 0.999, f"{1 - same:.2%} of the integers differ between the native and the torch loop"


def test_dead_input_channel_in_a_model_gives_no_nan() -> None:
    model = build_tiny("llama")
    with torch.no_grad():  # channel 5 of the MLP's input is always zero: gate/up get a dead column
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[5] = 0.0
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = model_output(model, ids)
    PTQ("w4a16-gptq").apply(model, calibration=_calibration(8))
    out = model_output(model, ids)
    assert bool(torch.isfinite(out).all())
    assert sqnr_db(reference, out) > 10.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("preset", ["w4a16-gptq", "w8a16-gptq"])
def test_saved_checkpoint_loads_with_in_memory_outputs(tmp_path, family: str, preset: str) -> None:
    model = build_tiny(family)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = model_output(model, ids)
    quantized = quantize(model, preset, calibration=_calibration(8))
    expected = model_output(quantized, ids)
    loaded = load_quantized(save_quantized(quantized, tmp_path / "q"))
    got = model_output(loaded, ids)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert sqnr_db(reference, got) > (15.0 if preset.startswith("w4") else 35.0)


def test_gptq_with_smoothquant_w8a8_beats_rtn_at_the_logits() -> None:
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    calibration = _calibration()
    reference = model_output(build_tiny("llama"), ids)
    w8a8 = dict(weight_dtype="int8", activation_dtype="int8", outliers_suppression="smooth")
    rtn = build_tiny("llama")
    PTQ(PTQConfig(**w8a8)).apply(rtn, calibration=calibration)
    gptq = build_tiny("llama")
    ptq = PTQ(PTQConfig(**w8a8, gptq=GPTQArgs()))
    assert [s.name for s in ptq.recipe] == ["smooth_quant", "gptq"]
    ptq.apply(gptq, calibration=calibration)
    assert gptq.model.layers[0].self_attn.q_proj.scheme == "w8a8"
    sqnr_rtn, sqnr_gptq = (
        sqnr_db(reference, model_output(rtn, ids)),
        sqnr_db(reference, model_output(gptq, ids)),
    )
    print(f"W8A8 SmoothQuant logits SQNR: RTN {sqnr_rtn:.2f} dB, GPTQ {sqnr_gptq:.2f} dB")
    assert sqnr_gptq > sqnr_rtn + 0.5


def test_gptq_with_hadamard_rotation_runs() -> None:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    model = build_tiny("llama")
    reference = model_output(model, ids)
    config = PTQConfig(
        weight_dtype="int8",
        activation_dtype="int8",
        outliers_suppression="smooth",
        algorithm_args={"hadamard": True},
        gptq=GPTQArgs(),
    )
    PTQ(config).apply(model, calibration=_calibration(8))
    assert sqnr_db(reference, model_output(model, ids)) > 20.0


def test_config_yaml_round_trip_and_recipe() -> None:
    config = PTQConfig(
        weight_dtype="int4",
        weights={"strategy": "group", "group_size": 64},
        gptq={"actorder": True, "damp_percent": 0.05, "block_size": 64},
    )
    again = PTQConfig.from_yaml(config.to_yaml())
    assert again == config and again.gptq == config.gptq
    (step,) = again.recipe()
    assert isinstance(step, GPTQConfig) and step.actorder and step.damp_percent == 0.05
    assert again.scheme_name == "w4a16-gptq"
    # the same config as a recipe list
    listed = PTQConfig.from_yaml(
        "recipe:\n  - {name: gptq, weights: {num_bits: 4, strategy: group, group_size: 64}, actorder: true}\n"
    )
    assert listed.gptq is not None and listed.gptq.actorder and listed.weight_dtype == "int4"
    assert PTQConfig.from_yaml(listed.to_yaml()).recipe() == listed.recipe()
    # configs without gptq are written as before (no `gptq` key)
    assert "gptq" not in get_preset("w8a16").to_dict()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"weight_dtype": "int8", "gptq": {"damp_precent": 0.1}},
            "gptq: GPTQArgs: unknown key 'damp_precent'",
        ),
        ({"weight_dtype": "int8", "gptq": {"damp_percent": 0}}, "damp_percent"),
        ({"weight_dtype": None, "kvcache_dtype": "int8", "gptq": {}}, "gptq rounds weights"),
        ({"weight_dtype": "int8", "gptq": {}, "block_ptq": {}}, "keep one of them"),
    ],
)
def test_bad_gptq_configs_are_refused_in_one_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        PTQConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_presets_and_mindformers() -> None:
    assert get_preset("w4a16-gptq").weights.group_size == 128 and get_preset("w4a16-gptq").gptq is not None
    assert get_preset("w8a16-gptq").weights.strategy == "channel"
    # MindFormers' quant_method is rtn / smooth_quant / ptq: it cannot name GPTQ
    with pytest.raises(ConfigError, match="cannot name the recipe's step"):
        get_preset("w8a16-gptq").to_mindformers()
    with pytest.raises(ConfigError, match="invalid quant_method"):
        PTQConfig.from_yaml("quant_method: gptq\nweight_dtype: int8\n")


def test_gptq_rounding_is_not_file_rounding() -> None:
    rounding = PTQ("w8a16-gptq").rounding
    assert (
        isinstance(rounding, GPTQRounding) and rounding.file_rounding is None and rounding.scheme == "w8a16"
    )
    assert not math.isnan(rounding.gptq.damp_percent)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_out_of_core_gptq_gives_the_in_memory_checkpoint(tiny_model_dir, tmp_path, family: str) -> None:
    from quantmint.algorithms.streaming import quantize_checkpoint
    from quantmint.io.models import load_float_model

    src = tiny_model_dir(family)
    calibration = _calibration(8)
    model = load_float_model(src)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    reference = model_output(model, ids)
    save_quantized(quantize(model, "w4a16-gptq", calibration=calibration), tmp_path / "memory")
    report = quantize_checkpoint(src, tmp_path / "stream", "w4a16-gptq", calibration=calibration)
    assert report["mode"] == "calibrated"
    memory = model_output(load_quantized(tmp_path / "memory"), ids)
    stream = model_output(load_quantized(tmp_path / "stream"), ids)
    assert torch.allclose(stream, memory, rtol=1e-4, atol=1e-4 * float(memory.abs().max()))
    assert sqnr_db(reference, stream) > 15.0


def test_gptq_with_c8_and_static_activations_round_trips(tmp_path) -> None:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9))
    static = PTQConfig(
        weight_dtype="int8",
        activation_dtype="int8",
        activations={"strategy": "tensor", "dynamic": False},
        gptq={},
    )
    for i, config in enumerate((get_preset("w8a8-c8").with_updates(gptq={}), static)):
        model = build_tiny("llama")
        reference = model_output(model, ids)
        quantized = quantize(model, config, calibration=_calibration(8))
        expected = model_output(quantized, ids)
        loaded = load_quantized(save_quantized(quantized, tmp_path / f"q{i}"))
        got = model_output(loaded, ids)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert sqnr_db(reference, got) > 25.0


def test_cli_gptq_flag_turns_a_presets_rounding_into_gptq(tmp_path, tiny_model_dir, capsys) -> None:
    from quantmint.tools.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more{i % 11}" for i in range(800)) + "\n", encoding="utf-8")
    model = str(tiny_model_dir("llama"))
    calib = ["--calib", str(text), "--calib-samples", "4", "--calib-seq-len", "32"]
    code = main(["quantize", model, "--preset", "w8a8", "--gptq", *calib, "-o", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    config = load_quantized(tmp_path / "q")._quantmint_state.config
    assert config.gptq is not None and config.scheme_name == "w8a8-gptq"
    assert [s.name for s in config.recipe()] == ["hadamard", "smooth_quant", "gptq"]
    capsys.readouterr()
    for preset, fragment in (("c8", "rounds no weights"), ("w8a16-ptq", "block PTQ")):
        with pytest.raises(SystemExit) as exit_info:  # a usage error: argparse's exit status 2
            main(["quantize", model, "--preset", preset, "--gptq", *calib, "-o", str(tmp_path / preset)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code != 0 and "--gptq: this config" in err
        assert fragment in err and len(err.splitlines()) == 1
