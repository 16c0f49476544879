"""Int8 KV cache (C8), the calibration side: static scales from the keys and values the model caches.

The cache that really stores int8 keys and values at inference time is a runtime's (`Runtime.kv_cache`;
the torch runtime's is `quantmint.backends.torch.kv_cache.Int8KVCache`), found with
`quantmint.extension.registry.kv_cache_class`.

Scales live on each attention module as buffers `k_scale` and `v_scale` (float32, one per cached K/V
channel, `[kv_heads * head_dim]` in the cache's own (head, dim) order; one per head `[kv_heads]`; or one
`[1]`), the names vLLM uses for kv-cache scales.

**Where K/V are observed.** During calibration each block is called with a `KVRangeCache`, a transformers
`Cache` that stores nothing and records the per-channel maxima of what the attention hands it: keys after
any rotary embedding (full, partial or interleaved), values as cached, grouped-query heads as cached, and
whatever the projection's row layout (separate, fused in thirds, interleaved per head). The family
declares none of this. Only a block that never hands K/V to a cache (an encoder such as BERT) falls back to
the family's `KVProjections`: the declared projections' outputs, read as [q | k | v] thirds when fused and
bounded per rotation pair when `rotary`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from quantmint.errors import ModelMappingError
from quantmint.extension.family import BlockLayout, KVProjections
from quantmint.numerics import quant_math

__all__ = ["KVObserver", "KVRangeCache", "attention_module_name", "kv_cache_bytes", "kv_features"]

# What a transformer block calls its cache argument (Llama, GPT2: past_key_values; GPT-NeoX: layer_past).
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past")


def attention_module_name(kv: KVProjections) -> str:
    """The attention module (relative to a block) that owns the K/V projections, e.g. `self_attn`."""
    return kv.key.rpartition(".")[0]


def kv_features(config: Any) -> int | None:
    """Channels of one token's cached keys (or values): kv_heads x head_dim from a transformers config,
    None when the config does not say."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if not head_dim and heads and hidden:
        head_dim = hidden // heads
    return int(kv_heads * head_dim) if kv_heads and head_dim else None


class KVRangeCache(Cache):
    """A transformers `Cache` that stores nothing and records, per layer, the per-channel max |K| and |V|
    handed to it (float32 `[kv_heads * head_dim]`).

    Hand it to a model (`model(ids, past_key_values=cache, use_cache=True)`) or to one block: `update`
    returns the new states unchanged, so the forward computes what it computes without a cache.
    """

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.k_absmax: dict[int, torch.Tensor] = {}
        self.v_absmax: dict[int, torch.Tensor] = {}

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for seen, states in ((self.k_absmax, key_states), (self.v_absmax, value_states)):
            # [batch, kv_heads, tokens, head_dim] -> one max per (head, dim)
            amax = states.detach().float().abs().amax(dim=(0, 2)).reshape(-1)
            current = seen.get(layer_idx)
            seen[layer_idx] = amax if current is None else torch.maximum(current, amax)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _cache_argument(block: nn.Module) -> str | None:
    """The block's cache argument: a named one, else `past_key_values` through its `**kwargs` (which
    transformers' blocks pass on to their attention), else None (the block takes no cache)."""
    parameters = inspect.signature(block.forward).parameters
    named = next((name for name in _CACHE_ARGUMENTS if name in parameters), None)
    if named is None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return "past_key_values"
    return named


