"""The apply-phase layer: float weights rounded onto the int8 grid, kept with their scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FakeQuantLinear"]


class FakeQuantLinear(nn.Module):
    """`y = x @ W_q.T + b` where `W_q = q * weight_scale` is already on the int grid (float dtype).

    Its outputs are what the converted int8 layer computes, up to float rounding, so accuracy can be
    checked before converting. It replaces any linear-like module (also GPT2's `Conv1D`): the weight
    is always held as [out_features, in_features].

    Tensors: `weight` [out, in] float, `weight_scale` float32 [out, 1] (per channel) or [1] (per tensor),
    `bias` [out] or None.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_scale: torch.Tensor,
        scheme: str,
        source_type: str = "Linear",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(-1, 1))
        self.scheme = scheme
        self.source_type = source_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
            f"replaces={self.source_type}"
        )
