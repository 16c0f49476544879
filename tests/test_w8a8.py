"""SmoothQuant, W8A8 and the sequential calibration engine on tiny models of every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantmint import PTQ, ConfigError, load_quantized, quant_state, quantize, save_quantized
from quantmint.algorithms.calibration import batch_samples, run_sequential
from quantmint.algorithms.observers import attach_input_observers
from quantmint.algorithms.smooth_quant import SmoothQuant, smoothing_scales
from quantmint.backends.torch import Int8Linear, int8_int8_matmul
from quantmint.backends.torch.int8_linear import int_mm_is_exact
from quantmint.extension import registry
from quantmint.extension.family import resolve_layout
from quantmint.numerics.quant_math import sqnr_db
from tests.conftest import VOCAB, build_tiny, model_output

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "bert"]
W8A8_DYNAMIC = {"weight_dtype": "int8", "activation_dtype": "int8"}
W8A8_SMOOTH = {**W8A8_DYNAMIC, "outliers_suppression": "smooth"}
W8A8_STATIC = {**W8A8_DYNAMIC, "activations": {"strategy": "tensor"}}


@pytest.fixture
def calibration() -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [torch.randint(0, VOCAB, (32,)) for _ in range(8)]


def _smooth_only(model: torch.nn.Module, calibration: list[torch.Tensor], alpha: float = 0.5) -> int:
    """Run only the smoothing module through the engine; return how many linears it smoothed."""
    layout = resolve_layout(model, registry.find_family(model))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    smooth = SmoothQuant(alpha, head_dim=head_dim)
    count = 0

    def finish(block, attached, _calls, _outputs):
        nonlocal count
        observers, handles = attached
        for handle in handles:
            handle.remove()
        count += len(smooth.smooth_block(block, layout.family, observers)[0])
        return False

    run_sequential(model, layout, calibration, lambda b: attach_input_observers(b.linears), finish)
    return count


@pytest.mark.parametrize(("family", "smoothed"), [("llama", 14), ("qwen2", 14), ("gpt2", 4), ("bert", 2)])
def test_smoothing_is_exact_before_quantization(family, smoothed, calibration, input_ids) -> None:
    model = build_tiny(family)
    ref = model_output(model, input_ids)
    assert _smooth_only(model, calibration) == smoothed  # every declared pair, GQA v->o included
    assert (model_output(model, input_ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_smoothing_scales_formula() -> None:
    x = torch.tensor([4.0, 1.0, 100.0])
    w = torch.tensor([1.0, 4.0, 0.25])
    assert torch.allclose(smoothing_scales(x, w, 0.5), torch.tensor([2.0, 0.5, 20.0]))
    assert torch.allclose(smoothing_scales(x, w, 1.0), x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("config", "min_db"), [(W8A8_DYNAMIC, 35), (W8A8_SMOOTH, 35), (W8A8_STATIC, 30)])
def test_w8a8_sqnr_and_apply_matches_convert(family, config, min_db, calibration, input_ids) -> None:
    model = build_tiny(family)
    ref = model_output(model, input_ids)
    ptq = PTQ(config)
    ptq.apply(model, calibration=calibration)
    fake = model_output(model, input_ids)
    ptq.convert(model)
    cells = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(cells) == len(quant_state(model).modules) > 0
    assert all((c.input_scale is None) == (config is not W8A8_STATIC) for c in cells)
    out = model_output(model, input_ids)
    assert sqnr_db(ref, out) >= min_db
    assert sqnr_db(fake, out) > 50  # the int8 x int8 cell computes what the fake-quant model predicted


def _plant_outliers(
    model: torch.nn.Module, channels: tuple[int, ...] = (3, 17), factor: float = 40.0
) -> None:
    """Make a few input channels of q/k/v and gate/up huge without changing the function."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in (
                (
                    layer.input_layernorm,
                    (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                ),
                (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)),
            ):
                for c in channels:
                    norm.weight[c] *= factor
                    for linear in linears:
                        linear.weight[:, c] /= factor