class KVObserver:
    """Per-channel max |K| and |V| of one block: what its attention caches (`KVRangeCache`, handed to the
    block by a forward pre-hook), or, for a block that caches nothing, its declared K/V projections."""

    def __init__(self, block: BlockLayout, kv: KVProjections) -> None:
        self.block = block
        self.kv = kv
        self.cache = KVRangeCache()
        self.k_absmax: torch.Tensor | None = None  # at the projections
        self.v_absmax: torch.Tensor | None = None
        self.handles = []
        argument = _cache_argument(block.module)
        if argument is not None:
            signature = inspect.signature(block.module.forward)

            def hand_cache(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if argument not in signature.parameters:  # through **kwargs
                    return args, {**kwargs, argument: self.cache}
                bound = signature.bind_partial(*args, **kwargs)
                bound.arguments[argument] = self.cache
                return bound.args, bound.kwargs

            self.handles.append(block.module.register_forward_pre_hook(hand_cache, with_kwargs=True))
        key_module = block.module.get_submodule(kv.key)
        if kv.fused:
            self.handles.append(key_module.register_forward_hook(self._fused_hook))
        else:
            value_module = block.module.get_submodule(kv.value)
            self.handles += [
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

    def reduce(self, world: Any, calls: int) -> None:
        """Take the maxima over every rank's calibration batches (data-parallel calibration)."""
        if not world.distributed:
            return
        from quantmint.algorithms.distributed import max_of

        parts = world.gather((self.k_absmax, self.v_absmax, self.cache.k_absmax, self.cache.v_absmax))
        self.k_absmax = max_of([p[0] for p in parts])
        self.v_absmax = max_of([p[1] for p in parts])
        for i, seen in ((2, self.cache.k_absmax), (3, self.cache.v_absmax)):
            for layer in sorted({layer for p in parts for layer in p[i]}):
                seen[layer] = max_of([p[i].get(layer) for p in parts])  # type: ignore[assignment]

    @property
    def cached(self) -> bool:
        """Whether the block handed its K/V to the cache (else the projections' outputs are used)."""
        return bool(self.cache.k_absmax)

    def absmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(max |K|, max |V|) per cached channel, [kv_heads * head_dim] each."""
        if self.cached:
            layers = sorted(self.cache.k_absmax)
            if len(layers) != 1:
                raise ModelMappingError(
                    f"{self.block.name}: the block cached K/V for {len(layers)} attention layers "
                    f"({layers}); C8 stores one k_scale / v_scale per block's attention module"
                )
            return self.cache.k_absmax[layers[0]], self.cache.v_absmax[layers[0]]
        if self.k_absmax is None or self.v_absmax is None:
            raise RuntimeError("the K/V observer saw no data")
        return self.k_absmax, self.v_absmax

    def scales(
        self, strategy: str, head_dim: int, v_divisor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scale, v_scale) for `strategy` channel / head / tensor; `v_divisor` is a smoothing scale
        folded into the value projection's output channels after observation."""
        k, v = self.absmax()
        if not self.cached and self.kv.rotary:
            # Projection outputs are not yet rotated: a rotation mixes channel d with d + head_dim / 2, so
            # each channel's range is bounded by its pair's, sqrt(max|k_d|^2 + max|k_(d+half)|^2).
            pairs = k.reshape(-1, 2, head_dim // 2)
            bound = pairs.pow(2).sum(dim=1, keepdim=True).sqrt()
            k = bound.expand_as(pairs).reshape(-1)
        if v_divisor is not None:
            v = v / self._cache_order(v_divisor, v)
        return _reduce(k, strategy, head_dim), _reduce(v, strategy, head_dim)

    def _cache_order(self, divisor: torch.Tensor, cached_v: torch.Tensor) -> torch.Tensor:
        """`divisor`, per value-projection output channel, in the cache's channel order. They are the same
        order when the cached values are the projection's outputs reshaped to heads, which is checked:
        the maxima at the projection must equal the cached maxima channel by channel."""
        at_projection = self.v_absmax
        if not self.cached or at_projection is None:
            return divisor
        if at_projection.shape != cached_v.shape or not torch.allclose(
            at_projection, cached_v, rtol=1e-5, atol=1e-6
        ):
            raise ModelMappingError(
                f"{self.block.name}: the values cached are not {self.kv.value!r}'s outputs in order, so the "
                f"smoothing scales folded into {self.kv.value!r} cannot be mapped onto the cache's channels; "
                f"remove the smoothing pair that starts at {self.kv.value!r}, or quantize without C8"
            )
        return divisor


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
