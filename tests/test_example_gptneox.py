"""The second example plugin (examples/quantmint-gptneox), installed as its own package: GPT-NeoX, a fused
`query_key_value` interleaved per head, partial rotary and a parallel residual. It passes `check-family`,
every preset quantizes a tiny seeded model with a sensible SQNR (C8: every K/V scale is the maximum of
what the model caches), and each checkpoint loads back with the in-memory quantized model's outputs.
Each check runs in a subprocess that sees the installed plugin (the test process never imports it, so
its registry stays as it is).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from quantmint.config.presets import PRESETS
from tests.conftest import install_example as conftest_install
from tests.conftest import plugin_env

# A tiny seeded GPT-NeoX: head size 16, a quarter of it rotated (rotary_pct 0.25), parallel residual.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "initializer_range": 0.1,
}

# Logit SQNR (dB) against the float model on 2 x 24 random tokens, measured on the seeded model below:
# w8a16 38.8, w8a8 34.7, w8a16-c8 38.8, w8a8-c8 34.7, w4a16 14.0 (groups of 128 over 64 inputs: one
# per row), block PTQ at 60 / 300 steps: w8a8-ptq 34.8 / 35.6, w8a16-ptq 39.6 / 41.6, w4a16-ptq 15.7 / 17.0.
# A full forward does not read the KV cache, so C8 leaves it unchanged (c8: no linears, infinite SQNR).
# The floors keep 3-4 dB of margin; a non-exact smoothing pair costs far more than that.
SQNR_FLOOR = {
    "w8a16": 35.0,
    "w8a8": 31.0,
    "c8": 60.0,
    "w8a16-c8": 35.0,
    "w8a8-c8": 31.0,
    "w4a16": 11.0,
    "w8a8-ptq": 31.0,
    "w8a16-ptq": 36.0,
    "w4a16-ptq": 12.5,
    "w4a16-gptq": 13.0,  # measured 16.1 (RTN's w4a16: 14.0)
    "w8a16-gptq": 38.0,  # measured 41.3 (RTN's w8a16: 38.8)
    "w4a16-asym": 12.0,  # measured 15.3 (symmetric w4a16: 14.0)
    "w4a16-asym-gptq": 14.0,  # measured 17.2
}
# measured 48.5, 37.8 and 33.8 dB (4 dB of margin)
SQNR_DECODED_FLOOR = {"c8": 44.0, "w8a16-c8": 34.0, "w8a8-c8": 30.0}
FAST_PRESETS = [
    *("w8a16", "w8a8", "c8", "w8a16-c8", "w8a8-c8", "w4a16", "w4a16-gptq", "w8a16-gptq"),
    *("w4a16-asym", "w4a16-asym-gptq"),
]
PTQ_PRESETS = ["w8a8-ptq", "w8a16-ptq", "w4a16-ptq"]  # block PTQ: slower, run in CI

MAKE_MODEL = """
import sys, json, torch, transformers
torch.manual_seed(0)
cfg = transformers.GPTNeoXConfig(**json.loads(sys.argv[2]))
cfg.eos_token_id = cfg.bos_token_id = 0
transformers.GPTNeoXForCausalLM(cfg).eval().save_pretrained(sys.argv[1])
"""

QUANTIZE = """
import sys, json, torch, quantmint
from quantmint.config import get_preset
from quantmint.io.models import load_float_model
from quantmint.numerics.quant_math import qparams_from_absmax, sqnr_db
from quantmint.algorithms.kv_cache import KVRangeCache
from transformers import DynamicCache
model_dir, out_root, presets, loops = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
from quantmint.extension import registry
torch.manual_seed(1)
calibration = [torch.randint(0, 256, (32,)) for _ in range(8)]
ids = torch.randint(0, 256, (2, 24))

