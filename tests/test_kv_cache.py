"""C8: calibrated K/V scales and a transformers cache that stores int8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

from quantmint import (
    PTQ,
    ConfigError,
    KVProjections,
    ModelFamily,
    ModelMappingError,
    NotSupportedError,
    SmoothPair,
    hookimpl,
    load_quantized,
    quant_state,
    quantize,
    save_quantized,
)
from quantmint.algorithms.kv_cache import KVObserver, KVRangeCache, kv_cache_bytes
from quantmint.backends.torch.kv_cache import Int8KVCache, Int8KVCacheLayer
from quantmint.extension import registry
from quantmint.extension.family import ModelLayout, resolve_layout
from quantmint.numerics.quant_math import qparams_from_absmax, sqnr_db
from tests.conftest import VOCAB, build_tiny, model_output


@pytest.fixture
def calibration() -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.randint(0, VOCAB, (48,)) for _ in range(8)]


def _logits_with_cache(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Prefill on all but the last 8 tokens, then decode those 8 one at a time through the cache."""
    with torch.no_grad():
        logits = [model(input_ids=ids[:, :-8], past_key_values=cache, use_cache=True).logits[:, -1]]
        for i in range(8, 0, -1):
            step = ids[:, -i : ids.shape[1] - i + 1]
            logits.append(model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("strategy", ["channel", "head", "tensor"])
def test_int8_cache_tracks_the_float_cache(family, strategy, calibration) -> None:
    model = build_tiny(family)
    quantize(
        model,
        {"weight_dtype": None, "kvcache_dtype": "int8", "kvcache": {"strategy": strategy}},
        calibration=calibration,
    )
    state = quant_state(model)
    assert len(state.kv_modules) == 2 and not state.modules  # C8 alone leaves the linears float
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 40))
    ref = _logits_with_cache(model, ids, DynamicCache(config=model.config))
    cache = Int8KVCache.for_model(model)
    out = _logits_with_cache(model, ids, cache)
    assert sqnr_db(ref, out) > {"channel": 30, "head": 25, "tensor": 20}[strategy]
    assert cache.layers[0].q_keys.dtype == torch.int8 and cache.get_seq_length() == 40


def test_int8_cache_holds_about_half_of_a_bf16_cache(calibration) -> None:
    model = build_tiny("llama")
    quantize(model, "w8a16-c8", calibration=calibration)
    ids = torch.randint(0, VOCAB, (1, 4))
    int8 = Int8KVCache.for_model(model)
    model.generate(ids, max_new_tokens=100, min_new_tokens=100, do_sample=False, past_key_values=int8)
    model.to(torch.bfloat16)
    bf16 = DynamicCache(config=model.config)
    model.generate(ids, max_new_tokens=100, min_new_tokens=100, do_sample=False, past_key_values=bf16)
    assert int8.get_seq_length() == bf16.get_seq_length() == 103  # the last token is not cached
    ratio = kv_cache_bytes(int8) / kv_cache_bytes(bf16)
    assert 0.5 <= ratio < 0.55  # int8 values plus per-channel scales


def test_rotary_keys_are_never_clipped(calibration) -> None:
    model = build_tiny("llama")
    quantize(model, "c8", calibration=calibration)
    cache = Int8KVCache.for_model(model)
    with torch.no_grad():
        model(input_ids=torch.stack(calibration[:2]), past_key_values=cache, use_cache=True)
    # keys are observed as cached, after rotation: every calibration key is inside the grid
    assert cache.layers[0].q_keys.abs().max() <= 127
    assert cache.layers[0].q_keys.abs().amax() >= 64  # and the grid is used, not wasted


def test_c8_checkpoint_round_trip(calibration, tmp_path: Path) -> None:
    model = quantize(build_tiny("gpt2"), "w8a8-c8", calibration=calibration)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert quant_state(loaded).kv_modules == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert torch.equal(loaded.transformer.h[1].attn.v_scale, model.transformer.h[1].attn.v_scale)
    ids = torch.randint(0, VOCAB, (1, 20))
    a = _logits_with_cache(model, ids, Int8KVCache.for_model(model))
    b = _logits_with_cache(loaded, ids, Int8KVCache.for_model(loaded))
    # Both models run the same int8 cells and cache, but on other buffers: `loaded`'s tensors come from
    # safetensors 56 bytes into a cache line, `model`'s are 64-byte aligned. Vectorized float kernels
    # (BLAS, norms, softmax) may peel unaligned heads off and sum in another order: equal on a Xeon
    # without AMX (AVX-512 or AVX2), an ulp apart on an AMD EPYC (the likely cause). An ulp at a rounding
    # midpoint of the per-token int8 activations or of the int8 cache moves one code: one-ulp noise on
    # the linears' inputs (30 seeds) left the logits within 2e-7 but once moved one by 1.6e-3. So:
    # nearly every logit equal, none far off (a lost or wrong scale moves them by far more; the scales
    # are compared exactly above).
    drift = (a - b).abs()
    assert drift.median() <= 1e-5 and drift.max() <= 1e-2, drift.max()


