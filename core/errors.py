"""Exceptions raised by quantmint. Every message names the bad input and how to fix it."""

from __future__ import annotations


class QuantmintError(Exception):
    """Base class: the CLI turns these into a one-line reason and a non-zero exit."""


class ConfigError(QuantmintError, ValueError):
    """A configuration key, value or combination is not valid."""


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
