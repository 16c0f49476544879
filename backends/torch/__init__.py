"""The reference PyTorch runtime: real int8 layers (cells) that run anywhere torch runs.

Registered through the `quantmint` entry-point group like any third-party runtime.
"""

from __future__ import annotations

from collections.abc import Callable

from quantmint.backends.torch.int4_linear import Int4Linear, Int4WeightOnlyLinear, int4_linear
from quantmint.backends.torch.int8_linear import Int8Linear, int8_int8_matmul
from quantmint.backends.torch.int8_weight_only import Int8WeightOnlyLinear, int8_weight_only_linear
from quantmint.hookspecs import hookimpl

__all__ = [
    "Int4Linear",
    "Int4WeightOnlyLinear",
    "Int8Linear",
    "Int8WeightOnlyLinear",
    "int4_linear",
    "int8_int8_matmul",
    "int8_weight_only_linear",
]


@hookimpl
def register_cells(register: Callable[[type], None]) -> None:
    register(Int8WeightOnlyLinear)
    register(Int8Linear)
    register(Int4WeightOnlyLinear)
    register(Int4Linear)