def test_c8_errors(calibration) -> None:
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(build_tiny("llama"), "c8")
    with pytest.raises(ConfigError, match="no int8 kv-cache scales"):
        Int8KVCache.for_model(quantize(build_tiny("llama"), "w8a16"))
    no_kv = ModelFamily(name="nokv", architectures=("X",), blocks="layers", linears=("proj",))
    with pytest.raises(NotSupportedError, match="declares no K/V"):
        PTQ("c8").kv_attention_modules(ModelLayout(family=no_kv, blocks=[]))


def test_squad_answers_of_a_c8_model_come_from_the_int8_cache(calibration, monkeypatch) -> None:
    from quantmint.eval import qa

    model = quantize(build_tiny("llama"), "c8", calibration=calibration)
    used = []
    original = Int8KVCache.update

    def spy(self, *args, **kwargs):
        used.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Int8KVCache, "update", spy)
    from tests.conftest import byte_tokenizer

    qa.generate_answers(
        model, byte_tokenizer(), ["some context\\nQuestion: what?\\nAnswer:"], max_new_tokens=3
    )
    assert used and set(used) == {"Int8KVCache"}


def test_perplexity_of_a_c8_model_goes_through_the_int8_cache(calibration) -> None:
    from quantmint.eval import perplexity
    from tests.conftest import byte_tokenizer

    text = "the quick brown fox jumps over the lazy dog . " * 40
    model = build_tiny("llama")
    float_ppl = perplexity(model, byte_tokenizer(), text, max_tokens=512, seq_len=64)["ppl"]
    quantize(
        model,
        {"weight_dtype": None, "kvcache_dtype": "int8", "kvcache": {"strategy": "tensor"}},
        calibration=calibration,
    )
    c8_ppl = perplexity(model, byte_tokenizer(), text, max_tokens=512, seq_len=64)["ppl"]
    assert c8_ppl != float_ppl  # the kv rounding shows
    assert abs(c8_ppl / float_ppl - 1) < 0.01


def test_the_int8_cache_is_the_torch_runtimes_found_by_capability() -> None:
    import quantmint.algorithms.kv_cache as calibration_side

    assert registry.runtimes()["torch"].kv_cache is Int8KVCache
    assert registry.kv_cache_class("cpu") is Int8KVCache
    # the names core kept importable resolve through the registry (core imports no backend)
    assert calibration_side.Int8KVCache is Int8KVCache
    assert calibration_side.Int8KVCacheLayer is Int8KVCacheLayer


# ---------------------------------------------------------------- where C8 observes K/V: the cache


def _neox_family() -> ModelFamily:
    """GPT-NeoX: one fused QKV whose rows are interleaved per head ([q_h | k_h | v_h] for each head) and
    rotary over a quarter of each head. Its `kv` names only the attention module (`attention`); read as
    [q | k | v] thirds, its fused projection would give the wrong rows."""
    return ModelFamily(
        name="neox-test",
        architectures=("GPTNeoXForCausalLM",),
        blocks="layers",
        linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        smooth_pairs=(SmoothPair("input_layernorm", ("attention.query_key_value",)),),
        kv=KVProjections(key="attention.query_key_value", value="attention.query_key_value", fused=True),
    )


def _tiny_neox() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rotary_pct=0.25,
        use_parallel_residual=True,
    )
    return transformers.GPTNeoXForCausalLM(config).eval()


class _NeoXPlugin:
    @hookimpl
    def register_model_families(self, register) -> None:
        register(_neox_family())


