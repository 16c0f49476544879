"""Int8 KV cache (C8), the calibration side: static scales observed at the K/V projections. The cache that
really stores int8 keys and values at inference time is a runtime's (`Runtime.kv_cache`; the torch
runtime's is `quantmint.backends.torch.kv_cache.Int8KVCache`), found with
`quantmint.extension.registry.kv_cache_class`.

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

from quantmint.extension.family import BlockLayout, KVProjections
from quantmint.numerics import quant_math

__all__ = ["KVObserver", "attention_module_name", "kv_cache_bytes"]


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


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a transformers cache stores: its own `nbytes()` where it has one (a
    runtime's int8 cache, scales included), else the float key and value tensors of its layers."""
    if callable(getattr(cache, "nbytes", None)):
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def __getattr__(name: str) -> Any:
    """`Int8KVCache` and `Int8KVCacheLayer`, kept importable from here: the int8 KV cache of the runtime
    that serves it (`registry.kv_cache_class`), without core importing a backend."""
    if name in ("Int8KVCache", "Int8KVCacheLayer"):
        from quantmint.extension import registry

        cache = registry.kv_cache_class()
        return cache if name == "Int8KVCache" else cache.layer_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
