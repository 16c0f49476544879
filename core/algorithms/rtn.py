"""RoundToNearest (RTN): MinMax range per output channel, round to nearest, no data needed."""

from __future__ import annotations

from torch import nn

from quantmint import quant_math
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.config import QuantArgs
from quantmint.family import LinearAdapter

__all__ = ["RoundToNearest"]


class RoundToNearest:
    """Weight quantization module: replaces a float linear with a `FakeQuantLinear`.

    The scale of each output channel is max|W_row| / 127 (or one scale for the tensor), so the
    largest weight of a row maps to ±127 exactly.
    """

    def __init__(self, args: QuantArgs) -> None:
        self.args = args

    def fake_quantize(self, module: nn.Module, adapter: LinearAdapter, scheme: str) -> FakeQuantLinear:
        weight = adapter.weight(module).detach()
        granularity = "channel" if self.args.strategy == "channel" else "tensor"
        q, scale = quant_math.quantize_symmetric(weight, granularity, self.args.num_bits)
        bias = adapter.bias(module)
        return FakeQuantLinear(
            weight=quant_math.dequantize(q, scale, dtype=weight.dtype),
            bias=None if bias is None else bias.detach().clone(),
            weight_scale=scale,
            scheme=scheme,
            source_type=type(module).__name__,
        )
