"""W8A16: int8 weights with one float scale per output channel; activations stay float."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantmint import quant_math
from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear

__all__ = ["Int8WeightOnlyLinear", "int8_weight_only_linear"]


def int8_weight_only_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias, computed as (x @ weight.T) * scale + bias.

    Args:
        x: [..., in] float (float32, bfloat16, float16, float64).
        weight: [out, in] int8.
        scale: [out] float, one per output channel (any float dtype; used in x's dtype).
        bias: [out] or None.
    Returns:
        [..., out] in x's dtype.

    The int8 weight is converted to x's dtype (exact: every int8 is representable in bf16 and wider)
    and the per-channel scale is applied to the output, so only one cheap elementwise pass touches
    the weight. On this project's AVX2 CPU this beats `aten._weight_int8pack_mm` by 2x at one row and
    by 14-30x at 16-256 rows, and dequantize-weight-then-matmul by about 2x at one row
    (benchmarks/int8_matmul.py prints the side-by-side figures).
    """
    y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


class Int8WeightOnlyLinear(QuantizedLinear):
    """Weight-only int8 linear (scheme `w8a16`).

    Tensors (compressed-tensors names): `weight` int8 [out, in], `weight_scale` float32 [out, 1]
    (or [1, 1] per tensor), `bias` [out] in the model's float dtype, if the layer has one.
    """

    scheme = "w8a16"

    def __init__(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias)
        # Scales in the activation dtype, made on first use, so the forward pass casts nothing twice.
        self._scale_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @classmethod
    def from_fake_quant(cls, layer: FakeQuantLinear) -> Int8WeightOnlyLinear:
        q = quant_math.quantize(layer.weight.data, layer.weight_scale)
        bias = None if layer.bias is None else layer.bias.data.clone()
        return cls(q, layer.weight_scale.clone(), bias)

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, scale_shape: tuple[int, ...]
    ) -> Int8WeightOnlyLinear:
        return cls(
            torch.empty(out_features, in_features, dtype=torch.int8),
            torch.empty(scale_shape, dtype=torch.float32),
            torch.empty(out_features, dtype=dtype) if bias else None,
        )

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._scale_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._scale_cache.clear()
        return super()._apply(fn, recurse)

    def _scale_for(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        scale = self._scale_cache.get(key)
        if scale is None:
            scale = self.weight_scale.reshape(-1).expand(self.out_features).to(x.dtype).contiguous()
            self._scale_cache[key] = scale
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_weight_only_linear(x, self.weight, self._scale_for(x), self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return quant_math.dequantize(self.weight, self.weight_scale)
