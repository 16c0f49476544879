"""The reference PyTorch runtime: real int8 layers (cells) that run anywhere torch runs.

Registered through the `quantmint` entry-point group like any third-party runtime: it declares every
scheme it serves on every device, at priority 0, so that a runtime specialised for a device wins there by
declaring a higher priority.
"""

from __future__ import annotations

from collections.abc import Callable

from quantmint.backends.torch.int4_linear import Int4Linear, Int4WeightOnlyLinear, int4_linear
from quantmint.backends.torch.int8_linear import Int8Linear, int8_int8_matmul
from quantmint.backends.torch.int8_weight_only import Int8WeightOnlyLinear, int8_weight_only_linear
from quantmint.backends.torch.kv_cache import Int8KVCache, Int8KVCacheLayer
from quantmint.extension.hookspecs import hookimpl
from quantmint.extension.runtime import ANY_DEVICE, Runtime

__all__ = [
    "TORCH_RUNTIME",
    "Int4Linear",
    "Int4WeightOnlyLinear",
    "Int8KVCache",
    "Int8KVCacheLayer",
    "Int8Linear",
    "Int8WeightOnlyLinear",
    "int4_linear",
    "int8_int8_matmul",
    "int8_weight_only_linear",
]


TORCH_RUNTIME = Runtime(
    name="torch",
    cells=(Int8WeightOnlyLinear, Int8Linear, Int4WeightOnlyLinear, Int4Linear),
    devices=(ANY_DEVICE,),
    priority=0,
    kv_cache=Int8KVCache,
)


@hookimpl
def register_runtimes(register: Callable[[Runtime], None]) -> None:
    register(TORCH_RUNTIME)