def test_smoothing_lowers_w8a8_error_on_planted_outliers(calibration, input_ids) -> None:
    errors = {}
    for name, config in (("plain", W8A8_DYNAMIC), ("smooth", W8A8_SMOOTH)):
        model = build_tiny("llama")
        _plant_outliers(model)
        ref = model_output(model, input_ids)
        quantize(model, config, calibration=calibration)
        errors[name] = sqnr_db(ref, model_output(model, input_ids))
    assert errors["smooth"] > errors["plain"] + 6, errors  # at least 4x less noise power


def test_calibrated_configs_need_data() -> None:
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(build_tiny("llama"), "w8a8")
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(build_tiny("llama"), W8A8_STATIC)


def test_engine_reproduces_the_models_hidden_states(calibration) -> None:
    model = build_tiny("llama")
    layout = resolve_layout(model, registry.find_family(model))
    seen = []

    def finish(block, _attached, calls, outputs):
        seen.append([o.clone() for o in outputs])
        return False

    report = run_sequential(model, layout, calibration, lambda b: None, finish, batch_size=4)
    assert report.samples == 8 and report.tokens == 8 * 32 and report.blocks == 2
    batch = torch.stack(calibration[:4])
    with torch.no_grad():
        hidden = model(input_ids=batch, output_hidden_states=True).hidden_states
    # hidden_states[1] is block 0's output; the last entry has the final norm applied
    assert torch.allclose(seen[0][0], hidden[1], atol=1e-5)


def test_batches_group_equal_lengths() -> None:
    samples = [torch.arange(5), torch.arange(7), torch.arange(5), torch.arange(5)]
    batches = batch_samples(samples, batch_size=2)
    assert sorted(tuple(b.shape) for b in batches) == [(1, 5), (1, 7), (2, 5)]
    with pytest.raises(ConfigError, match="1-D"):
        batch_samples([torch.zeros(2, 3, dtype=torch.long)], 2)


def test_int8_matmul_is_exact_even_where_16_bit_pairs_would_saturate() -> None:
    x = torch.full((3, 96), 127, dtype=torch.int8)
    w = torch.full((5, 96), 127, dtype=torch.int8)
    assert torch.all(int8_int8_matmul(x, w) == 127 * 127 * 96)
    x = torch.randint(-127, 128, (17, 130), dtype=torch.int8)
    w = torch.randint(-127, 128, (9, 130), dtype=torch.int8)
    assert torch.equal(int8_int8_matmul(x, w), (x.long() @ w.long().t()).int())
    assert isinstance(int_mm_is_exact(), bool)


@pytest.mark.parametrize("k", [1, 1024, 1025, 3001])
def test_int8_matmul_without_an_exact_int_mm_is_exact_past_float32s_integers(monkeypatch, k: int) -> None:
    """The fallback for CPUs whose int8 GEMM saturates: float32 matmuls over chunks of 1024 columns.
    -128 x -128 products everywhere put every chunk's sum at 2**24 (float32's last exact integer) and the
    whole sum past it; a row and column of 127s make an odd sum past 2**24 (k = 3001), which one float32
    matmul cannot hold; random codes check the chunk boundaries."""
    from quantmint.backends.torch import int8_linear

    monkeypatch.setattr(int8_linear, "int8_matmul_path", lambda: "float32 chunks")
    x = torch.full((2, k), -128, dtype=torch.int8)
    w = torch.full((3, k), -128, dtype=torch.int8)
    assert torch.all(int8_int8_matmul(x, w) == 128 * 128 * k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-128, 128, (7, k), dtype=torch.int8, generator=gen)
    x[0] = 127  # a row of large same-sign products next to random ones
    w[0] = 127
    assert torch.equal(int8_int8_matmul(x, w), (x.long() @ w.long().t()).int())
    assert int8_int8_matmul(x[:, :0], w[:, :0]).shape == (5, 7)


def _force_simd_path(monkeypatch) -> None:
    """Run the "w8a16.c float32" path of `int8_int8_matmul` on any CPU the W8A16 SIMD kernel builds on
    (it is the default only without VNNI)."""
    from quantmint.backends.torch import int8_linear

    if int8_linear.simd_woq_kernel() is None:
        pytest.skip("no AVX2+FMA / AVX-512 W8A16 kernel here (not x86, no C compiler or QUANTMINT_NATIVE=0)")
    monkeypatch.setattr(int8_linear, "int8_matmul_path", lambda: "w8a16.c float32")


