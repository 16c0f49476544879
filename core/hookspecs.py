"""Hooks a quantmint plugin can implement. Each takes a `register` callback built by the host, which
validates what it is given and rejects duplicates in one place (see `quantmint.registry`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("quantmint")
hookimpl = pluggy.HookimplMarker("quantmint")


@hookspec
def register_model_families(register: Callable[[Any], None]) -> None:
    """Register `ModelFamily` objects that describe where a model's blocks and linears are."""


@hookspec
def register_runtimes(register: Callable[[Any], None]) -> None:
    """Register `Runtime` objects (see `quantmint.runtime`): the quantized-layer classes of a backend, the
    schemes and devices it serves and its priority."""


@hookspec
def register_algorithms(register: Callable[[Any], None]) -> None:
    """Register `Algorithm` objects (see `quantmint.algorithms.base`), one per recipe step type."""
