"""Quantization configs: plain data, validated by pydantic, round-tripping through YAML.

`PTQConfig` follows MindSpore Golden Stick's PTQConfig (mode, weight / activation / kv-cache dtypes,
outliers suppression, a blacklist of modules) and `QuantArgs` follows compressed-tensors'
QuantizationArgs (bits, symmetry, granularity, static or dynamic). A MindFormers
`quantization_config` block maps onto the same `PTQConfig` through `PTQConfig.from_mindformers`.

Every error is a `ConfigError` that names the bad key or value and what is allowed instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantmint.errors import ConfigError

__all__ = [
    "PRESETS",
    "AlgorithmArgs",
    "PTQConfig",
    "QuantArgs",
    "get_preset",
]

Granularity = Literal["channel", "token", "tensor", "head"]
QuantDtype = Literal["int8"]

_NONE_SPELLINGS = {"none", "null", ""}


def _none_if_spelled_none(value: Any) -> Any:
    """MindFormers YAML writes `None` unquoted, which YAML reads as the string 'None'."""
    if isinstance(value, str) and value.strip().lower() in _NONE_SPELLINGS:
        return None
    return value


def _format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """Turn pydantic's report into sentences that name the key, the bad value and what is allowed."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<config>"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _fields_at(model, err["loc"][:-1])
            lines.append(f"unknown key '{loc}'; allowed keys here: {', '.join(allowed)}")
        elif kind in ("literal_error", "enum"):
            expected = err.get("ctx", {}).get("expected", "")
            lines.append(f"invalid value {err['input']!r} for '{loc}'; allowed: {expected}")
        elif kind == "value_error":
            lines.append(f"{loc}: {err['ctx']['error']}" if "ctx" in err else f"{loc}: {err['msg']}")
        else:
            lines.append(f"invalid value {err.get('input')!r} for '{loc}': {err['msg']}")
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


