"""The interface of a real quantized linear layer, as a runtime (backend) implements it."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quantmint.numerics import quant_math

__all__ = ["QuantizedLinear"]


class QuantizedLinear(nn.Module):
    """A linear layer `y = x @ W.T + b` whose weight is stored quantized.

    Lifecycle: the apply phase leaves a `FakeQuantLinear` with float weights on the int grid and its
    scales; `from_fake_quant` turns it into this cell (convert phase). Deploy mode builds `empty` cells
    with the right tensor names, shapes and dtypes, then fills them from a checkpoint.

    Tensor names follow compressed-tensors (`weight`, `weight_scale`, `input_scale`, `bias`), so one
    checkpoint can be served by vLLM. Subclasses set `scheme` (the key they are registered under).
    """

    scheme: ClassVar[str]

    in_features: int
    out_features: int

    @classmethod
    def from_fake_quant(cls, layer: nn.Module) -> QuantizedLinear:
        """Build the real cell from a `FakeQuantLinear` of the same scheme."""
        raise NotImplementedError

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        scale_shape: tuple[int, ...],
        static_input: bool = False,
    ) -> QuantizedLinear:
        """An uninitialised cell whose state_dict has the names, shapes and dtypes a checkpoint must have.

        `static_input`: activations use a calibrated per-tensor `input_scale` (W8A8 static).
        """
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight [out, in] this cell computes with: int8 `weight` times `weight_scale`."""
        return quant_math.dequantize(self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
