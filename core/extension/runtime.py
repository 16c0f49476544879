"""Runtimes: what a backend declares it serves, so that quantized layers are chosen by capability.

A runtime plugin registers a `Runtime` through the `register_runtimes` hook: its quantized-layer classes
(`QuantizedLinear` cells, one per scheme), the torch device types it runs on, and a priority. For a
scheme and a device, `quantmint.extension.registry.cell_class` picks the highest-priority runtime that serves
both;
two runtimes of the same priority that both serve one are an error naming both (give one another
priority, or leave one out with `QUANTMINT_PLUGINS`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANY_DEVICE", "Runtime"]

ANY_DEVICE = "*"
"""In `Runtime.devices`: every device torch runs on."""


@dataclass(frozen=True)
class Runtime:
    """One backend's declaration of what it serves.

    Attributes:
        name: short unique name (`torch`).
        cells: `QuantizedLinear` classes, each serving the scheme in its `scheme` attribute.
        devices: torch device types the cells run on (`cpu`, `cuda`, ...), or `("*",)` for every one.
        priority: among runtimes serving one scheme on one device, the highest wins.
        kv_cache: a transformers `Cache` class storing int8 keys and values for a C8 model
            (`kv_cache.for_model(model)`), or None.
    """

    name: str
    cells: tuple[type, ...]
    devices: tuple[str, ...] = (ANY_DEVICE,)
    priority: int = 0
    kv_cache: type | None = None

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(cell.scheme for cell in self.cells)

    def serves(self, scheme: str, device: str) -> bool:
        return scheme in self.schemes and (ANY_DEVICE in self.devices or device in self.devices)

    def cell(self, scheme: str) -> type:
        return next(cell for cell in self.cells if cell.scheme == scheme)