@pytest.mark.parametrize("k", [1, 17, 1024, 1025, 1536, 3001])
def test_int8_matmul_on_the_w8a16_kernel_is_exact_past_float32s_integers(monkeypatch, k: int) -> None:
    """The W8A16 SIMD kernel over input chunks of at most 1,024 columns: the same extremes as the float32
    chunks (every chunk's sum at 2**24, the whole sum past it; odd sums past 2**24), every row count the
    kernel blocks differently (1, 5, 13, 40), and output counts off the panel width."""
    from quantmint.backends.torch import int8_linear
    from quantmint.backends.torch.int8_linear import pack_int8_weight

    _force_simd_path(monkeypatch)
    x = torch.full((2, k), -128, dtype=torch.int8)
    w = torch.full((3, k), -128, dtype=torch.int8)
    panels = pack_int8_weight(w)
    assert panels is not None and all(stop - start <= 1024 for start, stop, _ in panels.chunks)
    assert torch.all(int8_int8_matmul(x, w, panels) == 128 * 128 * k)
    gen = torch.Generator().manual_seed(k)
    w = torch.randint(-128, 128, (37, k), dtype=torch.int8, generator=gen)
    w[0] = 127
    panels = pack_int8_weight(w)
    for rows in (1, 5, 13, 40):
        x = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=gen)
        x[0] = 127  # a row of large same-sign products next to random ones
        got = int8_int8_matmul(x, w, panels)
        assert got.dtype == torch.int32 and torch.equal(got, (x.long() @ w.long().t()).int())
    with pytest.raises(ValueError, match="pack this weight"):
        int8_int8_matmul(x[:, :-1], w[:, :-1], panels)
    with pytest.raises(ValueError, match="input columns"):
        int8_linear.int8_linear(torch.randn(2, k + 1), w, torch.ones(37), panels=panels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_activation_rounding_matches_torchs_bit_for_bit(monkeypatch, dtype: torch.dtype) -> None:
    """`csrc/w8a16.c`'s W8A8 activation rounding against `quant_math.quantize_activation`: ties (row
    absmax 127, so scale 1 and values k + 0.5 round half to even), an all-zero row (the minimum scale), a
    row holding NaN, huge and tiny rows, a strided view, and a static scale."""
    from quantmint.backends.torch import int8_linear
    from quantmint.numerics.quant_math import quantize_activation

    _force_simd_path(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 203, generator=gen)
    x[0] = torch.arange(203) * 0.5 - 50.25  # halves
    x[0, 0] = 127.0
    x[1] = 0.0
    x[2, 7] = float("nan")
    x[3] *= 1e30
    x[4] *= 1e-30
    x[5, :5] = torch.tensor([127.5, -0.5, 1.5, 2.5, -2.5])
    wide = torch.zeros(9, 300)
    wide[:, :203] = x
    for rows in (x, wide[:, :203]):  # contiguous and strided
        rows = rows.to(dtype)
        for input_scale in (None, torch.tensor([0.037])):
            q, scale = int8_linear._quantize_rows_to_float(rows, input_scale)
            want_q, want_scale = quantize_activation(rows, input_scale, torch.float32)
            assert q.dtype == torch.float32 and torch.equal(q.isnan(), want_q.isnan())
            assert torch.equal(q.nan_to_num(), want_q.nan_to_num())
            assert torch.equal(scale.nan_to_num(), want_scale.reshape(scale.shape).nan_to_num())


@pytest.mark.parametrize("in_features", [300, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_on_the_w8a16_kernel_matches_the_float32_chunks_bit_for_bit(
    monkeypatch, in_features: int, dtype: torch.dtype
) -> None:
    """Int8Linear packs its weight once for the SIMD path and gives the same bits as the unpacked exact
    path (the same int32 sums, the same scaling in the same order; one input chunk and two; with and
    without a bias, dynamic and static activation scales, per-channel and per-tensor weight scales), and
    packs again when the weight is written in place."""
    from quantmint.backends.torch import int8_linear

    _force_simd_path(monkeypatch)
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (70, in_features), dtype=torch.int8)
    x = (torch.randn(3, 9, in_features) * torch.rand(3, 9, 1) * 10).to(dtype)
    for bias in (None, torch.randn(70).to(dtype)):
        for input_scale in (None, torch.tensor([0.02])):
            for weight_scale in (torch.rand(70, 1) / 100 + 1e-3, torch.tensor([[0.004]])):
                cell = Int8Linear(weight, weight_scale, bias, input_scale)
                # without panels: the float32 chunks
                want = int8_linear.int8_linear(x, cell.weight, cell.weight_scale, cell.input_scale, cell.bias)
                got = cell(x)
                assert got.dtype == dtype and torch.equal(got, want)
    first = cell.panels()
    assert first is not None and cell.panels() is first  # packed once
    with torch.no_grad():
        cell.weight.neg_()
    assert cell.panels() is not first
    want = int8_linear.int8_linear(x, cell.weight, cell.weight_scale, cell.input_scale, cell.bias)
    assert torch.equal(cell(x), want)


@pytest.mark.parametrize("config", [W8A8_SMOOTH, W8A8_STATIC])
def test_w8a8_checkpoint_round_trip(config, calibration, tmp_path: Path, input_ids) -> None:
    model = quantize(build_tiny("llama"), config, calibration=calibration)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(model_output(loaded, input_ids), model_output(model, input_ids))
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int8Linear)
    assert (q_proj.input_scale is not None) == (config is W8A8_STATIC)


def test_alpha_search_picks_from_the_grid_per_block(calibration, input_ids) -> None:
    """The default search (`smooth_alpha_search: block`, the presets'): one alpha per block."""
    results = {}
    for name, args in (("fixed", {}), ("search", {"smooth_alpha_grid": [0.2, 0.4, 0.6, 0.8]})):
        model = build_tiny("llama")
        torch.manual_seed(0)
        ref = model_output(model, input_ids)
        quantize(model, {**W8A8_SMOOTH, "algorithm_args": args}, calibration=calibration)
        results[name] = (sqnr_db(ref, model_output(model, input_ids)), quant_state(model).calibration)
    alphas = results["search"][1]["smooth_alpha_per_block"]
    assert len(alphas) == 2 and set(alphas) <= {0.2, 0.4, 0.6, 0.8}
    assert "smooth_alpha_per_pair" not in results["search"][1]
    assert results["fixed"][1]["smooth_alpha_per_block"] == [0.5, 0.5]
    assert results["search"][0] >= results["fixed"][0] - 1.0


def test_smooth_alpha_search_key_is_written_only_when_not_the_default() -> None:
    """`smooth_alpha_search: pair` round-trips through YAML; the default (block) is written nowhere, so
    configs and checkpoints keep the bytes they had before the key; other values are refused."""
    from quantmint.config import PTQConfig, get_preset

    assert "smooth_alpha_search" not in get_preset("w8a8").to_yaml()
    pair = get_preset("w8a8").with_updates(algorithm_args={"smooth_alpha_search": "pair"})
    assert "smooth_alpha_search: pair" in pair.to_yaml()
    again = PTQConfig.from_yaml(pair.to_yaml())
    assert again == pair and again.algorithm_args.smooth_alpha_search == "pair"
    with pytest.raises(ConfigError, match="smooth_alpha_search"):
        PTQConfig(algorithm_args={"smooth_alpha_search": "layer"})


def test_block_call_head_cuts_the_batch_and_nothing_else() -> None:
    from quantmint.algorithms.calibration import BlockCall

    hidden = torch.randn(4, 6, 8)
    cos, sin = torch.randn(1, 6, 8), torch.randn(4, 6, 8)
    mask = torch.zeros(4, 1, 6, 6)
    call = BlockCall(
        hidden,
        (torch.arange(6),),
        {"position_embeddings": (cos, sin), "attention_mask": mask, "flag": True},
        index=3,
        weight=1.0,
    )
    cut = call.head(2)
    assert torch.equal(cut.hidden, hidden[:2]) and cut.index == 3 and cut.weight == 1.0
    assert torch.equal(cut.args[0], torch.arange(6))  # not batched: passed as it is
    assert cut.kwargs["position_embeddings"][0] is cos  # broadcast over the batch
    assert torch.equal(cut.kwargs["position_embeddings"][1], sin[:2])
    assert cut.kwargs["attention_mask"].shape == (2, 1, 6, 6) and cut.kwargs["flag"] is True
    assert call.head(4) is call and call.head(9) is call


@torch.no_grad()
def test_alpha_search_on_fewer_samples_scores_their_rows_of_the_block_output(calibration) -> None:
    """`smooth_search_samples`: each grid alpha runs only the first rows of the search batches; the
    losses are those rows' MSE against the same rows of the float block's output."""

    from quantmint.algorithms.builtin import rounded_copy, search_alpha
    from quantmint.algorithms.calibration import BlockCall
    from quantmint.algorithms.ptq import BlockSteps

    model = build_tiny("llama")
    ptq = PTQ({**W8A8_SMOOTH, "algorithm_args": {"smooth_alpha_grid": [0.3, 0.7]}})
    layout = resolve_layout(model, registry.find_family(model))
    from quantmint.algorithms.ptq import QuantState

    steps = BlockSteps(ptq, model, layout, ptq.targets(layout), QuantState(config=ptq.config, family="llama"))
    calls = []

    def finish(block, attached, block_calls, outputs):
        observers, handles = attached
        for handle in handles:
            handle.remove()
        if block.index == 0:  # the engine hands the outputs on to the next block in these calls
            kept = [BlockCall(c.hidden, c.args, c.kwargs, c.index, c.weight) for c in block_calls]
            calls.append((block, observers, kept, list(outputs)))
        return False

    run_sequential(
        model, layout, calibration, lambda b: attach_input_observers(b.linears), finish, batch_size=4
    )
    block, observers, block_calls, outputs = calls[0]
    assert len(block_calls) == 2 and block_calls[0].hidden.shape[0] == 4
    _, whole = search_alpha(steps, block, observers, block_calls, outputs, [0.3, 0.7], 2)
    assert steps.cut_calls_ok is None  # nothing cut, nothing checked
    alpha, losses = search_alpha(steps, block, observers, block_calls, outputs, [0.3, 0.7], 2, 2)
    assert steps.cut_calls_ok is True and alpha in (0.3, 0.7)
    for a in (0.3, 0.7):  # the same losses, computed by hand on each batch's first sample
        trial = rounded_copy(steps, block, observers, SmoothQuant(a, steps.head_dim))
        want = sum(
            float((c.head(1).run(trial) - o[:1]).float().pow(2).mean())
            for c, o in zip(block_calls, outputs, strict=True)
        )
        assert losses[a] == pytest.approx(want, rel=1e-5)
        assert losses[a] != pytest.approx(whole[a], rel=1e-9)  # fewer samples: another sum
    # `smooth_search_loss: token_relative`: each batch's loss is `block_loss`'s token-relative error,
    # which the tokens of largest norm do not decide (another sum than the MSE's)
    from quantmint.algorithms.block_ptq import block_loss

    _, relative = search_alpha(
        steps, block, observers, block_calls, outputs, [0.3, 0.7], 2, 0, "token_relative"
    )
    for a in (0.3, 0.7):
        trial = rounded_copy(steps, block, observers, SmoothQuant(a, steps.head_dim))
        want = sum(
            float(block_loss(c.run(trial), o, "token_relative"))
            for c, o in zip(block_calls, outputs, strict=True)
        )
        assert relative[a] == pytest.approx(want, rel=1e-5)
        assert relative[a] != pytest.approx(whole[a], rel=1e-3)


def test_alpha_search_runs_whole_batches_when_a_cut_call_computes_something_else(caplog) -> None:
    """A block argument whose first dimension is the batch's size by chance (here a [batch, hidden] table
    summed over its rows) makes the cut call disagree with the whole one: the search says so and keeps
    whole batches."""
    from quantmint.algorithms.builtin import _cut_calls_agree
    from quantmint.algorithms.calibration import BlockCall

    class Block(torch.nn.Module):
        def forward(self, hidden, table):
            return hidden + table.sum(0)

    hidden, table = torch.randn(4, 3, 5), torch.randn(4, 5)
    whole = BlockCall(hidden, (table,), {})
    out = whole.run(Block())
    with caplog.at_level("WARNING"):
        assert not _cut_calls_agree(Block(), [whole.head(2)], [out])
    assert "whole calibration batches" in caplog.text

    class Rowwise(torch.nn.Module):
        def forward(self, hidden, table):
            return hidden * table[:, None, :]

    out = whole.run(Rowwise())
    assert _cut_calls_agree(Rowwise(), [whole.head(2)], [out])


def test_smooth_search_loss_is_written_only_when_not_the_default() -> None:
    """`smooth_search_loss` round-trips through YAML into the SmoothQuant step; the default (mse) is
    written nowhere, so the presets' configs and checkpoints keep their bytes; a wrong kind is refused."""
    from quantmint.config import PTQConfig, get_preset

    assert "smooth_search_loss" not in get_preset("w8a8").to_yaml()
    relative = get_preset("w8a8").with_updates(algorithm_args={"smooth_search_loss": "token_relative"})
    assert "smooth_search_loss: token_relative" in relative.to_yaml()
    again = PTQConfig.from_yaml(relative.to_yaml())
    assert again == relative
    assert [s.search_loss for s in again.recipe() if s.name == "smooth_quant"] == ["token_relative"]
    with pytest.raises(ConfigError, match="smooth_search_loss"):
        PTQConfig(algorithm_args={"smooth_search_loss": "l1"})


def test_smooth_search_samples_is_written_only_when_set() -> None:
    from quantmint.config import PTQConfig, get_preset

    base = get_preset("w8a8").with_updates(
        algorithm_args={"smooth_alpha_grid": [0.5], "smooth_search_samples": 0}
    )
    assert "smooth_search_samples" not in base.to_yaml()
    few = base.with_updates(algorithm_args={"smooth_alpha_grid": [0.5], "smooth_search_samples": 4})
    assert "smooth_search_samples: 4" in few.to_yaml()
    again = PTQConfig.from_yaml(few.to_yaml())
    assert again == few
    assert [step.search_samples for step in again.recipe() if step.name == "smooth_quant"] == [4]
    with pytest.raises(ConfigError, match="smooth_search_samples"):
        PTQConfig(algorithm_args={"smooth_search_samples": -1})


def test_alpha_search_picks_from_the_grid_per_pair(calibration, input_ids) -> None:
    results = {}
    pair = {"smooth_alpha_search": "pair"}
    for name, args in (("fixed", pair), ("search", {**pair, "smooth_alpha_grid": [0.2, 0.4, 0.6, 0.8]})):
        model = build_tiny("llama")
        _plant_outliers(model)
        ref = model_output(model, input_ids)
        quantize(model, {**W8A8_SMOOTH, "algorithm_args": args}, calibration=calibration)
        results[name] = (sqnr_db(ref, model_output(model, input_ids)), quant_state(model).calibration)
    alphas = results["search"][1]["smooth_alpha_per_pair"]  # every pair of both blocks, by `prev`
    pairs = ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj")
    assert set(alphas) == {f"model.layers.{i}.{prev}" for i in range(2) for prev in pairs}
    assert set(alphas.values()) <= {0.2, 0.4, 0.6, 0.8}
    assert "smooth_alpha_per_block" not in results["search"][1]
    assert results["fixed"][1]["smooth_alpha_per_block"] == [0.5, 0.5]
    assert "smooth_alpha_per_pair" not in results["fixed"][1]
    assert results["search"][0] >= results["fixed"][0] - 1.0


def test_alpha_search_takes_the_smaller_linear_output_error(calibration, monkeypatch) -> None:
    """Activation outliers (two norm channels x 100, the weights left alone): alpha 0 leaves them in the
    int8 activations (s = 1 / max|W|), alpha 0.8 moves them into the weights. The search measures each
    alpha's error on the pair's linears, keeps the smaller one, applies it and records it."""
    from quantmint.algorithms import builtin

    searched = {}
    search = builtin.search_pair_alpha

    def spy(steps, block, observers, prev, inputs, grid):
        alpha, errors = search(steps, block, observers, prev, inputs, grid)
        searched[f"{block.name}.{prev}"] = (alpha, errors)
        return alpha, errors

    monkeypatch.setattr(builtin, "search_pair_alpha", spy)
    model = build_tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] *= 100.0
    config = {
        **W8A8_SMOOTH,
        "algorithm_args": {"smooth_alpha_grid": [0.0, 0.8], "smooth_alpha_search": "pair"},
    }
    quantize(model, config, calibration=calibration)
    chosen = quant_state(model).calibration["smooth_alpha_per_pair"]
    assert {name: alpha for name, (alpha, _) in searched.items()} == chosen
    for name, (alpha, errors) in searched.items():
        assert set(errors) == {0.0, 0.8} and errors[alpha] == min(errors.values())
        if name.endswith("layernorm"):  # the pairs with planted outliers
            assert alpha == 0.8 and errors[0.0] > 4 * errors[0.8], (name, errors)


