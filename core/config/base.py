"""The base of every config model (unknown keys are errors, errors are one `ConfigError` line) and
`QuantArgs`, how one kind of tensor is quantized (compressed-tensors' QuantizationArgs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from quantmint.config.plain_yaml import check_plain, short_repr
from quantmint.errors import ConfigError

Granularity = Literal["channel", "token", "tensor", "head", "group"]
QuantDtype = Literal["int8"]
WeightDtype = Literal["int8", "int4"]

_NONE_SPELLINGS = {"none", "null", ""}


def none_if_spelled_none(value: Any) -> Any:
    """MindFormers YAML writes `None` unquoted, which YAML reads as the string 'None'."""
    if isinstance(value, str) and value.strip().lower() in _NONE_SPELLINGS:
        return None
    return value


def _format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """Turn pydantic's report into sentences that name the key, the bad value and what is allowed."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "<config>"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _fields_at(model, err["loc"][:-1])
            lines.append(f"unknown key '{loc}'; allowed keys here: {', '.join(allowed)}")
        elif kind in ("literal_error", "enum"):
            expected = err.get("ctx", {}).get("expected", "")
            lines.append(f"invalid value {short_repr(err['input'])} for '{loc}'; allowed: {expected}")
        elif kind == "value_error":
            lines.append(f"{loc}: {err['ctx']['error']}" if "ctx" in err else f"{loc}: {err['msg']}")
        else:
            lines.append(f"invalid value {short_repr(err.get('input'))} for '{loc}': {err['msg']}")
    return "; ".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


class StrictConfig(BaseModel):
    """Base for every config model: unknown keys are errors, and errors are `ConfigError`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        check_plain(data, type(self).__name__)  # too deep or too large for pydantic: one line instead
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"{type(self).__name__}: {_format_validation_error(exc, type(self))}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StrictConfig:
        if not isinstance(data, dict):
            shown = "an empty file" if data is None else type(data).__name__
            raise ConfigError(f"{cls.__name__} must be a mapping of keys to values, got {shown}")
        check_plain(data, cls.__name__)
        return cls(**data)


class QuantArgs(StrictConfig):
    """How one kind of tensor is quantized.

    | strategy | scale shape for a [rows, cols] tensor | used for |
    | -------- | -------------------------------------- | -------- |
    | channel  | [rows, 1] (one per output channel)     | weights, K/V cache |
    | token    | [tokens, 1], computed at run time      | activations (dynamic) |
    | tensor   | [1]                                    | weights, activations, K/V cache |
    | head     | [heads, 1] (one per attention head)    | K/V cache |
    | group    | [rows, ceil(cols / group_size)]        | weights (4-bit) |
    """

    num_bits: Literal[4, 8] = 8
    symmetric: bool = True
    strategy: Granularity = "channel"
    group_size: int | None = Field(default=None, ge=8, le=1 << 16)
    dynamic: bool = False
    observer: Literal["minmax", "percentile"] = "minmax"
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)

    @model_validator(mode="after")
    def _check(self) -> QuantArgs:
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("strategy 'token' is computed at run time: set dynamic: true")
        if (self.strategy == "group") != (self.group_size is not None):
            raise ValueError(
                "strategy 'group' and group_size go together: set both (e.g. strategy: group, "
                "group_size: 128) or neither"
            )
        if self.dynamic and self.observer != "minmax":
            raise ValueError("dynamic quantization observes nothing ahead of time: drop 'observer'")
        return self
