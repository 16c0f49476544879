"""RoundToNearest (RTN): MinMax range per output channel, round to nearest, no data needed."""

from __future__ import annotations

import torch
from torch import nn

from quantmint import quant_math
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.config import QuantArgs
from quantmint.family import LinearAdapter

__all__ = ["RoundToNearest"]


class RoundToNearest:
    """Weight quantization module: replaces a float linear with a `FakeQuantLinear`.

    The scale of each output channel is max|W_row| / qmax (or one scale per group of `group_size`
    columns, or one for the tensor), so the largest weight of a group maps to ±qmax exactly (127 for
    8 bits, 7 for 4 bits).
    """

    def __init__(self, args: QuantArgs) -> None:
        self.args = args

    def fake_quantize(
        self,
        module: nn.Module,
        adapter: LinearAdapter,
        scheme: str,
        convert_only: bool = False,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> FakeQuantLinear:
        """The fake-quantized twin of `module`. With `convert_only` (streaming RTN), it keeps the
        integers (`known_int_weight`) and leaves its float weight on `meta`: it cannot run, only be
        converted, and nothing is dequantized or rounded twice. `quantized` is the weight's
        `quantize_weight` result when the caller already has it (then the weight may be on `meta`)."""
        weight = adapter.weight(module).detach()
        if quantized is not None and not convert_only:
            raise ValueError("quantized integers are taken only with convert_only (the weight is not read)")
        q, scale = quantized or quant_math.quantize_weight(
            weight, self.args.strategy, self.args.num_bits, self.args.group_size
        )
        bias = adapter.bias(module)
        fake = FakeQuantLinear(
            weight=torch.empty_like(weight, device="meta")
            if convert_only
            else quant_math.dequantize_weight(q, scale, weight.dtype, self.args.group_size),
            bias=None if bias is None else bias.detach().clone(),
            weight_scale=scale,
            scheme=scheme,
            source_type=type(module).__name__,
            group_size=self.args.group_size,
        )
        if convert_only:
            fake.known_int_weight = q
        return fake
