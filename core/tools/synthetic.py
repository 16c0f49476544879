"""Synthetic Llama-shaped checkpoints of a chosen size, for measuring scale without downloads.

`make_synthetic_llama` writes a Hugging Face directory (`config.json`, sharded bf16 safetensors with
their index, optionally a tokenizer copied from another model) whose weights are seeded random
normals (std 0.02, norms at 1). The shapes follow Llama 3 (grouped-query attention with 4 query
heads per KV head, head dim 128, MLP 3.5x hidden); hidden size grows with the target size and the
number of blocks is chosen to land on it. Tensors are generated and written one at a time, so an
8 GB checkpoint needs no more than its largest tensor in memory.

CLI: `quantmint synth-model OUT --size 8GB [--tokenizer DIR]`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from quantmint.errors import ConfigError
from quantmint.formats.checkpoint import parse_size, write_shard
from quantmint.formats.hf import staged_directory
from quantmint.formats.safetensors_io import INDEX_NAME, TensorSpec, plan_shards, shard_names
from quantmint.io.outdir import SYNTHETIC_KEY, prepare_output

__all__ = ["make_synthetic_llama", "synthetic_llama_config"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def synthetic_llama_config(size_bytes: int, vocab_size: int = 32000) -> dict[str, Any]:
    """Llama config keys whose bf16 weights take about `size_bytes`."""
    params = size_bytes // 2
    widths = ((40_000_000, 256), (200_000_000, 512), (750_000_000, 1024), (2_000_000_000, 2048))
    hidden = next((width for limit, width in widths if params < limit), 4096)
    intermediate = hidden * 7 // 2
    heads = hidden // 128
    kv_heads = max(1, heads // 4)
    per_block = 2 * hidden * hidden + 2 * hidden * kv_heads * 128 + 3 * hidden * intermediate + 2 * hidden
    outside = 2 * vocab_size * hidden + hidden
    blocks = max(1, round((params - outside) / per_block))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 128,
        "vocab_size": vocab_size,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }


def _specs(cfg: dict[str, Any]) -> list[TensorSpec]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    bf16 = torch.bfloat16
    specs = [TensorSpec("model.embed_tokens.weight", bf16, (v, h))]
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}"
        specs += [
            TensorSpec(f"{p}.input_layernorm.weight", bf16, (h,)),
            TensorSpec(f"{p}.self_attn.q_proj.weight", bf16, (q, h)),
            TensorSpec(f"{p}.self_attn.k_proj.weight", bf16, (kv, h)),
            TensorSpec(f"{p}.self_attn.v_proj.weight", bf16, (kv, h)),
            TensorSpec(f"{p}.self_attn.o_proj.weight", bf16, (h, q)),
            TensorSpec(f"{p}.post_attention_layernorm.weight", bf16, (h,)),
            TensorSpec(f"{p}.mlp.gate_proj.weight", bf16, (i, h)),
            TensorSpec(f"{p}.mlp.up_proj.weight", bf16, (i, h)),
            TensorSpec(f"{p}.mlp.down_proj.weight", bf16, (h, i)),
        ]
    specs += [TensorSpec("model.norm.weight", bf16, (h,)), TensorSpec("lm_head.weight", bf16, (v, h))]
    return specs


def make_synthetic_llama(
    out_dir: str | os.PathLike[str],
    size: int | str = "2GB",
    seed: int = 0,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic Llama checkpoint of about `size` bytes of bf16 weights into `out_dir`.

    Args:
        tokenizer_dir: a model directory whose tokenizer files are copied (its vocabulary size sets
            the model's), so text calibration works; without it the vocabulary is 32,000 and the
            directory has no tokenizer.
    Returns:
        The config written, plus `bytes` (tensor bytes) and `shards`.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    prepare_output(out, [tokenizer_dir], overwrite)
    vocab = 32000
    if tokenizer_dir is not None:
        from quantmint.io.models import load_tokenizer

        vocab = len(load_tokenizer(tokenizer_dir))
        vocab += -vocab % 64
    target = parse_size(size)
    if target < 50_000_000:
        raise ConfigError(f"size {size!r} is too small for a Llama-shaped model; ask for at least 50MB")
    cfg = synthetic_llama_config(target, vocab)
    specs = _specs(cfg)
    shards = plan_shards(specs, parse_size(max_shard_size))
    planned = list(zip(shard_names(len(shards)), shards, strict=True))
    by_name = {spec.name: spec for spec in specs}
    index = {name: i for i, name in enumerate(by_name)}

    def fetch(name: str) -> torch.Tensor:
        spec = by_name[name]
        if len(spec.shape) == 1:
            return torch.ones(spec.shape, dtype=spec.dtype)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index[name])
        return (torch.randn(spec.shape, generator=gen) * 0.02).to(spec.dtype)

    with staged_directory(out, overwrite=overwrite, inputs=[tokenizer_dir]) as tmp:
        import json

        for name, shard in planned:
            write_shard(tmp / name, shard, fetch)
        if len(planned) > 1:
            weight_map = {spec.name: name for name, shard in planned for spec in shard}
            total = sum(spec.nbytes for spec in specs)
            (tmp / INDEX_NAME).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        # The marker lets `--overwrite` replace this directory later (quantmint.io.outdir).
        (tmp / "config.json").write_text(json.dumps({**cfg, SYNTHETIC_KEY: True}, indent=2) + "\n")
        if tokenizer_dir is not None:
            for file in _TOKENIZER_FILES:
                if (Path(tokenizer_dir) / file).is_file():
                    shutil.copy(Path(tokenizer_dir) / file, tmp / file)
    return {**cfg, "bytes": sum(spec.nbytes for spec in specs), "shards": len(planned)}
