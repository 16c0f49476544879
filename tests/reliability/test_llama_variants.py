"""Llama-family config variants a user's checkpoint may carry, through the calibrating presets.

The built-in tiny models (tests/conftest.py) are one shape of each family; real checkpoints differ in
ways that touch the smoothing pairs, the KV cache and the rotation: biases on the projections (a
smoothed `up_proj` must scale its bias too), `head_dim` not hidden / heads (q and o widths differ from
the hidden size), one KV head (o_proj's smoothing groups all query heads onto it), rope scaling, a
sliding window; and Qwen3, which the family covers too (per-head RMSNorms on the query and key
projections' outputs, before rope and the KV cache). Each must quantize, stay close to its float model,
and reload to the same outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from quantmint import get_preset, load_quantized, quant_state, quantize, save_quantized
from tests.conftest import VOCAB, byte_tokenizer

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)
_ROPE3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "biases": lambda: transformers.LlamaConfig(**_COMMON, mlp_bias=True, attention_bias=True),
    "head_dim_32": lambda: transformers.LlamaConfig(**_COMMON, head_dim=32),
    "one_kv_head": lambda: transformers.LlamaConfig(**{**_COMMON, "num_key_value_heads": 1}),
    "llama3_rope": lambda: transformers.LlamaConfig(**_COMMON, rope_scaling=_ROPE3),
    "mistral_window": lambda: transformers.MistralConfig(**_COMMON, sliding_window=16),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=32),
}
CONFIGS = {
    "w8a8-c8": lambda: get_preset("w8a8-c8"),
    "w8a8+hadamard": lambda: get_preset("w8a8").with_updates(algorithm_args={"hadamard": True}),
}


def _model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = VARIANTS[variant]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if variant == "biases":  # transformers starts biases at zero: give them values smoothing must carry
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.05)
    if variant == "qwen3":  # q/k norms start at one: give them the spread a trained model's have
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.uniform_(0.5, 1.5)
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_quantizes_close_to_float_and_reloads(variant: str, config: str, tmp_path: Path) -> None:
    model = _model(variant)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, VOCAB, (48,), generator=generator) for _ in range(8)]
    ids = torch.randint(0, VOCAB, (2, 40), generator=generator)  # 40 > the window of 16
    before = _logits(model, ids)
    quantize(model, CONFIGS[config](), calibration=calibration)
    state = quant_state(model)
    assert state is not None and len(state.modules) == 2 * 7
    after = _logits(model, ids)
    # int8 weights and activations on a 2-block model: 0.3-1.0% of the logits' norm here; a smoothing
    # scale applied to one side only moves them by more (leaving the biases unscaled: 3.5%, 15% rotated)
    error = float((after - before).norm() / before.norm())
    assert error < 0.025, error
    assert float((after.argmax(-1) == before.argmax(-1)).float().mean()) >= 0.8
    save_quantized(model, tmp_path / "q", tokenizer=byte_tokenizer())
    reloaded = load_quantized(tmp_path / "q")
    torch.testing.assert_close(_logits(reloaded, ids), after, rtol=1e-4, atol=1e-4)
