"""W4A16 and W4A8: 4-bit weights packed eight to an int32, one scale per output channel or per group.

The reference CPU path keeps only the packed weight in memory (half a byte per weight) and unpacks it
to int8 on every call, then:
- W4A16: casts it to the activation dtype, multiplies by the per-group scales and calls F.linear;
- W4A8 per channel: the exact int8 x int8 -> int32 matmul of the W8A8 cell (int4 values are int8
  values), scales after;
- W4A8 per group: the int8 activations times the dequantized weight in float32 (per-group scales cannot
  be applied after one int32 matmul over all groups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantmint.backends.torch.int8_linear import int8_linear, quantize_activations
from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.numerics import quant_math

__all__ = ["Int4Linear", "Int4WeightOnlyLinear", "int4_linear"]


def int4_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: int,
    quantize_input: bool,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """y = x @ (unpack(weight_packed) * weight_scale).T + bias, activations int8 when `quantize_input`.

    Args:
        x: [..., in] float.
        weight_packed: [out, ceil(in / 8)] int32 (see `quant_math.pack_int4`).
        weight_scale: float32 [out, groups] (groups = 1: per channel) or [1, 1] (per tensor).
        group_size: columns per group, when there are several groups per row.
        input_scale: static per-tensor activation scale (W4A8), or None for dynamic per-token.
    Returns:
        [..., out] in x's dtype.
    """
    q = quant_math.unpack_int4(weight_packed, in_features)
    if quantize_input:
        if weight_scale.shape[-1] == 1:
            return int8_linear(x, q, weight_scale, input_scale, bias)
        shape = x.shape
        x_q, x_scale = quantize_activations(x.reshape(-1, shape[-1]), input_scale)
        y = F.linear(x_q.float(), quant_math.dequantize_weight(q, weight_scale, group_size=group_size)).mul_(
            x_scale
        )
        if bias is not None:
            y.add_(bias.float())
        return y.to(x.dtype).reshape(*shape[:-1], q.shape[0])
    if weight_scale.shape[-1] == 1:
        y = F.linear(x, q.to(x.dtype)) * weight_scale.reshape(1, -1).to(x.dtype)
    else:
        y = F.linear(x, quant_math.dequantize_weight(q, weight_scale, x.dtype, group_size))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


class Int4WeightOnlyLinear(QuantizedLinear):
    """Weight-only 4-bit linear (scheme `w4a16`).

    Tensors (compressed-tensors `pack-quantized` names): `weight_packed` int32 [out, ceil(in / 8)],
    `weight_scale` float32 [out, groups] (or [out, 1] per channel, [1, 1] per tensor), `weight_shape`
    int64 [2] = (out, in), `bias` [out] in the model's float dtype, if the layer has one.
    """

    scheme = "w4a16"
    quantize_input = False

    def __init__(
        self,
        weight_packed: torch.Tensor,
        weight_scale: torch.Tensor,
        in_features: int,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
            raise ValueError(
                f"weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype} "
                f"{tuple(weight_packed.shape)}"
            )
        if weight_packed.shape[1] != -(-in_features // 8):
            raise ValueError(
                f"weight_packed has {weight_packed.shape[1]} words per row; {in_features} int4 values "
                f"need {-(-in_features // 8)}"
            )
        if input_scale is not None and not self.quantize_input:
            raise ValueError("W4A16 keeps activations float: a static input scale belongs to the w4a8 cell")
        self.out_features, self.in_features = weight_packed.shape[0], in_features
        groups = weight_scale.shape[-1]
        if groups > 1 and (not group_size or -(-in_features // group_size) != groups):
            raise ValueError(f"{groups} scale groups over {in_features} columns need their group_size")
        self.group_size = group_size if groups > 1 else None
        self.register_buffer("weight_packed", weight_packed.contiguous())
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("weight_shape", torch.tensor([self.out_features, in_features]))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """The int4 values unpacked to int8 [out, in] (a fresh tensor on every call)."""
        return quant_math.unpack_int4(self.weight_packed, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return quant_math.dequantize_weight(self.weight, self.weight_scale, group_size=self.group_size)

    @classmethod
    def from_fake_quant(cls, layer: FakeQuantLinear) -> Int4WeightOnlyLinear:
        scale = layer.weight_scale
        q = layer.integer_weight(4)
        bias = None if layer.bias is None else layer.bias.data.clone()
        input_scale = None if layer.input_scale is None else layer.input_scale.clone()
        return cls(
            quant_math.pack_int4(q), scale.clone(), layer.in_features, bias, input_scale, layer.group_size
        )

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        scale_shape: tuple[int, ...],
        static_input: bool = False,
        group_size: int | None = None,
    ) -> Int4WeightOnlyLinear:
        return cls(
            torch.empty(out_features, -(-in_features // 8), dtype=torch.int32),
            torch.empty(scale_shape, dtype=torch.float32),
            in_features,
            torch.empty(out_features, dtype=dtype) if bias else None,
            torch.empty(1, dtype=torch.float32) if static_input else None,
            group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(
            x,
            self.weight_packed,
            self.weight_scale,
            self.in_features,
            self.quantize_input,
            self.input_scale,
            self.bias,
            self.group_size,
        )


class Int4Linear(Int4WeightOnlyLinear):
    """4-bit weights with int8 activations, per token (dynamic) or per tensor (static; `input_scale`
    float32 [1]), scheme `w4a8`. Same tensors as `Int4WeightOnlyLinear`."""

    scheme = "w4a8"
    quantize_input = True
