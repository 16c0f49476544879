"""A C8 checkpoint's KV cache in vLLM: its calibrated K/V ranges as vLLM's per-tensor 8-bit cache scales.

quantmint's C8 stores, per attention module, the per-channel int8 scales of the cached K and V
(`<attention>.k_scale`, `<attention>.v_scale`, float32 [kv heads x head dim], `scale = max|x| / 127`). vLLM
keeps no int8 cache on CPU; its CPU attention (and every CUDA backend) keeps an fp8 cache with one scale
per tensor (`cached = x / scale` in fp8, `scale = max|x| / fp8 max`), the same byte per element. So the
largest calibrated range of a layer becomes its fp8 scale: `k_scale_fp8 = max_c(k_scale_c) * 127 /
finfo(fp8).max` (e4m3: 448), the cache format vLLM picks by default for a C8 checkpoint (the config's
`kv_cache_scheme`, as for an llm-compressor FP8-KV checkpoint). A cache dtype the user chose explicitly
wins: `int8_per_token_head` (CUDA Triton) computes its scales per token and head at write time; `auto`
from `--kv-cache float` keeps the model's float dtype and ignores the scales.

Every attention layer of a C8 model must receive its two scales from the checkpoint: a layer left at
vLLM's placeholder would cache with scale 1.0 and clip, so it is refused by name.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod, KVCacheScaleParameter

__all__ = ["FP8_KV_CACHE_SCHEME", "QuantmintKVCacheMethod", "fp8_scale_of_int8_scales"]

logger = init_logger(f"vllm.{__name__}")  # under vLLM's "vllm" logger, whose handler prints info lines

# What vLLM's Attention reads from a quantization config to pick an fp8 cache when the user left
# `--kv-cache-dtype auto` (vllm/model_executor/layers/attention/attention.py).
FP8_KV_CACHE_SCHEME = {
    "num_bits": 8,
    "type": "float",
    "strategy": "tensor",
    "dynamic": False,
    "symmetric": True,
}

_INT8_MAX = 127.0


def _fp8_max(kv_cache_dtype: str) -> float | None:
    """The largest finite value of the cache's fp8 format, or None for a cache that takes no static
    per-tensor scale (float, or a per-token-head int8 / fp8 cache)."""
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return float(torch.finfo(torch.float8_e4m3fn).max)
    if kv_cache_dtype == "fp8_e5m2":
        return float(torch.finfo(torch.float8_e5m2).max)
    return None


def fp8_scale_of_int8_scales(int8_scales: torch.Tensor, fp8_max: float) -> float:
    """The per-tensor fp8 scale covering the calibrated range of per-channel int8 scales."""
    return float(int8_scales.detach().float().abs().max()) * _INT8_MAX / fp8_max


class QuantmintKVCacheMethod(BaseKVCacheMethod):
    """vLLM's KV-cache scale handling, loading quantmint's per-channel int8 scales as per-tensor fp8
    ones (see the module docstring)."""

    def __init__(self, quant_config: QuantizationConfig, prefix: str) -> None:
        super().__init__(quant_config)
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module) -> None:
        super().create_weights(layer)
        fp8_max = _fp8_max(getattr(layer, "kv_cache_dtype", "auto"))
        prefix = self.prefix

        def load(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
            if loaded.dim() != 1 or loaded.numel() == 0 or not bool(torch.isfinite(loaded).all()):
                raise ValueError(
                    f"{prefix}: a C8 K/V scale must be a finite per-channel vector, got shape "
                    f"{tuple(loaded.shape)}: the checkpoint is damaged; quantize it again"
                )
            if fp8_max is None:  # a float or per-token-head cache: the static scale is not used
                param.data.fill_(1.0)
                return
            param.data.fill_(fp8_scale_of_int8_scales(loaded, fp8_max))

        layer.k_scale.weight_loader = load
        layer.v_scale.weight_loader = load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        missing = [
            name
            for name in ("k_scale", "v_scale")
            if isinstance(getattr(layer, name, None), KVCacheScaleParameter)
            and float(getattr(layer, name)) <= 0
        ]
        if missing:
            raise ValueError(
                f"quantmint C8: attention layer {self.prefix} got no {' or '.join(missing)} from the "
                "checkpoint, so vLLM would cache its K/V with scale 1.0: serve it with a float KV cache "
                "(quantmint serve --kv-cache float), or quantize every attention module with C8"
            )
        super().process_weights_after_loading(layer)
        logger.info_once(
            "quantmint C8: KV cache %s, per-tensor scales from the calibrated ranges (%s: k %.4g, v %.4g)",
            getattr(layer, "kv_cache_dtype", "auto"),
            self.prefix,
            getattr(layer, "_k_scale_float", float("nan")),
            getattr(layer, "_v_scale_float", float("nan")),
        )
