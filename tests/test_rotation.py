"""Online Hadamard rotation of the MLP down projection's input (`algorithm_args.hadamard`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, model_output

import quantmint
from quantmint.algorithms.rotation import (
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    is_rotated,
    rotate_linear,
    rotation_block,
)
from quantmint.config import PTQConfig, get_preset
from quantmint.errors import NotSupportedError
from quantmint.io.models import load_float_model


def _hadamard(preset: str = "w8a8", **args: object) -> PTQConfig:
    return get_preset(preset).with_updates(algorithm_args={"hadamard": True, **args})


def _calibration(n: int = 8, length: int = 32) -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [torch.randint(0, 256, (length,)) for _ in range(n)]


# ---------------------------------------------------------------- the matrices


@pytest.mark.parametrize("n", [1, 2, 12, 64, 128, 384, 576, 768, 1536, 3072, 5120])
def test_hadamard_matrix_is_orthogonal_and_the_transform_applies_it(n: int) -> None:
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    # every entry is +-1/sqrt(n): the rotation spreads one channel evenly over all
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))
    x = torch.randn(2, 3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ h, atol=1e-10)
    half = hadamard_transform(x.to(torch.bfloat16))  # rotated in float32, returned in bfloat16
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.double(), x.to(torch.bfloat16).double() @ h, rtol=1e-2, atol=1e-2)


# The factor orders chosen for a width are part of the checkpoint format (a checkpoint records only which
# linears are rotated; readers rebuild H from the width): these must never change.
PINNED_FACTORS = {
    576: [72, 8],
    1536: [12, 128],
    3072: [12, 256],
    4864: [152, 32],
    5120: [20, 256],
    8192: [256, 32],
    8960: [140, 64],
    13824: [108, 128],
    14336: [224, 64],  # Llama-3-8B's MLP width
    28672: [224, 128],
    18944: [148, 128],  # Qwen2.5-7B: Paley II (q = 73), added after the above
}


def test_factor_orders_are_pinned_and_cover_common_widths() -> None:
    assert {n: [f.shape[0] for f in hadamard_factors(n)] for n in PINNED_FACTORS} == PINNED_FACTORS
    for n in (6, 10, 100, 11008, 29568):  # no Hadamard matrix of that order here (11008 = 43 * 256)
        assert hadamard_factors(n) is None


@pytest.mark.parametrize("order", [28, 36, 60, 148])
def test_paley_second_construction_is_hadamard(order: int) -> None:
    (factor,) = hadamard_factors(order)
    assert factor.shape == (order, order)
    assert torch.equal(factor.abs(), torch.ones_like(factor))
    assert torch.equal(factor @ factor.T, order * torch.eye(order, dtype=torch.float64))


def test_widths_without_a_hadamard_matrix_rotate_block_by_block() -> None:
    # the largest order >= 64 built here that divides the width (11008 = 43 * 256, 29568 = 7 * 4224)
    assert {n: rotation_block(n) for n in (11008, 22016, 29568, 1536, 2752)} == {
        11008: 256,
        22016: 512,
        29568: 4224,
        1536: 1536,
        2752: 64,
    }
    n = 2752  # 43 blocks of 64
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal(h[:64, 64:], torch.zeros(64, n - 64, dtype=torch.float64))  # block-diagonal
    assert torch.allclose(h[:64, :64].abs(), torch.full((64, 64), 64**-0.5, dtype=torch.float64))
    x = torch.randn(2, 3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ h, atol=1e-10)
    for n in (6, 100, 43 * 32):  # no block of at least 64 channels
        assert rotation_block(n) is None
    with pytest.raises(ValueError, match="no Hadamard rotation of width 100"):
        hadamard_matrix(100)


def test_transform_flattens_an_outlier_channel() -> None:
    x = torch.randn(16, 512)
    x[:, 7] = 500.0  # one massive channel, as in the input of an LLM's down projection
    rotated = hadamard_transform(x)
    ratio = lambda t: float((t.abs().amax(-1) / t.abs().mean(-1)).mean())  # noqa: E731
    assert ratio(x) > 100
    assert ratio(rotated) < 5
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


# ---------------------------------------------------------------- rotated linears


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_rotating_the_declared_linears_leaves_the_float_function_unchanged(
    family: str, input_ids: torch.Tensor
) -> None:
    model = build_tiny(family)
    want = model_output(model, input_ids)
    ptq = quantmint.PTQ(_hadamard())
    layout = ptq.layout(model)
    targets = ptq.targets(layout)
    chosen = ptq.rotated(layout, targets)
    assert len(chosen) == len(layout.blocks)  # one down projection per block
    for name in chosen:
        rotate_linear(targets[name], layout.family.adapter)
        rotate_linear(targets[name], layout.family.adapter)  # idempotent
        assert is_rotated(targets[name])
    got = model_output(model, input_ids)
    assert (got - want).abs().max() < 1e-4


def _planted_down_outliers(family: str = "llama") -> torch.nn.Module:
    """A tiny model whose down projections see a few huge input channels that are not the same in
    every token (the pattern SmoothQuant's per-channel scales cannot remove)."""
    model = build_tiny(family)
    for layer in model.model.layers:
        layer.mlp.up_proj.weight.data[:4] *= 60
        layer.mlp.gate_proj.weight.data[:4] *= 6
    return model


def test_rotation_lowers_w8a8_error_on_outlier_inputs(input_ids: torch.Tensor) -> None:
    model = _planted_down_outliers()
    want = model_output(model, input_ids)
    errors = {}
    for hadamard in (False, True):
        config = get_preset("w8a8").with_updates(
            outliers_suppression="none", algorithm_args={"hadamard": hadamard}
        )
        quantized = quantmint.quantize(copy.deepcopy(model), config)
        errors[hadamard] = float((model_output(quantized, input_ids) - want).pow(2).mean())
    assert errors[True] < 0.5 * errors[False], errors


def test_smoothing_skips_the_pair_of_a_rotated_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantmint.algorithms.smooth_quant import SmoothQuant

    smoothed: list[str] = []
    original = SmoothQuant._smooth_pair

    def record(self: SmoothQuant, block: torch.nn.Module, pair: object, *args: object) -> object:
        smoothed.append(pair.prev)  # type: ignore[attr-defined]
        return original(self, block, pair, *args)

    monkeypatch.setattr(SmoothQuant, "_smooth_pair", record)
    for hadamard in (False, True):
        smoothed.clear()
        config = get_preset("w8a8").with_updates(
            algorithm_args={"hadamard": hadamard, "smooth_alpha_grid": []}
        )
        quantmint.PTQ(config).apply(build_tiny("llama"), calibration=_calibration())
        assert ("mlp.up_proj" in smoothed) is not hadamard  # a rotated input's channels are not up's
        assert smoothed.count("input_layernorm") == 2


def test_rotated_checkpoint_round_trips(tmp_path: Path, input_ids: torch.Tensor) -> None:
    model = quantmint.quantize(build_tiny("llama"), _hadamard(), calibration=_calibration())
    want = model_output(model, input_ids)
    quantmint.save_quantized(model, tmp_path / "q")
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block["rotated_modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert block["config"]["algorithm_args"]["hadamard"] is True
    loaded = quantmint.load_quantized(tmp_path / "q")
    assert is_rotated(loaded.model.layers[1].mlp.down_proj)
    assert not is_rotated(loaded.model.layers[1].mlp.up_proj)
    assert torch.equal(model_output(loaded, input_ids), want)


def test_rotation_with_c8_and_yaml_round_trip(input_ids: torch.Tensor) -> None:
    config = _hadamard("w8a8-c8")
    assert PTQConfig.from_yaml(config.to_yaml()) == config
    float_model = build_tiny("llama")
    want = model_output(float_model, input_ids)
    model = quantmint.quantize(copy.deepcopy(float_model), config, calibration=_calibration())
    err = (model_output(model, input_ids) - want).abs().max() / want.abs().max()
    assert err < 0.05


def test_block_ptq_tunes_rotated_linears_and_resumes_them(tmp_path: Path, input_ids: torch.Tensor) -> None:
    base = get_preset("w8a8-ptq")
    config = base.with_updates(
        algorithm_args={**base.algorithm_args.model_dump(), "hadamard": True},
        block_ptq={**base.block_ptq.model_dump(), "n_outer_loops": 20, "n_batches": 2, "batch_size": 4},
    )
    model = quantmint.quantize(
        build_tiny("llama"), config, calibration=_calibration(), work_dir=tmp_path / "w"
    )
    assert is_rotated(model.model.layers[0].mlp.down_proj)
    log = quantmint.quant_state(model).calibration["block_ptq"]["blocks"]
    assert any(entry["kept"] == "ptq" for entry in log)  # tuning ran through the rotated layers
    assert all(entry["ptq_mse"] < entry["rtn_mse"] for entry in log if entry["kept"] == "ptq")
    quantmint.save_quantized(model, tmp_path / "q")
    loaded = quantmint.load_quantized(tmp_path / "q")
    assert torch.equal(model_output(loaded, input_ids), model_output(model, input_ids))
    # the same command again resumes from the work directory: every block's rotated layers come back as
    # they were tuned (the path a run killed between blocks takes for the finished ones)
    resumed = quantmint.quantize(
        build_tiny("llama"), config, calibration=_calibration(), work_dir=tmp_path / "w"
    )
    assert quantmint.quant_state(resumed).calibration["block_ptq"]["resumed_at_block"] == 2
    assert is_rotated(resumed.model.layers[0].mlp.down_proj)
    assert torch.equal(model_output(resumed, input_ids), model_output(model, input_ids))


def test_streaming_rtn_with_rotation_matches_in_memory(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from quantmint.algorithms.streaming import quantize_checkpoint

    config = get_preset("w8a8").with_updates(outliers_suppression="none", algorithm_args={"hadamard": True})
    src = tiny_model_dir("llama")
    quantize_checkpoint(src, tmp_path / "streamed", config)
    model = quantmint.quantize(load_float_model(src), config)
    quantmint.save_quantized(model, tmp_path / "memory")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "streamed" / "model.safetensors")
    b = load_file(tmp_path / "memory" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- bad input


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="activation_dtype: int8, or hadamard: false"):
        get_preset("w8a16").with_updates(algorithm_args={"hadamard": True})


def test_unsupported_width_is_refused_before_any_change() -> None:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=100, num_hidden_layers=1, num_attention_heads=4, vocab_size=256
    )
    model = transformers.LlamaForCausalLM(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fix = "hadamard: false or auto .on the command line: leave out --hadamard"
    with pytest.raises(NotSupportedError, match=f"100 input features.*{fix}"):
        quantmint.quantize(model, _hadamard(), calibration=_calibration())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_width_rotated_block_by_block_quantizes_saves_and_serves_alike(
    tmp_path: Path, input_ids: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(  # 2752 = 43 * 64: no Hadamard matrix of that order
        hidden_size=64, intermediate_size=2752, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
    )
    float_model = transformers.LlamaForCausalLM(config).eval()
    want = model_output(float_model, input_ids)
    down = float_model.model.layers[0].mlp.down_proj
    rotated = copy.deepcopy(down)
    rotate_linear(rotated, quantmint.PTQ(_hadamard()).layout(float_model).family.adapter)
    x = torch.randn(5, 2752)
    assert torch.allclose(rotated(x), down(x), atol=1e-4)  # same function, block-diagonal H folded in
    with caplog.at_level("INFO", logger="quantmint"):
        model = quantmint.quantize(copy.deepcopy(float_model), _hadamard(), calibration=_calibration())
    assert "rotated in 43 blocks of 64" in caplog.text
    got = model_output(model, input_ids)
    assert (got - want).abs().max() / want.abs().max() < 0.05
    quantmint.save_quantized(model, tmp_path / "q")
    loaded = quantmint.load_quantized(tmp_path / "q")
    assert is_rotated(loaded.model.layers[1].mlp.down_proj)
    assert torch.equal(model_output(loaded, input_ids), got)


def test_family_without_hadamard_linears_is_refused(temporary_plugin: Callable[[object, str], None]) -> None:
    import dataclasses

    from quantmint.extension.hookspecs import hookimpl
    from quantmint.plugins.llama import LLAMA

    bare = dataclasses.replace(LLAMA, name="bare-llama", architectures=("BareLlama",), hadamard_linears=())

    class Plugin:
        @hookimpl
        def register_model_families(self, register: Callable[[object], None]) -> None:
            register(bare)

    temporary_plugin(Plugin(), "bare")
    with pytest.raises(NotSupportedError, match="declares no hadamard_linears.*leave out --hadamard"):
        quantmint.quantize(build_tiny("llama"), _hadamard(), family="bare-llama", calibration=_calibration())
    # hadamard: auto (the w8a8-ptq preset's) quantizes such a family unrotated, and says so
    model = quantmint.quantize(
        build_tiny("llama"), _hadamard(hadamard="auto"), family="bare-llama", calibration=_calibration()
    )
    assert not any(is_rotated(m) for m in model.modules())


def test_auto_rotates_what_can_be_and_leaves_the_rest(
    tmp_path: Path, input_ids: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    import transformers

    config = transformers.LlamaConfig(  # 100 input features: no rotation of that width
        hidden_size=64, intermediate_size=100, num_hidden_layers=1, num_attention_heads=4, vocab_size=256
    )
    unrotatable = transformers.LlamaForCausalLM(config).eval()
    with caplog.at_level("INFO", logger="quantmint"):
        model = quantmint.quantize(unrotatable, _hadamard(hadamard="auto"), calibration=_calibration())
    assert not is_rotated(model.model.layers[0].mlp.down_proj)
    assert "1 linear(s) with 100 input features are not rotated" in caplog.text
    quantmint.save_quantized(model, tmp_path / "q")  # loads back: nothing listed, nothing rotated
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block["rotated_modules"] == [] and block["config"]["algorithm_args"]["hadamard"] == "auto"
    loaded = quantmint.load_quantized(tmp_path / "q")
    assert not is_rotated(loaded.model.layers[0].mlp.down_proj)
    assert torch.equal(model_output(loaded, input_ids), model_output(model, input_ids))
    rotated = quantmint.quantize(build_tiny("llama"), _hadamard(hadamard="auto"), calibration=_calibration())
    assert all(is_rotated(layer.mlp.down_proj) for layer in rotated.model.layers)
    assert not is_rotated(rotated.model.layers[0].mlp.up_proj)
    # where everything can be rotated, auto is true: the same weights, bit for bit
    always = quantmint.quantize(build_tiny("llama"), _hadamard(), calibration=_calibration()).state_dict()
    got = rotated.state_dict()
    assert got.keys() == always.keys() and all(torch.equal(got[k], always[k]) for k in got)


def test_hadamard_auto_round_trips_and_bad_values_name_the_choices() -> None:
    config = _hadamard(hadamard="auto")
    assert "hadamard: auto" in config.to_yaml()
    assert PTQConfig.from_yaml(config.to_yaml()) == config
    (step,) = [s for s in config.recipe() if s.name == "hadamard"]
    assert step.auto and step.model_dump() == {"auto": True}
    assert _hadamard().recipe()[0].model_dump() == {}  # true: written as before the key existed
    assert get_preset("w8a8-ptq").algorithm_args.hadamard == "auto"
    assert get_preset("w8a8").algorithm_args.hadamard == "auto"
    assert get_preset("w8a8-c8").algorithm_args.hadamard is False
    for bad in ("yes", 1, "true"):
        with pytest.raises(ValueError, match="use true, false or auto"):
            _hadamard(hadamard=bad)


def test_adapter_round_trip_for_conv1d_weights() -> None:
    model = build_tiny("gpt2")
    ptq = quantmint.PTQ(_hadamard())
    layout = ptq.layout(model)
    c_proj = model.transformer.h[0].mlp.c_proj
    before = layout.family.adapter.weight(c_proj).detach().clone()
    rotate_linear(c_proj, layout.family.adapter)
    after = layout.family.adapter.weight(c_proj)
    h = hadamard_matrix(before.shape[1], torch.float32)
    assert torch.allclose(after, before @ h, atol=1e-5)


def test_a_family_must_declare_its_hadamard_linears_among_its_linears(
    temporary_plugin: Callable[[object, str], None],
) -> None:
    import dataclasses

    from quantmint.errors import PluginError
    from quantmint.extension import registry
    from quantmint.extension.hookspecs import hookimpl
    from quantmint.plugins.llama import LLAMA

    stray = dataclasses.replace(
        LLAMA, name="stray-llama", architectures=("StrayLlama",), hadamard_linears=("mlp.fc2",)
    )

    class Plugin:
        @hookimpl
        def register_model_families(self, register: Callable[[object], None]) -> None:
            register(stray)

    temporary_plugin(Plugin(), "stray")
    with pytest.raises(PluginError, match=r"hadamard_linears \['mlp.fc2'\] that are not among its linears"):
        registry.model_families()


# ---------------------------------------------------------------- the float pass


def _rotate_early(config: PTQConfig) -> bool:
    from quantmint.algorithms.ptq import BlockSteps

    model = build_tiny("llama")
    ptq = quantmint.PTQ(config)
    layout = ptq.layout(model)
    return BlockSteps(ptq, model, layout, ptq.targets(layout), None).rotate_early  # type: ignore[arg-type]


def test_the_float_pass_runs_rotated_linears_unrotated_unless_a_step_reads_their_inputs() -> None:
    """Only steps that read a rotated linear's input while the block runs in float need the rotation
    there: GPTQ's Hessians, static input scales, the outlier-token ratio (and any algorithm that does
    not say, such as block PTQ's). Everything else rotates just before rounding."""
    w8a8 = get_preset("w8a8")
    assert not _rotate_early(w8a8)  # dynamic activations, SmoothQuant, the rotation itself
    assert not _rotate_early(get_preset("w8a8-c8").with_updates(algorithm_args={"hadamard": True}))
    assert _rotate_early(w8a8.with_updates(gptq={}))
    assert _rotate_early(w8a8.with_updates(activations={"dynamic": False, "strategy": "tensor"}))
    args = {**w8a8.algorithm_args.model_dump(), "w8a16_outlier_ratio": 50.0}
    assert _rotate_early(w8a8.with_updates(algorithm_args=args))
    assert _rotate_early(get_preset("w8a8-ptq"))


def test_rotating_before_rounding_gives_the_model_rotating_in_the_float_pass_gives(monkeypatch) -> None:
    """The float pass computes the same function either way (only float summation order differs), and
    the rotation is folded in before anything is rounded: the two quantized models agree, and no
    rotation runs while the deferred block's observers are attached."""
    from quantmint.algorithms import ptq as ptq_module
    from quantmint.algorithms import rotation

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    config = get_preset("w8a8")
    deferred = quantmint.quantize(build_tiny("llama"), config, calibration=_calibration())
    original_init = ptq_module.BlockSteps.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        self.rotate_early = True

    monkeypatch.setattr(ptq_module.BlockSteps, "__init__", init)
    early = quantmint.quantize(build_tiny("llama"), config, calibration=_calibration())
    rotated = [n for n, m in deferred.named_modules() if is_rotated(m)]
    assert rotated and rotated == [n for n, m in early.named_modules() if is_rotated(m)]
    want, got = model_output(early, ids), model_output(deferred, ids)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))

    # Deferred, with one fixed alpha (no search re-runs the block): the only rotations are the weights'
    # (W -> W H, once per rotated linear); rotating early adds one per calibration batch and linear.
    config = config.with_updates(algorithm_args={"hadamard": "auto", "smooth_alpha": 0.5})
    counts = []
    real = rotation.hadamard_transform
    calls: list[torch.Tensor] = []
    monkeypatch.setattr(rotation, "hadamard_transform", lambda x: calls.append(x) or real(x))
    for init_fn in (original_init, init):
        monkeypatch.setattr(ptq_module.BlockSteps, "__init__", init_fn)
        calls.clear()
        quantmint.quantize(build_tiny("llama"), config, calibration=_calibration())
        counts.append(len(calls))
    assert counts[0] == len(rotated) and counts[1] > counts[0], counts
