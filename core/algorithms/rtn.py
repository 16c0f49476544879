"""RoundToNearest (RTN): MinMax range per output channel, round to nearest, no data needed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantmint.algorithms.rotation import carry_rotation
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.config import QuantArgs
from quantmint.errors import QuantmintError
from quantmint.extension.family import LinearAdapter
from quantmint.numerics import quant_math

if TYPE_CHECKING:
    from quantmint.algorithms.observers import InputObserver
    from quantmint.extension.family import ModelFamily

__all__ = ["RoundToNearest"]


class RoundToNearest:
    """Weight quantization module: replaces a float linear with a `FakeQuantLinear`.

    The scale of each output channel is max|W_row| / qmax (or one scale per group of `group_size`
    columns, or one for the tensor), so the largest weight of a group maps to ±qmax exactly (127 for
    8 bits, 7 for 4 bits). Asymmetric 4-bit weights (`symmetric: false`) take each group's [min, max]
    (widened to hold 0) onto [0, 15] with a zero point (`quant_math.quantize_weight_asymmetric`).

    With `activations`, the linear's input is int8-rounded too (W8A8 / W4A8): per token at run time, or
    per tensor with a static scale from the calibration observer. This object is the recipe's
    `quantmint.algorithms.base.Rounding` (what the pipeline asks of the step that rounds weights).
    """

    def __init__(
        self,
        args: QuantArgs,
        activations: QuantArgs | None = None,
        w8a16_outlier_ratio: float | None = None,
    ) -> None:
        self.args = args
        self.activations = activations
        self.w8a16_outlier_ratio = w8a16_outlier_ratio

    # --- what the pipeline asks (see `Rounding`) -------------------------------------------------
    @property
    def scheme(self) -> str:
        """`w8a16`, `w8a8`, `w4a16` or `w4a8` (see the cells)."""
        return f"w{self.args.num_bits}a{8 if self.activations is not None else 16}"

    @property
    def num_bits(self) -> int:
        return self.args.num_bits

    @property
    def file_rounding(self) -> tuple[str, int] | None:
        if not self.args.symmetric:  # the file kernel rounds symmetrically: read, then round
            return None
        return (self.args.strategy, self.args.num_bits)

    @property
    def static_input(self) -> bool:
        """Whether a W?A8 linear's input scale is static (measured on calibration data)."""
        return self.activations is not None and not self.activations.dynamic

    @property
    def input_percentile(self) -> float | None:
        """The percentile the input observers clip static activation ranges to (None: min-max)."""
        act = self.activations
        return act.percentile if act is not None and act.observer == "percentile" else None

    @property
    def reads_token_ranges(self) -> bool:
        """Whether `scheme_for` reads the observers' token ranges (only for `w8a16_outlier_ratio`)."""
        return self.w8a16_outlier_ratio is not None

    def scheme_for(self, observer: InputObserver | None) -> str:
        """`scheme`, or its a16 twin for a W?A8 linear whose input has an outlier token (see
        `AlgorithmArgs.w8a16_outlier_ratio`). Linears that share an input decide alike."""
        ratio = self.w8a16_outlier_ratio
        outlier = ratio is not None and observer is not None and observer.token_outlier_ratio() > ratio
        return self.scheme.replace("a8", "a16") if outlier else self.scheme

    def weight_scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of a linear's `weight_scale` (see `quant_math.weight_absmax`)."""
        if self.args.strategy == "tensor":
            return (1, 1)
        if self.args.strategy == "group":
            assert self.args.group_size is not None
            return (out_features, -(-in_features // self.args.group_size))
        return (out_features, 1)

    def fake_linear(
        self,
        module: nn.Module,
        family: ModelFamily,
        observer: InputObserver | None,
        smoothing: torch.Tensor | None,
        convert_only: bool = False,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
        name: str | None = None,
    ) -> FakeQuantLinear:
        """The fake-quantized twin of one float linear (weights RTN, activations as configured);
        `convert_only` and `quantized` as in `fake_quantize`. A weight holding NaN or inf (whose scale
        would be NaN or inf) is refused, naming the linear (`name`)."""
        scheme = self.scheme_for(observer)
        fake = self.fake_quantize(
            module, family.adapter, scheme, convert_only=convert_only, quantized=quantized
        )
        where = name or type(module).__name__
        if not bool(torch.isfinite(fake.weight_scale).all()):
            raise QuantmintError(
                f"the float weight of {where} holds NaN or inf values (its int8 scale would be NaN or inf): "
                "the float model is corrupt (or was made so by smoothing); check it with torch.isfinite"
            )
        if scheme.endswith("a8"):
            fake.quantize_input = True
            if self.static_input:
                assert observer is not None
                amax = torch.tensor(observer.tensor_range(smoothing), dtype=torch.float32)
                fake.input_scale = quant_math.qparams_from_absmax(amax).reshape(1)
                if not bool(torch.isfinite(fake.input_scale).all()):
                    raise QuantmintError(
                        f"the calibration inputs of {where} hold NaN or inf values (its static input scale "
                        "would be NaN or inf): the float model or the calibration data is corrupt"
                    )
        return carry_rotation(module, fake)

    # --- the rounding itself ---------------------------------------------------------------------
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
        args = self.args
        zero_point = None
        if quantized is None and not args.symmetric:
            q, scale, zero_point = quant_math.quantize_weight_asymmetric(
                weight, args.strategy, args.num_bits, args.group_size
            )
        else:
            q, scale = quantized or quant_math.quantize_weight(
                weight, args.strategy, args.num_bits, args.group_size
            )
        bias = adapter.bias(module)
        fake = FakeQuantLinear(
            weight=torch.empty_like(weight, device="meta")
            if convert_only
            else quant_math.dequantize_weight(q, scale, weight.dtype, args.group_size, zero_point),
            bias=None if bias is None else bias.detach().clone(),
            weight_scale=scale,
            scheme=scheme,
            source_type=type(module).__name__,
            group_size=args.group_size,
            weight_zero_point=zero_point,
        )
        if convert_only:
            fake.known_int_weight = q
        return fake
