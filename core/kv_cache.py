"""Int8 KV cache (C8): static scales calibrated at the K/V projections, and a transformers `Cache`
that really stores int8 keys and values.

Scales live on each attention module as buffers `k_scale` and `v_scale` (float32, one per K/V output
channel of the projection, `[kv_heads * head_dim]`; one per head `[kv_heads]`; or one `[1]`), the
names vLLM uses for kv-cache scales. Keys are cached after rotary embeddings: for a family whose keys
are rotated (`KVProjections.rotary`), each channel's range is bounded by its rotation pair's,
sqrt(max|k_d|^2 + max|k_(d+half)|^2), since a rotation mixes exactly those two channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from quantmint import quant_math
from quantmint.errors import ConfigError
from quantmint.family import BlockLayout, KVProjections

__all__ = [
    "Int8KVCache",
    "Int8KVCacheLayer",
    "KVObserver",
    "attention_module_name",
    "kv_cache_bytes",
]


def attention_module_name(kv: KVProjections) -> str:
    """The attention module (relative to a block) that owns the K/V projections, e.g. `self_attn`."""
    return kv.key.rpartition(".")[0]


class KVObserver:
    """Per-channel max |K| and |V| at one block's K/V projection outputs (float32 [kv_features])."""

    def __init__(self, block: BlockLayout, kv: KVProjections) -> None:
        self.kv = kv
        self.k_absmax: torch.Tensor | None = None
        self.v_absmax: torch.Tensor | None = None
        key_module = block.module.get_submodule(kv.key)
        if kv.fused:
            self.handles = [key_module.register_forward_hook(self._fused_hook)]
        else:
            value_module = block.module.get_submodule(kv.value)
            self.handles = [
                key_module.register_forward_hook(lambda _m, _a, out: self._update("k", out)),
                value_module.register_forward_hook(lambda _m, _a, out: self._update("v", out)),
            ]

    def _fused_hook(self, _module: nn.Module, _args: Any, out: torch.Tensor) -> None:
        third = out.shape[-1] // 3
        self._update("k", out[..., third : 2 * third])
        self._update("v", out[..., 2 * third :])

    def _update(self, which: str, out: torch.Tensor) -> None:
        amax = out.detach().reshape(-1, out.shape[-1]).float().abs().amax(dim=0)
        name = f"{which}_absmax"
        current = getattr(self, name)
        setattr(self, name, amax if current is None else torch.maximum(current, amax))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def scales(
        self, strategy: str, head_dim: int, v_divisor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scale, v_scale) for `strategy` channel / head / tensor; `v_divisor` is a smoothing scale
        folded into the value projection's outputs after observation."""
        if self.k_absmax is None or self.v_absmax is None:
            raise RuntimeError("the K/V observer saw no data")
        k = self.k_absmax
        if self.kv.rotary:
            pairs = k.reshape(-1, 2, head_dim // 2)
            bound = pairs.pow(2).sum(dim=1, keepdim=True).sqrt()
            k = bound.expand_as(pairs).reshape(-1)
        v = self.v_absmax if v_divisor is None else self.v_absmax / v_divisor
        return _reduce(k, strategy, head_dim), _reduce(v, strategy, head_dim)


def _reduce(amax: torch.Tensor, strategy: str, head_dim: int) -> torch.Tensor:
    if strategy == "head":
        amax = amax.reshape(-1, head_dim).amax(dim=1)
    elif strategy == "tensor":
        amax = amax.amax().reshape(1)
    return quant_math.qparams_from_absmax(amax)


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


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes of the keys and values a transformers cache stores (float or int8)."""
    if isinstance(cache, Int8KVCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total