def test_alpha_search_error_is_the_smoothed_rounded_linears_error(input_ids) -> None:
    """`search_pair_alpha`'s error for an alpha is what smoothing the block at that alpha and rounding it
    (the real pipeline) gives on the pair's linears (q, k, v after the input norm), on the same tokens."""
    import copy

    from quantmint.algorithms.builtin import PairInputs, search_pair_alpha
    from quantmint.algorithms.ptq import PTQ, BlockSteps, QuantState

    model = build_tiny("llama")
    _plant_outliers(model)
    ptq = PTQ({**W8A8_SMOOTH, "algorithm_args": {"smooth_alpha_grid": [0.3, 0.7]}})

    def qkv_outputs(m):
        attn = m.model.layers[0].self_attn
        outs = []
        hooks = [
            lin.register_forward_hook(lambda _m, _a, y: outs.append(y.float()))
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj)
        ]
        with torch.no_grad():
            m(input_ids=input_ids)
        for hook in hooks:
            hook.remove()
        return outs

    layout = ptq.layout(model)
    block = layout.blocks[0]
    steps = BlockSteps(ptq, model, layout, ptq.targets(layout), QuantState(ptq.config, layout.family.name))
    captured = PairInputs(block, layout.family, calls=1, tokens=10**6)  # every token
    observers, handles = attach_input_observers(block.linears)
    reference = qkv_outputs(model)
    for handle in [*handles, captured]:
        handle.remove()
    _, errors = search_pair_alpha(
        steps, block, observers, "input_layernorm", captured.inputs["input_layernorm"], [0.3, 0.7]
    )
    for alpha in (0.3, 0.7):
        trial = copy.deepcopy(model)
        trial_layout = ptq.layout(trial)
        folded = ptq._transform_block(
            trial_layout.blocks[0],
            trial_layout.family,
            observers,
            ptq.targets(trial_layout),
            SmoothQuant(alpha, head_dim=steps.head_dim),
        )
        q, k, v = qkv_outputs(trial)
        v = v * folded["model.layers.0.self_attn.v_proj"]  # v's rows carry the o_proj pair's smoothing
        measured = sum(float((y - ref).pow(2).sum()) for y, ref in zip((q, k, v), reference, strict=True))
        assert errors[alpha] == pytest.approx(measured, rel=0.02)