class _Strict(BaseModel):
    """Base for every config model: unknown keys are errors, and errors are `ConfigError`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"{type(self).__name__}: {_format_validation_error(exc, type(self))}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Strict:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{cls.__name__} must be a mapping of keys to values, got {type(data).__name__}"
            )
        return cls(**data)


class QuantArgs(_Strict):
    """How one kind of tensor is quantized.

    | strategy | scale shape for a [rows, cols] tensor | used for |
    | -------- | -------------------------------------- | -------- |
    | channel  | [rows, 1] (one per output channel)     | weights, K/V cache |
    | token    | [tokens, 1], computed at run time      | activations (dynamic) |
    | tensor   | [1]                                    | weights, activations, K/V cache |
    | head     | [heads, 1] (one per attention head)    | K/V cache |
    """

    num_bits: Literal[8] = 8
    symmetric: bool = True
    strategy: Granularity = "channel"
    dynamic: bool = False
    observer: Literal["minmax", "percentile"] = "minmax"
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)

    @model_validator(mode="after")
    def _check(self) -> QuantArgs:
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("strategy 'token' is computed at run time: set dynamic: true")
        if self.dynamic and self.observer != "minmax":
            raise ValueError("dynamic quantization observes nothing ahead of time: drop 'observer'")
        return self


class AlgorithmArgs(_Strict):
    """Knobs of the algorithm modules (the seeds' `algorithm_args`)."""

    smooth_alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    # Non-empty: pick each block's alpha from this grid by the MSE of its quantized output vs float.
    smooth_alpha_grid: list[float] = Field(default_factory=list)
    smooth_search_batches: int = Field(default=4, ge=1)
    # W8A8: a linear whose calibration inputs hold a token with a range this many times the median token's
    # keeps float activations (W8A16 for that layer); None quantizes every activation.
    w8a16_outlier_ratio: float | None = Field(default=None, gt=1.0)

    @field_validator("smooth_alpha_grid")
    @classmethod
    def _grid_in_range(cls, value: list[float]) -> list[float]:
        bad = [a for a in value if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"smooth_alpha_grid values must lie in [0, 1], got {bad}")
        return value


_WEIGHTS_DEFAULT = QuantArgs(strategy="channel")
_ACTIVATIONS_DEFAULT = QuantArgs(strategy="token", dynamic=True)
_KVCACHE_DEFAULT = QuantArgs(strategy="channel")


class PTQConfig(_Strict):
    """Post-training quantization config (Golden Stick's PTQConfig, compressed-tensors' argument names).

    `mode` is `quantize` when calibrating a float model and `deploy` when rebuilding a quantized model
    from a checkpoint. `ignore` lists modules to leave in float: an exact module name
    (`model.layers.0.mlp.down_proj`), a dotted suffix (`down_proj`, `lm_head`) or a regex (`re:.*\\.0\\..*`).
    """

    mode: Literal["quantize", "deploy"] = "quantize"
    weight_dtype: QuantDtype | None = "int8"
    activation_dtype: QuantDtype | None = None
    kvcache_dtype: QuantDtype | None = None
    outliers_suppression: Literal["smooth", "none"] = "none"
    weights: QuantArgs = _WEIGHTS_DEFAULT
    activations: QuantArgs = _ACTIVATIONS_DEFAULT
    kvcache: QuantArgs = _KVCACHE_DEFAULT
    algorithm_args: AlgorithmArgs = AlgorithmArgs()
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    _dtype_fields: ClassVar[tuple[str, ...]] = ("weight_dtype", "activation_dtype", "kvcache_dtype")

    @field_validator("weight_dtype", "activation_dtype", "kvcache_dtype", mode="before")
    @classmethod
    def _dtype_none(cls, value: Any) -> Any:
        return _none_if_spelled_none(value)

    @field_validator("outliers_suppression", mode="before")
    @classmethod
    def _outliers_none(cls, value: Any) -> Any:
        return "none" if _none_if_spelled_none(value) is None else value

    @field_validator("ignore")
    @classmethod
    def _regexes_compile(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as exc:
                    raise ValueError(f"ignore entry {entry!r} is not a valid regex: {exc}") from None
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> PTQConfig:
        if self.weight_dtype is None and self.activation_dtype is None and self.kvcache_dtype is None:
            raise ValueError(
                "nothing to quantize: set weight_dtype, activation_dtype or kvcache_dtype to int8"
            )
        if self.activation_dtype and not self.weight_dtype:
            raise ValueError("int8 activations need int8 weights (W8A8): set weight_dtype: int8")
        if self.outliers_suppression == "smooth" and not self.activation_dtype:
            raise ValueError(
                "outliers_suppression 'smooth' only helps when activations are quantized: "
                "set activation_dtype: int8 or outliers_suppression: none"
            )
        if self.weights.dynamic or self.weights.strategy not in ("channel", "tensor"):
            raise ValueError("weights are quantized ahead of time per 'channel' or per 'tensor', not dynamic")
        if not self.weights.symmetric:
            raise ValueError("int8 weights are stored symmetric (no zero point): set weights.symmetric: true")
        if self.activations.strategy not in ("token", "tensor"):
            raise ValueError("activations are quantized per 'token' (dynamic) or per 'tensor'")
        if self.kvcache.dynamic or self.kvcache.strategy == "token":
            raise ValueError("the kv cache uses static scales per 'channel', 'head' or 'tensor'")
        return self

    # --- presets and serialisation ---------------------------------------------------------------
    @property
    def scheme_name(self) -> str:
        """Short name of the dtype combination, e.g. `w8a16`, `w8a8-c8`, `c8`."""
        parts = []
        if self.weight_dtype:
            parts.append("w8a8" if self.activation_dtype else "w8a16")
        if self.kvcache_dtype:
            parts.append("c8")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> PTQConfig:
        """Read our own schema, or a MindFormers `quantization_config` block (with or without that key)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config is not valid YAML: {exc}") from None
        if isinstance(data, dict) and set(data) == {"quantization_config"}:
            data = data["quantization_config"]
        if isinstance(data, dict) and "quant_method" in data:
            return cls.from_mindformers(data)
        return cls.from_dict(data)  # type: ignore[return-value]

    @classmethod
    def load(cls, path: str | Path) -> PTQConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            return cls.from_yaml(path.read_text())
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def with_updates(self, **updates: Any) -> PTQConfig:
        """A validated copy with some top-level fields replaced."""
        return PTQConfig.from_dict({**self.to_dict(), **updates})  # type: ignore[return-value]

    # --- MindFormers ----------------------------------------------------------------------------
    _MF_KEYS: ClassVar[tuple[str, ...]] = (
        "quant_method",
        "weight_dtype",
        "activation_dtype",
        "kvcache_dtype",
        "outliers_suppression",
        "modules_to_not_convert",
        "algorithm_args",
    )
    _MF_METHODS: ClassVar[tuple[str, ...]] = ("rtn", "smooth_quant", "ptq")
    _MF_ALGORITHM_ARGS: ClassVar[dict[str, str]] = {
        "alpha": "smooth_alpha",
        "smooth_alpha": "smooth_alpha",
        "smooth_alpha_grid": "smooth_alpha_grid",
        "smooth_search_batches": "smooth_search_batches",
    }

    @classmethod
    def from_mindformers(cls, block: dict[str, Any]) -> PTQConfig:
        """Map a MindFormers `quantization_config` block (see the MindFormers quantization guide)."""
        unknown = sorted(set(block) - set(cls._MF_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} in MindFormers quantization_config; allowed: {list(cls._MF_KEYS)}"
            )
        method = block.get("quant_method")
        if method not in cls._MF_METHODS:
            raise ConfigError(f"invalid quant_method {method!r}; allowed: {list(cls._MF_METHODS)}")
        activation = _none_if_spelled_none(block.get("activation_dtype"))
        outliers = _none_if_spelled_none(block.get("outliers_suppression"))
        if method == "rtn" and (activation is not None or outliers is not None):
            raise ConfigError(
                "quant_method 'rtn' rounds weights (and kv cache) only: set activation_dtype and "
                "outliers_suppression to None, or use quant_method 'smooth_quant'"
            )
        if method == "smooth_quant":
            activation = "int8" if activation is None else activation
            outliers = "smooth" if outliers is None else outliers
        args_in = block.get("algorithm_args") or {}
        if not isinstance(args_in, dict):
            raise ConfigError(f"algorithm_args must be a mapping, got {args_in!r}")
        bad_args = sorted(set(args_in) - set(cls._MF_ALGORITHM_ARGS))
        if bad_args:
            raise ConfigError(
                f"unknown algorithm_args key(s) {bad_args}; allowed: {sorted(cls._MF_ALGORITHM_ARGS)}"
            )
        ignore = block.get("modules_to_not_convert")
        return cls(
            weight_dtype=block.get("weight_dtype", "int8"),
            activation_dtype=activation,
            kvcache_dtype=block.get("kvcache_dtype"),
            outliers_suppression=outliers or "none",
            algorithm_args={cls._MF_ALGORITHM_ARGS[k]: v for k, v in args_in.items()},
            ignore=["lm_head"] if ignore is None else list(ignore),
        )

    def to_mindformers(self) -> dict[str, Any]:
        """The MindFormers `quantization_config` block for this config (inverse of `from_mindformers`)."""
        if self.outliers_suppression == "smooth":
            method = "smooth_quant"
        elif self.activation_dtype is None:
            method = "rtn"
        else:
            method = "ptq"
        return {
            "quant_method": method,
            "weight_dtype": self.weight_dtype,
            "activation_dtype": self.activation_dtype,
            "kvcache_dtype": self.kvcache_dtype,
            "outliers_suppression": None
            if self.outliers_suppression == "none"
            else self.outliers_suppression,
            "modules_to_not_convert": list(self.ignore),
            "algorithm_args": self._mindformers_algorithm_args() if method == "smooth_quant" else {},
        }

    def _mindformers_algorithm_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"alpha": self.algorithm_args.smooth_alpha}
        if self.algorithm_args.smooth_alpha_grid:
            args["smooth_alpha_grid"] = list(self.algorithm_args.smooth_alpha_grid)
            args["smooth_search_batches"] = self.algorithm_args.smooth_search_batches
        return args


# The seeds' combination list: RTN W8A16, SmoothQuant W8A8, C8, W8A16+C8, SmoothQuant+C8.
# SmoothQuant presets search alpha per block on this grid: on SmolLM2 it gave +0.49% perplexity with
# 169 s of calibration (128 x 512 tokens), where a fixed 0.5 gave +0.86% in 71 s (README figures).
_SMOOTH_SEARCH = AlgorithmArgs(smooth_alpha_grid=[0.5, 0.6, 0.7, 0.8])
PRESETS: dict[str, PTQConfig] = {
    "w8a16": PTQConfig(weight_dtype="int8"),
    "w8a8": PTQConfig(
        weight_dtype="int8",
        activation_dtype="int8",
        outliers_suppression="smooth",
        algorithm_args=_SMOOTH_SEARCH,
    ),
    "c8": PTQConfig(weight_dtype=None, kvcache_dtype="int8"),
    "w8a16-c8": PTQConfig(weight_dtype="int8", kvcache_dtype="int8"),
    "w8a8-c8": PTQConfig(
        weight_dtype="int8",
        activation_dtype="int8",
        kvcache_dtype="int8",
        outliers_suppression="smooth",
        algorithm_args=_SMOOTH_SEARCH,
    ),
}


def get_preset(name: str) -> PTQConfig:
    """The preset config called `name` (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
