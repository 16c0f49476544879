"""Quantized layers ("cells"): the fake-quant layer of the apply phase and the interface that real
int8 layers of a runtime implement (see `quantmint.backends.torch` for the reference one)."""

from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear

__all__ = ["FakeQuantLinear", "QuantizedLinear"]