def test_alpha_grid_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"smooth_alpha_grid.*\[1.5\]"):
        quantize(build_tiny("llama"), {**W8A8_SMOOTH, "algorithm_args": {"smooth_alpha_grid": [0.5, 1.5]}})


# ---------------------------------------------------------------- outlier tokens keep float activations


def test_observer_measures_how_far_one_token_stands_out() -> None:
    from quantmint.algorithms.observers import InputObserver

    observer = InputObserver()
    x = torch.ones(1, 10, 8)
    observer.observe(x)
    assert observer.token_outlier_ratio() == pytest.approx(1.0)
    x[0, 3, 5] = 500.0  # an attention-sink token with one massive channel
    observer.observe(x)
    assert observer.token_outlier_ratio() == pytest.approx(500.0)


def _token_ratios(model: torch.nn.Module, calibration: list[torch.Tensor]) -> dict[str, float]:
    layout = resolve_layout(model, registry.find_family(model))
    ratios: dict[str, float] = {}

    def attach(block):
        return attach_input_observers(block.linears)

    def finish(block, attached, _calls, _outputs):
        observers, handles = attached
        for handle in handles:
            handle.remove()
        ratios.update({name: obs.token_outlier_ratio() for name, obs in observers.items()})
        return False

    run_sequential(model, layout, calibration, attach, finish, batch_size=4)
    return ratios