def _cached_maxima(model, samples: list[torch.Tensor]) -> KVRangeCache:
    cache = KVRangeCache()
    with torch.no_grad():
        model(input_ids=torch.stack(samples), past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("name", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("preset", ["c8", "w8a8-c8"])
def test_c8_scales_are_the_maxima_of_what_the_model_caches(name, preset, calibration, temporary_plugin):
    """Llama: grouped-query heads, keys rotated over the whole head. GPT2: fused QKV in thirds. GPT-NeoX:
    fused QKV interleaved per head, keys rotated over a quarter of each head. Per channel, the scale is
    the maximum of what the float model caches over the calibration set (w8a8-c8 smooths no pair that
    starts at a value projection in GPT2/NeoX; Llama's v_proj -> o_proj pair divides V by its scales)."""
    if name == "neox":
        temporary_plugin(_NeoXPlugin(), "neox-test")
        model = _tiny_neox()
    else:
        model = build_tiny(name)
    expected = _cached_maxima(model, calibration)
    quantized = quantize(model, preset, calibration=calibration)
    state = quant_state(quantized)
    assert len(state.kv_modules) == 2
    for layer, attention in enumerate(state.kv_modules):
        module = quantized.get_submodule(attention)
        k_scale = qparams_from_absmax(expected.k_absmax[layer])
        torch.testing.assert_close(module.k_scale, k_scale, rtol=1e-5, atol=0)
        if name == "llama" and preset == "w8a8-c8":
            continue  # V divided by the v_proj -> o_proj smoothing scales, below
        v_scale = qparams_from_absmax(expected.v_absmax[layer])
        torch.testing.assert_close(module.v_scale, v_scale, rtol=1e-5, atol=0)


def test_c8_values_follow_the_smoothing_folded_into_v_proj(calibration) -> None:
    """w8a8-c8 on Llama folds smoothing scales into v_proj's outputs, so the values the quantized model
    caches are the float ones divided by them: v_scale follows (within the weights' int8 rounding: 0.6%
    here, while the undivided float maxima are 0.4x to 2.9x off)."""
    model = build_tiny("llama")
    quantized = quantize(model, "w8a8-c8", calibration=calibration)
    cache = _cached_maxima(quantized, calibration)
    for layer, attention in enumerate(quant_state(quantized).kv_modules):
        v_scale = quantized.get_submodule(attention).v_scale
        cached = qparams_from_absmax(cache.v_absmax[layer])
        # the quantized model's values are the smoothed float ones plus int8 rounding noise
        assert torch.allclose(v_scale, cached, rtol=0.1), (v_scale / cached).aminmax()


def test_handing_the_calibration_cache_leaves_each_block_unchanged(temporary_plugin) -> None:
    """The cache stores nothing and returns the states it is given: every block computes what it does
    without one (the calibration engine's later blocks see the same inputs)."""
    temporary_plugin(_NeoXPlugin(), "neox-test")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    for model in (build_tiny("llama"), build_tiny("gpt2"), build_tiny("bert"), _tiny_neox()):
        layout = resolve_layout(model, registry.find_family(model))
        reference = model_output(model, ids)
        observers = [KVObserver(block, layout.family.kv) for block in layout.blocks]
        try:
            observed = model_output(model, ids)
        finally:
            for observer in observers:
                observer.remove()
        assert all(observer.cached for observer in observers), type(model).__name__
        torch.testing.assert_close(observed, reference, rtol=0, atol=0)


def test_a_value_projection_not_cached_in_order_is_refused() -> None:
    """Smoothing scales folded into `value` map onto the cache's channels only if the cache holds
    `value`'s outputs in order; otherwise the pair is refused by name rather than scaled wrongly."""
    model = build_tiny("llama")
    layout = resolve_layout(model, registry.find_family(model))
    observer = KVObserver(layout.blocks[0], layout.family.kv)
    observer.remove()
    channels = torch.arange(1.0, 33.0)
    observer.cache.update(channels.view(1, 2, 1, 16), channels.view(1, 2, 1, 16), 0)
    observer.k_absmax, observer.v_absmax = channels, channels.flip(0)  # another channel order
    refused = r"model\.layers\.0: the values cached are not 'self_attn\.v_proj'"
    with pytest.raises(ModelMappingError, match=refused):
        observer.scales("channel", 16, v_divisor=torch.ones(32))
    observer.v_absmax = channels.clone()  # in order: accepted
    _, v_scale = observer.scales("channel", 16, v_divisor=torch.full((32,), 2.0))
    torch.testing.assert_close(v_scale, qparams_from_absmax(channels / 2))
