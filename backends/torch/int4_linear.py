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
    weight_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ (unpack(weight_packed) * weight_scale).T + bias, activations int8 when `quantize_input`;
    with `weight_zero_point` (asymmetric, W4A16 only) y = x @ ((q - zero_point) * weight_scale).T + bias.

    Args:
        x: [..., in] float.
        weight_packed: [out, ceil(in / 8)] int32 (see `quant_math.pack_int4`).
        weight_scale: float32 [out, groups] (groups = 1: per channel) or [1, 1] (per tensor).
        group_size: columns per group, when there are several groups per row.
        input_scale: static per-tensor activation scale (W4A8), or None for dynamic per-token.
        weight_zero_point: int32 [ceil(out / 8), groups] (see `quant_math.pack_zero_points`): the codes
            are then unsigned, q in [0, 15].
    Returns:
        [..., out] in x's dtype.
    """
    if weight_zero_point is not None:
        if quantize_input:
            raise ValueError("asymmetric 4-bit weights are weight-only: int8 activations take symmetric ones")
        q = quant_math.unpack_uint4(weight_packed, in_features)
        zp = quant_math.unpack_zero_points(weight_zero_point, q.shape[0])
        weight = quant_math.dequantize_weight(q, weight_scale, x.dtype, group_size, zp)
        y = F.linear(x, weight)
        return y if bias is None else y + bias.to(y.dtype)
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
    int64 [2] = (out, in), `bias` [out] in the model's float dtype, if the layer has one. Asymmetric
    weights add `weight_zero_point` int32 [ceil(out / 8), groups] (zero points in [0, 15] packed along
    the output dimension, `quant_math.pack_zero_points`); their codes are unsigned, [0, 15], and the
    weight is (q - zero_point) * weight_scale.
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
        weight_zero_point: torch.Tensor | None = None,
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
        if weight_zero_point is not None:
            if self.quantize_input:
                raise ValueError(
                    "asymmetric 4-bit weights are weight-only (w4a16): w4a8 takes symmetric ones"
                )
            want = (-(-self.out_features // 8), weight_scale.shape[-1])
            if weight_zero_point.dtype != torch.int32 or tuple(weight_zero_point.shape) != want:
                raise ValueError(
                    f"weight_zero_point must be int32 {want}, got {weight_zero_point.dtype} "
                    f"{tuple(weight_zero_point.shape)}"
                )
            weight_zero_point = weight_zero_point.contiguous()
        self.register_buffer("weight_zero_point", weight_zero_point)
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """The int4 values unpacked to int8 [out, in] (a fresh tensor on every call): in [-7, 7], or the
        unsigned codes in [0, 15] of asymmetric weights."""
        if self.weight_zero_point is not None:
            return quant_math.unpack_uint4(self.weight_packed, self.in_features)
        return quant_math.unpack_int4(self.weight_packed, self.in_features)

    @property
    def zero_point(self) -> torch.Tensor | None:
        """The zero points int8 [out, groups] in [0, 15] of asymmetric weights, else None."""
        if self.weight_zero_point is None:
            return None
        return quant_math.unpack_zero_points(self.weight_zero_point, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return quant_math.dequantize_weight(
            self.weight, self.weight_scale, group_size=self.group_size, zero_point=self.zero_point
        )

    @classmethod
    def from_fake_quant(cls, layer: FakeQuantLinear) -> Int4WeightOnlyLinear:
        scale = layer.weight_scale
        q = layer.integer_weight(4)
        bias = None if layer.bias is None else layer.bias.data.clone()
        input_scale = None if layer.input_scale is None else layer.input_scale.clone()
        zp = layer.weight_zero_point
        if zp is not None:
            return cls(
                quant_math.pack_uint4(q),
                scale.clone(),
                layer.in_features,
                bias,
                input_scale,
                layer.group_size,
                quant_math.pack_zero_points(zp),
            )
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
        zero_points: bool = False,
    ) -> Int4WeightOnlyLinear:
        """`zero_points`: asymmetric weights, with a `weight_zero_point` tensor."""
        zp_shape = (-(-out_features // 8), scale_shape[-1])
        return cls(
            torch.empty(out_features, -(-in_features // 8), dtype=torch.int32),
            torch.empty(scale_shape, dtype=torch.float32),
            in_features,
            torch.empty(out_features, dtype=dtype) if bias else None,
            torch.empty(1, dtype=torch.float32) if static_input else None,
            group_size,
            torch.empty(zp_shape, dtype=torch.int32) if zero_points else None,
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
            self.weight_zero_point,
        )


class Int4Linear(Int4WeightOnlyLinear):
    """4-bit weights with int8 activations, per token (dynamic) or per tensor (static; `input_scale`
    float32 [1]), scheme `w4a8`. Same tensors as `Int4WeightOnlyLinear`."""

    scheme = "w4a8"
    quantize_input = True
