"""The int8 KV cache runtime (C8): a transformers `Cache` that really stores int8 keys and values, with the
static scales calibrated at the K/V projections (`quantmint.algorithms.kv_cache`, buffers `k_scale` /
`v_scale` on each
attention module). The torch runtime declares it (`Runtime.kv_cache`), so
`quantmint.extension.registry.kv_cache_class`
finds it by capability.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from quantmint.errors import ConfigError
from quantmint.numerics import quant_math

__all__ = ["Int8KVCache", "Int8KVCacheLayer"]


def _per_channel(scale: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Any stored scale shape -> [kv_heads, 1, head_dim] to broadcast over [batch, heads, tokens, dim]."""
    if scale.numel() == kv_heads * head_dim:
        return scale.reshape(kv_heads, 1, head_dim)
    if scale.numel() == kv_heads:
        return scale.reshape(kv_heads, 1, 1).expand(kv_heads, 1, head_dim)
    return scale.reshape(1, 1, 1).expand(kv_heads, 1, head_dim)


class Int8KVCacheLayer(DynamicLayer):
    """One layer's cache: int8 keys/values [batch, kv_heads, tokens, head_dim] plus static scales.

    `update` quantizes the new states, appends them, and returns the whole cache dequantized to the
    model's dtype for this step's attention (a transient tensor; the stored cache stays int8).
    """

    def __init__(self, k_scale: torch.Tensor, v_scale: torch.Tensor, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.k_scale = _per_channel(k_scale.float(), kv_heads, head_dim)
        self.v_scale = _per_channel(v_scale.float(), kv_heads, head_dim)
        self.q_keys: torch.Tensor | None = None
        self.q_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k_scale = self.k_scale.to(self.device)
        self.v_scale = self.v_scale.to(self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        qk = quant_math.quantize(key_states, self.k_scale)
        qv = quant_math.quantize(value_states, self.v_scale)
        self.q_keys = qk if self.q_keys is None else torch.cat([self.q_keys, qk], dim=-2)
        self.q_values = qv if self.q_values is None else torch.cat([self.q_values, qv], dim=-2)
        keys = quant_math.dequantize(self.q_keys, self.k_scale, dtype=self.dtype)
        values = quant_math.dequantize(self.q_values, self.v_scale, dtype=self.dtype)
        return keys, values

    def get_seq_length(self) -> int:
        return 0 if self.q_keys is None else self.q_keys.shape[-2]

    def reset(self) -> None:
        self.q_keys = self.q_values = None
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        if self.q_keys is None:
            return
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        self.q_keys = self.q_keys[..., :max_length, :]
        self.q_values = self.q_values[..., :max_length, :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.q_keys is not None:
            self.q_keys = self.q_keys.index_select(0, beam_idx.to(self.q_keys.device))
            self.q_values = self.q_values.index_select(0, beam_idx.to(self.q_values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.q_keys is not None:
            self.q_keys = self.q_keys.repeat_interleave(repeats, dim=0)
            self.q_values = self.q_values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.q_keys is not None:
            self.q_keys = self.q_keys[indices, ...]
            self.q_values = self.q_values[indices, ...]

    def nbytes(self) -> int:
        if self.q_keys is None:
            return 0
        return self.q_keys.nbytes + self.q_values.nbytes + self.k_scale.nbytes + self.v_scale.nbytes


class Int8KVCache(Cache):
    """A transformers `Cache` of `Int8KVCacheLayer`s, built from a C8 model's calibrated scales.

    Use it like any cache: `model.generate(ids, past_key_values=Int8KVCache.for_model(model))`.
    """

    layer_class = Int8KVCacheLayer

    def __init__(self, layers: list[Int8KVCacheLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model: nn.Module) -> Int8KVCache:
        from quantmint.algorithms.ptq import quant_state

        state = quant_state(model)
        if state is None or not state.kv_modules:
            raise ConfigError("this model has no int8 kv-cache scales: quantize it with a -c8 preset first")
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers = []
        for name in state.kv_modules:
            attn = model.get_submodule(name)
            layers.append(Int8KVCacheLayer(attn.k_scale, attn.v_scale, kv_heads, head_dim))
        return cls(layers)

    def nbytes(self) -> int:
        """Bytes held by the stored int8 keys, values and their scales."""
        return sum(layer.nbytes() for layer in self.layers)
