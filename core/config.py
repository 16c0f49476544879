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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from quantmint.errors import ConfigError

__all__ = [
    "PRESETS",
    "AlgorithmArgs",
    "AlgorithmConfig",
    "BlockPTQArgs",
    "HadamardConfig",
    "KVCacheConfig",
    "RoundToNearestConfig",
    "SmoothQuantConfig",
    "PTQConfig",
    "QuantArgs",
    "get_preset",
]

Granularity = Literal["channel", "token", "tensor", "head", "group"]
QuantDtype = Literal["int8"]
WeightDtype = Literal["int8", "int4"]

_NONE_SPELLINGS = {"none", "null", ""}


def _none_if_spelled_none(value: Any) -> Any:
    """MindFormers YAML writes `None` unquoted, which YAML reads as the string 'None'."""
    if isinstance(value, str) and value.strip().lower() in _NONE_SPELLINGS:
        return None
    return value


def _short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters; safe for ints too long to print and deep structures."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length():,} bits>"
    if isinstance(value, (dict, list, tuple, set)) and len(value) > 20:
        return f"<a {type(value).__name__} of {len(value):,} items>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
            lines.append(f"invalid value {_short_repr(err['input'])} for '{loc}'; allowed: {expected}")
        elif kind == "value_error":
            lines.append(f"{loc}: {err['ctx']['error']}" if "ctx" in err else f"{loc}: {err['msg']}")
        else:
            lines.append(f"invalid value {_short_repr(err.get('input'))} for '{loc}': {err['msg']}")
    return "; ".join(lines)


# --- Reading YAML: plain data only ---------------------------------------------------------------------
# A config is a small tree of mappings, lists and scalars. Anything else is refused before pydantic sees
# it, with one line that says where: YAML anchors and aliases (a 9-level alias bomb expands to gigabytes),
# duplicate keys (YAML keeps the last silently), keys that are not strings, nesting deeper than
# MAX_CONFIG_DEPTH (Python would overflow its stack), integers longer than MAX_INT_DIGITS, and files
# larger than MAX_CONFIG_BYTES or not UTF-8.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_NODES = 100_000
MAX_INT_DIGITS = 100


