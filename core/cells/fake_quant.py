"""The apply-phase layer: float weights rounded onto the int8 grid, kept with their scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantmint.numerics import quant_math

__all__ = ["FakeQuantLinear", "fake_quantize_activation"]


def fake_quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """Round activations [..., in] onto the int8 grid: per token when `input_scale` is None (dynamic),
    else with the static per-tensor scale (a 1-element float32 tensor). Same shape and dtype as x."""
    q, scale = quant_math.quantize_activation(x, input_scale, dtype=torch.float32)
    return (q * scale).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """`y = fq(x) @ W_q.T + b` where `W_q = q * weight_scale` is already on the int grid (float dtype).

    Its outputs are what the converted int8 layer computes, up to float rounding, so accuracy can be
    checked before converting. It replaces any linear-like module (also GPT2's `Conv1D`): the weight
    is always held as [out_features, in_features].

    Tensors: `weight` [out, in] float, `weight_scale` float32 [out, 1] (per channel), [1, 1] (per
    tensor) or [out, groups] (per group), `bias` [out] or None, and with static int8 activations
    `input_scale` float32 [1]. `quantize_input` turns activation fake-quantization on (schemes `w8a8`,
    `w4a8`). `group_size` is the number of columns per scale group when there are several per row.
    Asymmetric 4-bit weights also hold `weight_zero_point` int8 [out, groups] in [0, 15] (shaped like
    `weight_scale`; None when symmetric): then `W_q = (q - weight_zero_point) * weight_scale`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_scale: torch.Tensor,
        scheme: str,
        source_type: str = "Linear",
        quantize_input: bool = False,
        input_scale: torch.Tensor | None = None,
        group_size: int | None = None,
        weight_zero_point: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        scale = weight_scale.detach().float()
        self.register_buffer("weight_scale", scale if scale.dim() == 2 else scale.reshape(-1, 1))
        # A None buffer is not saved; assigning a tensor later (static calibration) makes it one.
        self.register_buffer(
            "input_scale", None if input_scale is None else input_scale.detach().float().reshape(1)
        )
        self.scheme = scheme
        self.source_type = source_type
        self.quantize_input = quantize_input
        self.group_size = group_size if scale.dim() == 2 and scale.shape[-1] > 1 else None
        zp = None if weight_zero_point is None else weight_zero_point.detach().to(torch.int8)
        if zp is not None and zp.shape != self.weight_scale.shape:
            raise ValueError(
                f"weight_zero_point {tuple(zp.shape)} must have weight_scale's shape "
                f"{tuple(self.weight_scale.shape)}"
            )
        self.register_buffer("weight_zero_point", zp)

    # The integers the weight was rounded to, when whoever rounded it kept them (streaming RTN), so
    # that converting does not round again. Re-rounding the dequantized weight gives the same
    # integers in any float dtype (tested), so this only saves time: the in-memory path re-rounds.
    known_int_weight: torch.Tensor | None = None

    def integer_weight(self, num_bits: int = 8) -> torch.Tensor:
        """The weight's integers q [out, in] (int8 storage): `weight / weight_scale`, rounded (plus
        the zero point, on the unsigned grid [0, 2^b - 1], for asymmetric weights)."""
        if self.known_int_weight is not None:
            return self.known_int_weight
        shape, group_size = self.weight.shape, self.group_size
        scale = quant_math.expand_weight_scale(self.weight_scale, shape, group_size)
        zp = self.weight_zero_point
        if zp is None:
            return quant_math.quantize(self.weight.data, scale, num_bits=num_bits)
        zp = quant_math.expand_weight_scale(zp, shape, group_size)
        return quant_math.quantize(self.weight.data, scale, zp, num_bits=num_bits, unsigned=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = fake_quantize_activation(x, self.input_scale)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        acts = (
            ""
            if not self.quantize_input
            else (", act=static" if self.input_scale is not None else ", act=dynamic")
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
            f"{acts}, replaces={self.source_type}"
        )