def test_linears_with_outlier_tokens_are_kept_w8a16_and_round_trip(
    calibration: list[torch.Tensor], tmp_path: Path, input_ids: torch.Tensor
) -> None:
    ratios = _token_ratios(build_tiny("llama"), calibration)
    threshold = sorted(set(ratios.values()))[len(set(ratios.values())) // 2]  # splits the linears
    from quantmint.config import get_preset

    ptq_config = get_preset("w8a8").with_updates(
        algorithm_args={"smooth_alpha": 0.5, "w8a16_outlier_ratio": threshold}
    )
    model = quantize(build_tiny("llama"), ptq_config, calibration=calibration)
    schemes = quant_state(model).modules
    assert set(schemes.values()) == {"w8a8", "w8a16"}
    for name, scheme in schemes.items():
        assert scheme == ("w8a16" if ratios[name] > threshold else "w8a8"), name
    # linears that read the same input decide alike (vLLM fuses them into one layer)
    for block in range(2):
        qkv = {schemes[f"model.layers.{block}.self_attn.{p}_proj"] for p in "qkv"}
        gate_up = {schemes[f"model.layers.{block}.mlp.{p}_proj"] for p in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
    expected = model_output(model, input_ids)
    loaded = load_quantized(save_quantized(model, tmp_path / "mixed"))
    assert quant_state(loaded).modules == schemes
    assert torch.equal(model_output(loaded, input_ids), expected)


def test_alpha_search_records_no_alpha_for_a_rotated_pair(calibration) -> None:
    """With `hadamard`, down_proj's input is rotated and its pair (up -> down) is not smoothed: the report
    lists an alpha only for the pairs that were."""
    args = {"smooth_alpha_grid": [0.5, 0.8], "hadamard": True, "smooth_alpha_search": "pair"}
    config = {**W8A8_SMOOTH, "algorithm_args": args}
    model = quantize(build_tiny("llama"), config, calibration=calibration)
    alphas = quant_state(model).calibration["smooth_alpha_per_pair"]
    assert len(alphas) == 6 and not any(name.endswith("mlp.up_proj") for name in alphas)


def test_linears_reading_one_input_are_measured_once_per_call(calibration, monkeypatch) -> None:
    """q/k/v (and gate/up) read one tensor: its statistics are measured once and given to each of their
    observers, equal to what each would have measured alone."""
    from quantmint.algorithms.observers import InputObserver

    model = build_tiny("llama")
    layout = resolve_layout(model, registry.find_family(model))
    block = layout.blocks[0]
    measured = []
    measure = InputObserver.measure
    monkeypatch.setattr(InputObserver, "measure", lambda self, x: measured.append(x) or measure(self, x))
    observers, handles = attach_input_observers(block.linears)
    seen = {}
    for name, module in block.linears.items():
        handles.append(
            module.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, args[0].clone()))
        )
    with torch.no_grad():
        model(torch.stack(calibration[:2]))
    for handle in handles:
        handle.remove()
    assert len(measured) == 4  # attention input, o_proj input, MLP input, down_proj input
    for name, observer in observers.items():
        alone = InputObserver()
        alone.observe(seen[name])
        assert torch.equal(observer.absmax, alone.absmax)
        assert torch.equal(observer.token_absmax[0], alone.token_absmax[0])