def _at(node: Any) -> str:
    mark = getattr(node, "start_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that builds plain data only and refuses what a config never needs."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"{_at(event)}: YAML alias *{event.anchor} is not allowed in a config: write the value out"
            )
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise ConfigError(
                f"{_at(event)}: YAML anchor &{event.anchor} is not allowed in a config: drop it and "
                "write every value out"
            )
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{_at(event)}: more than {MAX_CONFIG_NODES:,} values; a config is small")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise ConfigError(
                    f"{_at(event)}: nested more than {MAX_CONFIG_DEPTH} levels deep; a config needs 3"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        seen: dict[str, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                scalar = isinstance(key_node, yaml.ScalarNode)
                shown = _short_repr(key_node.value) if scalar else f"(a {key_node.id})"
                raise ConfigError(
                    f"{_at(key_node)}: key {shown} is not a string (it reads as "
                    f"{key_node.tag.rsplit(':', 1)[-1]}); every key is a name: quote it or remove it"
                )
            if key_node.value in seen:
                raise ConfigError(
                    f"{_at(key_node)}: duplicate key {_short_repr(key_node.value)} (first at "
                    f"{_at(seen[key_node.value])}): keep one"
                )
            seen[key_node.value] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise ConfigError(
                f"{_at(node)}: an integer of {digits:,} digits; no config value needs more than "
                f"{MAX_INT_DIGITS}"
            )
        return super().construct_yaml_int(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


class _ConfigDumper(yaml.SafeDumper):
    """Writes every value out: no anchors or aliases, which `_ConfigLoader` refuses."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml_data(text: str) -> Any:
    """The plain data of a YAML config text, or one ConfigError line saying what is wrong and where."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config is {len(text):,} characters long; a config is at most {MAX_CONFIG_BYTES:,}"
        )
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        raise ConfigError(f"config is not valid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # the constructors of timestamps, floats and the like: a value YAML cannot read
        raise ConfigError(f"config has a value YAML cannot read: {type(exc).__name__}: {exc}") from None


def _check_plain(data: Any, what: str) -> None:
    """Refuse, before pydantic sees it, data that is deeper, larger or has other keys than a config has."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    count = 0
    while stack:
        value, depth, where = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"{what} holds more than {MAX_CONFIG_NODES:,} values; a config is small")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"{what} is nested more than {MAX_CONFIG_DEPTH} levels deep (at {where[:200]}); a config "
                "needs 3"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ConfigError(
                        f"{what}: key {_short_repr(key)} at '{where[:200] or '<top>'}' is not a string; "
                        "every key is a name"
                    )
                stack.append((item, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))


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

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        _check_plain(data, type(self).__name__)  # too deep or too large for pydantic: one line instead
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"{type(self).__name__}: {_format_validation_error(exc, type(self))}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Strict:
        if not isinstance(data, dict):
            shown = "an empty file" if data is None else type(data).__name__
            raise ConfigError(f"{cls.__name__} must be a mapping of keys to values, got {shown}")
        _check_plain(data, cls.__name__)
        return cls(**data)


class QuantArgs(_Strict):
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


class AlgorithmConfig(_Strict):
    """One step of a quantization recipe: plain data naming its algorithm (`name`, the key under which
    an `Algorithm` is registered, see `quantmint.algorithms.base`).

    `check(recipe)` refuses a step that does not fit the rest of the recipe (raise ValueError with the
    fix); it runs when a `PTQConfig` is built and again when `PTQ` runs a recipe.

    What a step contributes to the config that holds it (all optional):

    - `scheme_tag()`: its part of the scheme name (`w8a16`, `c8`, `ptq`; '' for none), joined with `-`
      in recipe order (`PTQConfig.scheme_name`);
    - `mindformers_method`: the MindFormers `quant_method` a recipe with this step needs at least (a
      recipe maps onto the last of `PTQConfig._MF_METHODS` its steps name; '' for any; None, the
      default, when MindFormers' quantization_config cannot name this step);
    - `ptq_fields()`: the `PTQConfig` keys this step stands for (the inverse of `PTQConfig.recipe()`),
      filled in when a config is written as a `recipe:` list.
    """

    name: ClassVar[str] = ""
    mindformers_method: ClassVar[str | None] = None

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        """Raise ValueError when this step cannot run with the rest of `recipe`."""

    def scheme_tag(self) -> str:
        """This step's part of the scheme name ('' for none)."""
        return ""

    def ptq_fields(self) -> dict[str, Any]:
        """The `PTQConfig` keys this step stands for (`algorithm_args` entries are merged)."""
        return {}


class AlgorithmArgs(_Strict):
    """Knobs of the algorithm modules (the seeds' `algorithm_args`)."""

    smooth_alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    # Non-empty: pick each block's alpha from this grid by the MSE of its quantized output vs float.
    smooth_alpha_grid: list[float] = Field(default_factory=list, max_length=101)
    smooth_search_batches: int = Field(default=4, ge=1, le=1 << 20)
    # W8A8: a linear whose calibration inputs hold a token with a range this many times the median token's
    # keeps float activations (W8A16 for that layer); None quantizes every activation.
    w8a16_outlier_ratio: float | None = Field(default=None, gt=1.0, le=1e9)
    # Rotate the inputs of the family's `hadamard_linears` (the MLP down projection) by a Hadamard
    # matrix online, folding it into their weights (see `quantmint.rotation`); those linears leave
    # their smoothing pair. For int8 activations.
    hadamard: bool = False

    @field_validator("smooth_alpha_grid")
    @classmethod
    def _grid_in_range(cls, value: list[float]) -> list[float]:
        bad = [a for a in value if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"smooth_alpha_grid values must lie in [0, 1], got {bad}")
        return value


class BlockPTQArgs(AlgorithmConfig):
    """Block-sequential PTQ (quant_method `ptq`): tune each block against its float output.

    The knobs of FMS Model Optimizer's PTQ, under names that say what they are:

    | here | FMS | meaning |
    | ---- | --- | ------- |
    | n_batches | ptq_nbatch | calibration batches cached per block |
    | batch_size | ptq_batchsize | samples per batch (one optimizer step) |
    | n_outer_loops | ptq_nouterloop | optimizer steps per block |
    | cosine_lr | ptq_coslr | parameter groups on a cosine schedule: W (weights), A (activations), WA |
    | lr_weight | ptq_lrw | Adam lr of the AdaRound rounding variables (they live in about ±3) |
    | lr_weight_clip | ptq_lrcv_w | Adam lr of the weight scales (log space: 1e-2 ≈ 1% per step) |
    | lr_act_clip | ptq_lrcv_a | Adam lr of static activation scales (log space) |

    Defaults were picked on 4-bit blocks: on tiny Llama blocks lr_weight 1.0 gave a tuned MSE of
    0.32-0.36x RTN's in 100 steps where 0.1 gave 0.9x, and round_reg 0.01 left the rounding soft, so
    hardening undid the gain; on SmolLM2's first two blocks lr_weight 0.3 did better than 1.0 (0.38 and
    0.65x RTN vs 0.74 and 0.44x); 0.5 sits between. Steps: on those two blocks with 64 samples, 300
    steps gave 0.49 and 0.47x RTN where 100 steps left 6 of the first 8 blocks no better than RTN.
    """

    n_batches: int = Field(default=64, ge=1, le=1 << 20)
    batch_size: int = Field(default=2, ge=1, le=1 << 16)
    n_outer_loops: int = Field(default=300, ge=1, le=1 << 24)
    cosine_lr: Literal["none", "W", "A", "WA"] = "WA"
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Learning rates: finite (no inf/nan anywhere, see _Strict) and at most 1e3; 0 freezes those scales.
    lr_weight: float = Field(default=0.5, gt=0.0, le=1e3)
    lr_weight_clip: float = Field(default=1e-2, ge=0.0, le=1e3)
    lr_act_clip: float = Field(default=1e-3, ge=0.0, le=1e3)
    # AdaRound: weight of the regulariser that drives each rounding variable to 0 or 1, its exponent
    # annealed from beta_start to beta_end, and the share of steps before it is switched on.
    round_reg: float = Field(default=10.0, ge=0.0, le=1e9)
    beta_start: float = Field(default=20.0, gt=0.0, le=1e6)
    beta_end: float = Field(default=2.0, gt=0.0, le=1e6)
    round_reg_warmup: float = Field(default=0.2, ge=0.0, lt=1.0)
    # "float": each block learns from the float model's inputs; "quantized": from the outputs of the
    # already-quantized blocks before it (BRECQ / QDrop), the target staying the float output.
    inputs: Literal["float", "quantized"] = "float"
    # Where cached block inputs/outputs live: "memory", "disk" (safetensors files, one batch in RAM at a
    # time) or "auto" (disk when the cache would take more than a quarter of the free RAM).
    cache: Literal["auto", "memory", "disk"] = "auto"
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    name: ClassVar[str] = "block_ptq"
    mindformers_method: ClassVar[str | None] = "ptq"

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        if not any(isinstance(s, RoundToNearestConfig) for s in recipe):
            raise ValueError("block_ptq tunes quantized weights: set weight_dtype, or drop block_ptq")

    def scheme_tag(self) -> str:
        return "ptq"

    def ptq_fields(self) -> dict[str, Any]:
        return {"block_ptq": self.model_dump(mode="json")}

    @model_validator(mode="after")
    def _check(self) -> BlockPTQArgs:
        if self.beta_end > self.beta_start:
            raise ValueError("beta is annealed downwards: beta_end must not exceed beta_start")
        return self


def _quantizes_activations(recipe: list[AlgorithmConfig]) -> bool:
    return any(isinstance(s, RoundToNearestConfig) and s.activations is not None for s in recipe)


class HadamardConfig(AlgorithmConfig):
    """Online Hadamard rotation of the family's `hadamard_linears` (see `quantmint.rotation`)."""

    name: ClassVar[str] = "hadamard"

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        if not _quantizes_activations(recipe):
            raise ValueError(
                "algorithm_args.hadamard rotates activations before they are quantized: set "
                "activation_dtype: int8, or hadamard: false"
            )

    def ptq_fields(self) -> dict[str, Any]:
        return {"algorithm_args": {"hadamard": True}}


class SmoothQuantConfig(AlgorithmConfig):
    """SmoothQuant: migrate activation outliers into the weights, alpha fixed or searched per block."""

    name: ClassVar[str] = "smooth_quant"
    mindformers_method: ClassVar[str | None] = "smooth_quant"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    alpha_grid: list[float] = Field(default_factory=list, max_length=101)
    search_batches: int = Field(default=4, ge=1, le=1 << 20)

    @field_validator("alpha_grid")
    @classmethod
    def _grid_in_range(cls, value: list[float]) -> list[float]:
        bad = [a for a in value if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"alpha_grid values must lie in [0, 1], got {bad}")
        return value

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        if not _quantizes_activations(recipe):
            raise ValueError(
                "outliers_suppression 'smooth' only helps when activations are quantized: "
                "set activation_dtype: int8 or outliers_suppression: none"
            )

    def ptq_fields(self) -> dict[str, Any]:
        return {
            "outliers_suppression": "smooth",
            "algorithm_args": {
                "smooth_alpha": self.alpha,
                "smooth_alpha_grid": list(self.alpha_grid),
                "smooth_search_batches": self.search_batches,
            },
        }


class RoundToNearestConfig(AlgorithmConfig):
    """Weights rounded to nearest (and int8 activations, static or dynamic, when `activations` is set)."""

    name: ClassVar[str] = "rtn"
    mindformers_method: ClassVar[str | None] = ""
    weights: QuantArgs
    activations: QuantArgs | None = None
    w8a16_outlier_ratio: float | None = Field(default=None, gt=1.0, le=1e9)

    def scheme_tag(self) -> str:
        """The scheme of the rounded linears: `w8a16`, `w8a8`, `w4a16` or `w4a8` (see the cells)."""
        return f"w{self.weights.num_bits}a{8 if self.activations is not None else 16}"

    def ptq_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "weight_dtype": "int4" if self.weights.num_bits == 4 else "int8",
            "weights": self.weights.model_dump(mode="json"),
        }
        if self.activations is not None:
            fields.update(activation_dtype="int8", activations=self.activations.model_dump(mode="json"))
        if self.w8a16_outlier_ratio is not None:
            fields["algorithm_args"] = {"w8a16_outlier_ratio": self.w8a16_outlier_ratio}
        return fields


class KVCacheConfig(AlgorithmConfig):
    """Static int8 K/V cache scales, measured on calibration data."""

    name: ClassVar[str] = "kv_cache"
    mindformers_method: ClassVar[str | None] = ""
    kvcache: QuantArgs

    def scheme_tag(self) -> str:
        return "c8"

    def ptq_fields(self) -> dict[str, Any]:
        return {"kvcache_dtype": "int8", "kvcache": self.kvcache.model_dump(mode="json")}


_WEIGHTS_DEFAULT = QuantArgs(strategy="channel")
_ACTIVATIONS_DEFAULT = QuantArgs(strategy="token", dynamic=True)
_KVCACHE_DEFAULT = QuantArgs(strategy="channel")


class PTQConfig(_Strict):
    """Post-training quantization config (Golden Stick's PTQConfig, compressed-tensors' argument names).

    `mode` is `quantize` when calibrating a float model and `deploy` when rebuilding a quantized model
    from a checkpoint. `ignore` lists modules to leave in float: an exact module name
    (`model.layers.0.mlp.down_proj`), a dotted suffix (`down_proj`, `lm_head`) or a regex (`re:.*\\.0\\..*`).

    Instead of the dtype and algorithm keys, a config may list its steps as a `recipe:` (see
    `quantmint.algorithms.base.recipe_from_data`), a registered algorithm's name and arguments each, in
    order; a plugin's algorithm runs this way from YAML. The keys the built-in steps stand for are then
    filled in from the steps (`AlgorithmConfig.ptq_fields`), and only `mode` and `ignore` may be given
    beside it:

        recipe:
          - {name: percentile_clip, percentile: 99.0}
          - {name: rtn, weights: {strategy: channel}}
    """

    mode: Literal["quantize", "deploy"] = "quantize"
    weight_dtype: WeightDtype | None = "int8"
    activation_dtype: QuantDtype | None = None
    kvcache_dtype: QuantDtype | None = None
    outliers_suppression: Literal["smooth", "none"] = "none"
    weights: QuantArgs = _WEIGHTS_DEFAULT
    activations: QuantArgs = _ACTIVATIONS_DEFAULT
    kvcache: QuantArgs = _KVCACHE_DEFAULT
    algorithm_args: AlgorithmArgs = AlgorithmArgs()
    # Set: block-sequential PTQ tunes every block's rounding and scales (see `BlockPTQArgs`).
    block_ptq: BlockPTQArgs | None = None
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], max_length=10_000)

    _dtype_fields: ClassVar[tuple[str, ...]] = ("weight_dtype", "activation_dtype", "kvcache_dtype")
    # The keys a `recipe:` may stand beside (the others are the steps' `ptq_fields`).
    _RECIPE_KEYS: ClassVar[tuple[str, ...]] = ("mode", "ignore", "recipe")
    _steps: list[AlgorithmConfig] | None = PrivateAttr(default=None)  # the `recipe:` as read

    def __init__(self, **data: Any) -> None:
        steps = None
        if "recipe" in data:
            data, steps = self._from_recipe(data)
        super().__init__(**data)
        self._steps = steps

    @classmethod
    def _from_recipe(cls, data: dict[str, Any]) -> tuple[dict[str, Any], list[AlgorithmConfig]]:
        """The keys of a config written as a `recipe:` list, and its steps (one ConfigError line)."""
        from quantmint.algorithms.base import recipe_from_data

        beside = [key for key in data if key not in cls._RECIPE_KEYS]
        if beside:
            raise ConfigError(
                f"PTQConfig: {', '.join(beside)} cannot stand beside 'recipe', whose steps set them: drop "
                "them, or drop 'recipe' (e.g. rtn's weights: {...} sets weight_dtype and weights)"
            )
        try:
            steps = recipe_from_data(data["recipe"])
        except ConfigError as exc:
            raise ConfigError(f"PTQConfig: recipe: {exc}") from None
        fields: dict[str, Any] = {
            "weight_dtype": None,
            "outliers_suppression": "none",
            "algorithm_args": {},
        }
        for step in steps:
            for key, value in step.ptq_fields().items():
                if key == "algorithm_args":
                    fields["algorithm_args"] = {**fields["algorithm_args"], **value}
                else:
                    fields[key] = value
        rest = {key: value for key, value in data.items() if key != "recipe"}
        return {**fields, **rest}, steps

    @field_validator("weight_dtype", "activation_dtype", "kvcache_dtype", mode="before")
    @classmethod
    def _dtype_none(cls, value: Any) -> Any:
        return _none_if_spelled_none(value)

    @model_validator(mode="before")
    @classmethod
    def _weight_bits_from_dtype(cls, data: Any) -> Any:
        """`weight_dtype: int4` sets `weights.num_bits: 4` unless the weights block says otherwise."""
        if isinstance(data, dict) and _none_if_spelled_none(data.get("weight_dtype")) == "int4":
            weights = data.get("weights", {})
            if isinstance(weights, dict) and "num_bits" not in weights:
                data = {**data, "weights": {**weights, "num_bits": 4}}
            elif isinstance(weights, QuantArgs) and "num_bits" not in weights.model_fields_set:
                data = {**data, "weights": weights.model_copy(update={"num_bits": 4})}
        return data

    @field_validator("outliers_suppression", mode="before")
    @classmethod
    def _outliers_none(cls, value: Any) -> Any:
        return "none" if _none_if_spelled_none(value) is None else value

    @field_validator("ignore")
    @classmethod
    def _regexes_compile(cls, value: list[str]) -> list[str]:
        for entry in value:
            if len(entry) > 1000:
                raise ValueError(
                    f"ignore entry {_short_repr(entry)} is {len(entry):,} characters; at most 1000"
                )
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except (re.error, OverflowError, RecursionError) as exc:
                    raise ValueError(
                        f"ignore entry {_short_repr(entry)} is not a valid regex: {exc}"
                    ) from None
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> PTQConfig:
        if self.weight_dtype is None and self.activation_dtype is None and self.kvcache_dtype is None:
            raise ValueError(
                "nothing to quantize: set weight_dtype, activation_dtype or kvcache_dtype to int8"
            )
        if self.activation_dtype and not self.weight_dtype:
            raise ValueError("int8 activations need int8 weights (W8A8): set weight_dtype: int8")
        if self.weights.dynamic or self.weights.strategy not in ("channel", "tensor", "group"):
            raise ValueError(
                "weights are quantized ahead of time per 'channel', 'group' or 'tensor', not dynamic"
            )
        bits = {"int8": 8, "int4": 4}.get(self.weight_dtype or "", self.weights.num_bits)
        if self.weights.num_bits != bits:
            raise ValueError(
                f"weights.num_bits {self.weights.num_bits} contradicts weight_dtype {self.weight_dtype}: "
                f"set weights.num_bits: {bits} or drop it"
            )
        if self.activations.num_bits != 8 or self.kvcache.num_bits != 8:
            raise ValueError("activations and the kv cache are quantized to 8 bits: set num_bits: 8")
        if self.activations.strategy == "group" or self.kvcache.strategy == "group":
            raise ValueError("strategy 'group' is for weights only")
        if self.weights.strategy == "group" and self.weights.num_bits != 4:
            raise ValueError(
                "grouped weight scales are for 4-bit weights: set weight_dtype: int4, or strategy: channel"
            )
        if not self.weights.symmetric:
            raise ValueError("int8 weights are stored symmetric (no zero point): set weights.symmetric: true")
        if self.activations.strategy not in ("token", "tensor"):
            raise ValueError("activations are quantized per 'token' (dynamic) or per 'tensor'")
        if self.kvcache.dynamic or self.kvcache.strategy == "token":
            raise ValueError("the kv cache uses static scales per 'channel', 'head' or 'tensor'")
        recipe = self.recipe()
        for step in recipe:
            step.check(recipe)
        return self

    def recipe(self) -> list[AlgorithmConfig]:
        """This config as a quantization recipe: the ordered algorithm steps that `PTQ` runs (rotate,
        smooth, round, calibrate the kv cache, tune by block PTQ), or the `recipe:` it was written as."""
        if self._steps is not None:
            return list(self._steps)
        return self._field_recipe()

    def _field_recipe(self) -> list[AlgorithmConfig]:
        """The built-in steps that the dtype and algorithm keys stand for."""
        args = self.algorithm_args
        steps: list[AlgorithmConfig] = []
        if args.hadamard:
            steps.append(HadamardConfig())
        if self.outliers_suppression == "smooth":
            steps.append(
                SmoothQuantConfig(
                    alpha=args.smooth_alpha,
                    alpha_grid=list(args.smooth_alpha_grid),
                    search_batches=args.smooth_search_batches,
                )
            )
        if self.weight_dtype:
            steps.append(
                RoundToNearestConfig(
                    weights=self.weights,
                    activations=self.activations if self.activation_dtype else None,
                    w8a16_outlier_ratio=args.w8a16_outlier_ratio,
                )
            )
        if self.kvcache_dtype:
            steps.append(KVCacheConfig(kvcache=self.kvcache))
        if self.block_ptq is not None:
            steps.append(self.block_ptq)
        return steps

    # --- presets and serialisation ---------------------------------------------------------------
    @property
    def scheme_name(self) -> str:
        """Short name of the dtype combination, e.g. `w8a16`, `w8a8-c8`, `c8`: each step's
        `scheme_tag`, in recipe order."""
        return "-".join(tag for step in self.recipe() if (tag := step.scheme_tag()))

    @property
    def linear_scheme(self) -> str:
        """The scheme of the quantized linears: `w8a16`, `w8a8`, `w4a16` or `w4a8` (see the cells)."""
        bits = 4 if self.weight_dtype == "int4" else 8
        return f"w{bits}a8" if self.activation_dtype else f"w{bits}a16"

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `from_dict` reads back: every key, or `mode`, `ignore` and the `recipe`."""
        if self._steps is None:
            return self.model_dump(mode="json")
        return {
            "mode": self.mode,
            "ignore": list(self.ignore),
            "recipe": [{"name": step.name, **step.model_dump(mode="json")} for step in self._steps],
        }

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> PTQConfig:
        """Read our own schema, or a MindFormers `quantization_config` block (with or without that key).

        Plain YAML only: anchors, aliases, duplicate keys, non-string keys, deep nesting and huge integers
        are refused (see `_ConfigLoader`)."""
        data = _yaml_data(text)
        if data is None:
            raise ConfigError("config is empty: write a mapping of keys to values (see the README)")
        if not isinstance(data, dict):
            raise ConfigError(
                f"config must be a mapping of keys to values at the top level, got a {type(data).__name__} "
                f"({_short_repr(data)})"
            )
        if isinstance(data, dict) and set(data) == {"quantization_config"}:
            data = data["quantization_config"]
        if isinstance(data, dict) and "quant_method" in data and "recipe" not in data:
            return cls.from_mindformers(data)
        return cls.from_dict(data)  # type: ignore[return-value]

    @classmethod
    def load(cls, path: str | Path) -> PTQConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(
                    f"config is {path.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}"
                )
            try:
                text = path.read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"config is not UTF-8 text (byte {exc.start}: {exc.reason}): save it as UTF-8"
                ) from None
            except OSError as exc:
                raise ConfigError(f"config cannot be read: {exc.strerror or exc}") from None
            return cls.from_yaml(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def with_recipe(self, recipe: list[AlgorithmConfig]) -> PTQConfig:
        """This config (its `mode` and `ignore`) running `recipe` instead, as a `recipe:` config: the
        checkpoint's config then records every step (each step's name must be registered)."""
        steps = [{"name": step.name, **step.model_dump(mode="json")} for step in recipe]
        return PTQConfig.from_dict({"mode": self.mode, "ignore": list(self.ignore), "recipe": steps})  # type: ignore[return-value]

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
    _MF_SMOOTH_ARGS: ClassVar[dict[str, str]] = {
        "alpha": "smooth_alpha",
        "smooth_alpha": "smooth_alpha",
        "smooth_alpha_grid": "smooth_alpha_grid",
        "smooth_search_batches": "smooth_search_batches",
    }
    # quantmint's own extension: MindFormers has no 4-bit groups; `group_size` carries them.
    _MF_WEIGHT_ARGS: ClassVar[tuple[str, ...]] = ("group_size",)

    @classmethod
    def from_mindformers(cls, block: dict[str, Any]) -> PTQConfig:
        """Map a MindFormers `quantization_config` block (see the MindFormers quantization guide).

        `rtn` rounds weights (and the kv cache); `smooth_quant` adds int8 activations with SmoothQuant;
        `ptq` is block-sequential PTQ, with the dtypes and outliers_suppression as written and the
        `BlockPTQArgs` knobs in `algorithm_args`.
        """
        if not isinstance(block, dict):
            raise ConfigError(
                f"MindFormers quantization_config must be a mapping, got {type(block).__name__}"
            )
        _check_plain(block, "MindFormers quantization_config")
        unknown = sorted(set(block) - set(cls._MF_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} in MindFormers quantization_config; allowed: {list(cls._MF_KEYS)}"
            )
        method = block.get("quant_method")
        if method not in cls._MF_METHODS:
            raise ConfigError(f"invalid quant_method {_short_repr(method)}; allowed: {list(cls._MF_METHODS)}")
        not_convert = block.get("modules_to_not_convert")
        if not_convert is not None and not isinstance(not_convert, (list, str)):
            raise ConfigError(
                f"modules_to_not_convert must be a list of module names, got {type(not_convert).__name__} "
                f"{_short_repr(not_convert)}"
            )
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
            raise ConfigError(f"algorithm_args must be a mapping, got {_short_repr(args_in)}")
        ptq_keys = tuple(BlockPTQArgs.model_fields) if method == "ptq" else ()
        allowed = (*cls._MF_SMOOTH_ARGS, *cls._MF_WEIGHT_ARGS, *ptq_keys)
        bad_args = sorted(set(args_in) - set(allowed))
        if bad_args:
            raise ConfigError(
                f"unknown algorithm_args key(s) {bad_args} for quant_method {method!r}; "
                f"allowed: {sorted(allowed)}"
            )
        weight_dtype = _none_if_spelled_none(block.get("weight_dtype", "int8"))
        weights: dict[str, Any] = {}
        if "group_size" in args_in:
            weights = {"strategy": "group", "group_size": args_in["group_size"]}
        ignore = block.get("modules_to_not_convert")
        return cls(
            weight_dtype=weight_dtype,
            activation_dtype=activation,
            kvcache_dtype=block.get("kvcache_dtype"),
            outliers_suppression=outliers or "none",
            weights=weights,
            algorithm_args={
                cls._MF_SMOOTH_ARGS[k]: v for k, v in args_in.items() if k in cls._MF_SMOOTH_ARGS
            },
            block_ptq={k: v for k, v in args_in.items() if k in ptq_keys} if method == "ptq" else None,
            # A single string is one pattern (not a list of its characters).
            ignore=["lm_head"] if ignore is None else [ignore] if isinstance(ignore, str) else list(ignore),
        )

    def to_mindformers(self) -> dict[str, Any]:
        """The MindFormers `quantization_config` block for this config (inverse of `from_mindformers`).

        Its `quant_method` is the last of `_MF_METHODS` that a step of the recipe names
        (`AlgorithmConfig.mindformers_method`; `rtn` when none does)."""
        recipe = self.recipe()
        unnamed = [step.name for step in recipe if step.mindformers_method is None]
        if unnamed:
            raise ConfigError(
                f"MindFormers' quantization_config cannot name the recipe's step(s) {', '.join(unnamed)}; "
                "write this config in quantmint's own schema (PTQConfig.to_yaml)"
            )
        named = [self._MF_METHODS.index(s.mindformers_method) for s in recipe if s.mindformers_method]
        method = self._MF_METHODS[max(named, default=0)]
        if method == "rtn" and self.activation_dtype is not None:
            raise ConfigError(
                "MindFormers has no quant_method for int8 activations without smoothing or block PTQ; "
                "write this config in quantmint's own schema (PTQConfig.to_yaml)"
            )
        args: dict[str, Any] = {}
        if self.weights.strategy == "group":
            args["group_size"] = self.weights.group_size
        if self.outliers_suppression == "smooth":
            args.update(self._mindformers_smooth_args())
        if self.block_ptq is not None:
            args.update(self.block_ptq.model_dump(mode="json"))
        return {
            "quant_method": method,
            "weight_dtype": self.weight_dtype,
            "activation_dtype": self.activation_dtype,
            "kvcache_dtype": self.kvcache_dtype,
            "outliers_suppression": None
            if self.outliers_suppression == "none"
            else self.outliers_suppression,
            "modules_to_not_convert": list(self.ignore),
            "algorithm_args": args,
        }

    def _mindformers_smooth_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"alpha": self.algorithm_args.smooth_alpha}
        if self.algorithm_args.smooth_alpha_grid:
            args["smooth_alpha_grid"] = list(self.algorithm_args.smooth_alpha_grid)
            args["smooth_search_batches"] = self.algorithm_args.smooth_search_batches
        return args


# The seeds' combination list: RTN W8A16, SmoothQuant W8A8, C8, W8A16+C8, SmoothQuant+C8.
# SmoothQuant presets search alpha per block on this grid: on SmolLM2 it gave +0.49% perplexity with
# 169 s of calibration (128 x 512 tokens), where a fixed 0.5 gave +0.86% in 71 s (docs/benchmarks.md).
_SMOOTH_SEARCH = AlgorithmArgs(smooth_alpha_grid=[0.5, 0.6, 0.7, 0.8])
_INT4_GROUPS = QuantArgs(num_bits=4, strategy="group", group_size=128)
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
    # 4-bit weights in groups of 128 (RTN), and block PTQ of the int8 and int4 schemes.
    "w4a16": PTQConfig(weight_dtype="int4", weights=_INT4_GROUPS),
    "w8a8-ptq": PTQConfig(
        weight_dtype="int8",
        activation_dtype="int8",
        outliers_suppression="smooth",
        block_ptq=BlockPTQArgs(),
    ),
    "w8a16-ptq": PTQConfig(weight_dtype="int8", block_ptq=BlockPTQArgs()),
    "w4a16-ptq": PTQConfig(weight_dtype="int4", weights=_INT4_GROUPS, block_ptq=BlockPTQArgs()),
}


def get_preset(name: str) -> PTQConfig:
    """The preset config called `name` (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