def decoded(model, cache):  # prefill 16 tokens, then decode 8 one at a time through `cache`
    with torch.no_grad():
        logits = [model(input_ids=ids[:, :16], past_key_values=cache, use_cache=True).logits[:, -1]]
        for i in range(16, 24):
            step = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            logits.append(step.logits[:, -1])
    return torch.stack(logits, 1)

def int8_cache(model):
    return registry.kv_cache_class("cpu").for_model(model)

def cached_maxima(model):  # what the float model caches over the calibration set, per layer and channel
    cache = KVRangeCache()
    with torch.no_grad():
        model(input_ids=torch.stack(calibration), past_key_values=cache, use_cache=True)
    return cache

results = {}
for preset in presets:
    model = load_float_model(model_dir)
    with torch.no_grad():
        ref = model(ids).logits
    ref_decoded = decoded(model, DynamicCache())
    cached = cached_maxima(model)
    config = get_preset(preset)
    if config.block_ptq is not None and loops:  # the preset's recipe, a shorter schedule
        config = config.with_updates(block_ptq={**config.block_ptq.model_dump(), "n_outer_loops": loops})
    quantmint.quantize(model, config, calibration=calibration)
    with torch.no_grad():
        got = model(ids).logits
    path = quantmint.save_quantized(model, f"{out_root}/{preset}")
    loaded = quantmint.load_quantized(path)
    with torch.no_grad():
        back = loaded(ids).logits
    roundtrip = (back - got).abs().max().item() / got.abs().max().item()
    sqnr_decoded = scale_error = None
    kv_modules = quantmint.quant_state(model).kv_modules
    if kv_modules:  # C8: every scale is the maximum of what the float model caches
        scale_error = 0.0
        for layer, name in enumerate(kv_modules):
            attention = model.get_submodule(name)
            pairs = [(attention.k_scale, cached.k_absmax[layer]), (attention.v_scale, cached.v_absmax[layer])]
            for scale, amax in pairs:
                expected = qparams_from_absmax(amax)
                scale_error = max(scale_error, ((scale - expected).abs() / expected).max().item())
    if kv_modules:  # C8: decode through the int8 KV cache too
        got_decoded, back_decoded = decoded(model, int8_cache(model)), decoded(loaded, int8_cache(loaded))
        sqnr_decoded = sqnr_db(ref_decoded, got_decoded)
        moved = (back_decoded - got_decoded).abs().max().item() / got_decoded.abs().max().item()
        roundtrip = max(roundtrip, moved)
    results[preset] = {
        "sqnr": sqnr_db(ref, got),
        "sqnr_decoded": sqnr_decoded,
        "scale_error": scale_error,
        "roundtrip": roundtrip,
        "modules": len(quantmint.quant_state(model).modules),
        "family": json.load(open(f"{path}/config.json"))["quantization_config"]["family"],
    }
