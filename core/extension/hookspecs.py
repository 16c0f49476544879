"""Hooks a quantmint plugin can implement. The `register_*` hooks that fill a registry take a `register`
callback built by the host, which validates what it is given and rejects duplicates in one place (see
`quantmint.extension.registry`); `register_commands` takes the CLI's sub-parsers."""

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
    """Register `Runtime` objects (see `quantmint.extension.runtime`): the quantized-layer classes of a
    backend, the
    schemes and devices it serves and its priority."""


@hookspec
def register_algorithms(register: Callable[[Any], None]) -> None:
    """Register `Algorithm` objects (see `quantmint.algorithms.base`), one per recipe step type."""


@hookspec
def register_commands(subparsers: Any) -> None:
    """Add commands to the `quantmint` CLI: `subparsers` is its argparse sub-parsers object; add each with
    `subparsers.add_parser(NAME, help=...)` and `set_defaults(func=RUN)`, RUN(args) doing the work. A
    `QuantmintError` that RUN raises ends the command with its one line on stderr and exit status 2.
    (Unlike the other hooks, this one is handed the parser, not a `register` callback.)"""
