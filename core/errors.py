"""Exceptions raised by quantmint. Every message names the bad input and how to fix it."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1000


def one_line(message: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` as one line of at most `limit` characters: line breaks become spaces, the rest is cut."""
    text = " ".join(str(message).splitlines())  # every line break Python knows, \u2028 included
    if len(text) > limit:
        cut = f"... ({len(text):,} chars in all)"
        text = text[: limit - len(cut)] + cut
    return text


class QuantmintError(Exception):
    """Base class: the CLI turns these into a one-line reason and a non-zero exit."""


class ConfigError(QuantmintError, ValueError):
    """A configuration key, value or combination is not valid. Its message is one line, at most
    `MAX_MESSAGE_CHARS` long, whatever the input that caused it."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


class PluginError(QuantmintError):
    """A plugin could not be loaded or registered something twice."""


class UnknownModelFamilyError(QuantmintError):
    """No registered model family handles this model."""


class ModelMappingError(QuantmintError):
    """A model family matched the model but its declared structure is not in the model."""


class CheckpointError(QuantmintError):
    """A quantized checkpoint is missing, truncated, corrupt or does not match its config."""


class NotSupportedError(QuantmintError, NotImplementedError):
    """The configuration asks for something this version cannot do yet."""


class OutputError(QuantmintError):
    """An output directory may not be written or replaced (it is an input, a file, a directory
    quantmint did not write, another run's), or its filesystem refused the write (full, read-only)."""