print(json.dumps(results))
"""


def install_example(target: Path) -> Path:
    """pip-install examples/quantmint-gptneox into `target`."""
    return conftest_install("quantmint-gptneox", target)


def run_python(site: Path, code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=plugin_env(site),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_tiny_gptneox(site: Path, path: Path, **overrides: Any) -> Path:
    result = run_python(site, MAKE_MODEL, str(path), json.dumps({**TINY, **overrides}))
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def installed_gptneox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def tiny_gptneox(installed_gptneox: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gptneox(installed_gptneox, tmp_path_factory.mktemp("gptneox") / "model")


def test_the_presets_here_are_every_preset() -> None:
    assert sorted(FAST_PRESETS + PTQ_PRESETS) == sorted(PRESETS) == sorted(SQNR_FLOOR)


def test_check_family_passes(installed_gptneox: Path, tiny_gptneox: Path) -> None:
    result = run_python(
        installed_gptneox, "import sys; from quantmint.tools.cli import main; sys.exit(main())",
        "check-family", str(tiny_gptneox), "--skip-vllm",  # vLLM CPU takes no head size 16
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    status = {line.split()[1].rstrip(":"): line.split()[0] for line in result.stdout.splitlines() if line}
    assert status["resolve"] == "ok" and status["kv"] == "ok" and status["save/load"] == "ok", result.stdout
    assert "family 'gptneox': 2 blocks, 4 linears per block" in result.stdout
    assert "2 smoothing pair(s) match in shape and are exact" in result.stdout


@pytest.mark.slow
def test_check_family_passes_without_the_parallel_residual(installed_gptneox: Path, tmp_path: Path) -> None:
    """The two smoothing pairs stay exact when the MLP reads x + attn(x) instead of x."""
    model = make_tiny_gptneox(installed_gptneox, tmp_path / "model", use_parallel_residual=False)
    result = run_python(
        installed_gptneox, "import sys; from quantmint.tools.cli import main; sys.exit(main())",
        "check-family", str(model), "--skip-vllm",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def _quantize_presets(
    site: Path, model: Path, out: Path, presets: list[str], ptq_loops: int = 0
) -> dict[str, Any]:
    result = run_python(site, QUANTIZE, str(model), str(out), ",".join(presets), str(ptq_loops))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check(results: dict[str, Any], presets: list[str]) -> None:
    assert sorted(results) == sorted(presets)
    for preset in presets:
        r = results[preset]
        assert r["family"] == "gptneox"
        assert r["modules"] == 8 or preset == "c8", (preset, r)  # 4 linears x 2 blocks (c8: none)
        assert r["sqnr"] >= SQNR_FLOOR[preset], (preset, r)
        # the loaded checkpoint runs the same int8 cells on the same tensors: equal up to float rounding
        assert r["roundtrip"] <= 1e-4, (preset, r)


@pytest.fixture(scope="module")
def quick_presets(
    installed_gptneox: Path, tiny_gptneox: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    return _quantize_presets(installed_gptneox, tiny_gptneox, tmp_path_factory.mktemp("out"), FAST_PRESETS)


def test_every_quick_preset_quantizes_and_round_trips(quick_presets: dict[str, Any]) -> None:
    """Also for C8: prefill and decode through the int8 KV cache give the same logits after loading."""
    _check(quick_presets, FAST_PRESETS)
    assert all((r["sqnr_decoded"] is not None) == ("c8" in p) for p, r in quick_presets.items())


@pytest.mark.parametrize("preset", ["c8", "w8a16-c8", "w8a8-c8"])
def test_c8_scales_are_the_maxima_of_what_the_model_caches(
    preset: str, quick_presets: dict[str, Any]
) -> None:
    """GPT-NeoX interleaves q/k/v per head in one projection and rotates a quarter of each key: C8
    observes K/V where the model caches them, so every k_scale / v_scale is the maximum of what the float
    model caches over the calibration set (read as [q | k | v] thirds at the projection they were 46-69%
    off, clipping cached channels)."""
    assert quick_presets[preset]["scale_error"] <= 1e-5, quick_presets[preset]


@pytest.mark.parametrize("preset", ["c8", "w8a16-c8", "w8a8-c8"])
def test_c8_decoding_through_the_int8_cache_tracks_float(preset: str, quick_presets: dict[str, Any]) -> None:
    """Prefill and decode through the int8 cache against the float model decoding through a float
    cache."""
    assert quick_presets[preset]["sqnr_decoded"] >= SQNR_DECODED_FLOOR[preset], quick_presets[preset]


@pytest.mark.slow
def test_every_block_ptq_preset_quantizes_and_round_trips(
    installed_gptneox: Path, tiny_gptneox: Path, tmp_path: Path
) -> None:
    """The block PTQ presets' recipes with 60 optimisation steps per block instead of 300 (about 4 min
    on 2 shared cores at 300; the floors below hold at both)."""
    results = _quantize_presets(installed_gptneox, tiny_gptneox, tmp_path, PTQ_PRESETS, ptq_loops=60)
    _check(results, PTQ_PRESETS)
