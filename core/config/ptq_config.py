"""`PTQConfig`: Golden Stick's PTQConfig as fields, the recipe it stands for, YAML and the MindFormers
`quantization_config` mapping."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from quantmint.config.base import QuantArgs, QuantDtype, StrictConfig, WeightDtype, none_if_spelled_none
from quantmint.config.plain_yaml import MAX_CONFIG_BYTES, ConfigDumper, check_plain, short_repr, yaml_data
from quantmint.config.steps import (
    AlgorithmArgs,
    AlgorithmConfig,
    BlockPTQArgs,
    GPTQArgs,
    GPTQConfig,
    HadamardConfig,
    KVCacheConfig,
    RoundToNearestConfig,
    SmoothQuantConfig,
)
from quantmint.errors import ConfigError

_WEIGHTS_DEFAULT = QuantArgs(strategy="channel")
_ACTIVATIONS_DEFAULT = QuantArgs(strategy="token", dynamic=True)
_KVCACHE_DEFAULT = QuantArgs(strategy="channel")


class PTQConfig(StrictConfig):
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
    # Set: the weights are rounded by GPTQ instead of round-to-nearest (see `GPTQArgs`).
    gptq: GPTQArgs | None = None
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
        return none_if_spelled_none(value)

    @model_validator(mode="before")
    @classmethod
    def _weight_bits_from_dtype(cls, data: Any) -> Any:
        """`weight_dtype: int4` sets `weights.num_bits: 4` unless the weights block says otherwise."""
        if isinstance(data, dict) and none_if_spelled_none(data.get("weight_dtype")) == "int4":
            weights = data.get("weights", {})
            if isinstance(weights, dict) and "num_bits" not in weights:
                data = {**data, "weights": {**weights, "num_bits": 4}}
            elif isinstance(weights, QuantArgs) and "num_bits" not in weights.model_fields_set:
                data = {**data, "weights": weights.model_copy(update={"num_bits": 4})}
        return data

    @field_validator("outliers_suppression", mode="before")
    @classmethod
    def _outliers_none(cls, value: Any) -> Any:
        return "none" if none_if_spelled_none(value) is None else value

    @field_validator("ignore")
    @classmethod
    def _regexes_compile(cls, value: list[str]) -> list[str]:
        for entry in value:
            if len(entry) > 1000:
                raise ValueError(
                    f"ignore entry {short_repr(entry)} is {len(entry):,} characters; at most 1000"
                )
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except (re.error, OverflowError, RecursionError) as exc:
                    raise ValueError(
                        f"ignore entry {short_repr(entry)} is not a valid regex: {exc}"
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
            if self.weights.num_bits != 4:
                raise ValueError(
                    "asymmetric weights (zero points) are 4-bit only; int8 weights are stored symmetric: "
                    "set weights.symmetric: true, or weight_dtype: int4 with weights.num_bits: 4"
                )
            if self.activation_dtype is not None:
                raise ValueError(
                    "asymmetric 4-bit weights (zero points) are weight-only (W4A16): set activation_dtype: "
                    "null, or weights.symmetric: true for W4A8"
                )
            if self.block_ptq is not None:
                raise ValueError(
                    "block PTQ tunes symmetric weights only: set weights.symmetric: true, or drop block_ptq "
                    "(gptq rounds asymmetric 4-bit weights)"
                )
        if self.activations.strategy not in ("token", "tensor"):
            raise ValueError("activations are quantized per 'token' (dynamic) or per 'tensor'")
        if self.kvcache.dynamic or self.kvcache.strategy == "token":
            raise ValueError("the kv cache uses static scales per 'channel', 'head' or 'tensor'")
        if self.gptq is not None and not self.weight_dtype:
            raise ValueError("gptq rounds weights: set weight_dtype (int8 or int4), or drop gptq")
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
            steps.append(HadamardConfig(auto=args.hadamard == "auto"))
        if self.outliers_suppression == "smooth":
            steps.append(
                SmoothQuantConfig(
                    alpha=args.smooth_alpha,
                    alpha_grid=list(args.smooth_alpha_grid),
                    search_batches=args.smooth_search_batches,
                    search_samples=args.smooth_search_samples,
                    search=args.smooth_alpha_search,
                    search_loss=args.smooth_search_loss,
                )
            )
        if self.weight_dtype:
            rounding = dict(
                weights=self.weights,
                activations=self.activations if self.activation_dtype else None,
                w8a16_outlier_ratio=args.w8a16_outlier_ratio,
            )
            if self.gptq is not None:
                steps.append(GPTQConfig(**rounding, **self.gptq.model_dump()))
            else:
                steps.append(RoundToNearestConfig(**rounding))
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
            # `gptq` is written only when set: configs without it keep the bytes they had before it existed
            return self.model_dump(mode="json", exclude=None if self.gptq is not None else {"gptq"})
        return {
            "mode": self.mode,
            "ignore": list(self.ignore),
            "recipe": [{"name": step.name, **step.model_dump(mode="json")} for step in self._steps],
        }

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=ConfigDumper, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> PTQConfig:
        """Read our own schema, or a MindFormers `quantization_config` block (with or without that key).

        Plain YAML only: anchors, aliases, duplicate keys, non-string keys, deep nesting and huge integers
        are refused (see `ConfigLoader`)."""
        data = yaml_data(text)
        if data is None:
            raise ConfigError("config is empty: write a mapping of keys to values (see the README)")
        if not isinstance(data, dict):
            raise ConfigError(
                f"config must be a mapping of keys to values at the top level, got a {type(data).__name__} "
                f"({short_repr(data)})"
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
        "smooth_search_samples": "smooth_search_samples",
    }
    # quantmint's own extension: MindFormers has no 4-bit groups nor zero points; `group_size` and
    # `symmetric` (false: asymmetric 4-bit weights) carry them.
    _MF_WEIGHT_ARGS: ClassVar[tuple[str, ...]] = ("group_size", "symmetric")

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
        check_plain(block, "MindFormers quantization_config")
        unknown = sorted(set(block) - set(cls._MF_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} in MindFormers quantization_config; allowed: {list(cls._MF_KEYS)}"
            )
        method = block.get("quant_method")
        if method not in cls._MF_METHODS:
            raise ConfigError(f"invalid quant_method {short_repr(method)}; allowed: {list(cls._MF_METHODS)}")
        not_convert = block.get("modules_to_not_convert")
        if not_convert is not None and not isinstance(not_convert, (list, str)):
            raise ConfigError(
                f"modules_to_not_convert must be a list of module names, got {type(not_convert).__name__} "
                f"{short_repr(not_convert)}"
            )
        activation = none_if_spelled_none(block.get("activation_dtype"))
        outliers = none_if_spelled_none(block.get("outliers_suppression"))
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
            raise ConfigError(f"algorithm_args must be a mapping, got {short_repr(args_in)}")
        ptq_keys = tuple(BlockPTQArgs.model_fields) if method == "ptq" else ()
        allowed = (*cls._MF_SMOOTH_ARGS, *cls._MF_WEIGHT_ARGS, *ptq_keys)
        bad_args = sorted(set(args_in) - set(allowed))
        if bad_args:
            raise ConfigError(
                f"unknown algorithm_args key(s) {bad_args} for quant_method {method!r}; "
                f"allowed: {sorted(allowed)}"
            )
        weight_dtype = none_if_spelled_none(block.get("weight_dtype", "int8"))
        weights: dict[str, Any] = {}
        if "group_size" in args_in:
            weights = {"strategy": "group", "group_size": args_in["group_size"]}
        if "symmetric" in args_in:
            weights["symmetric"] = args_in["symmetric"]
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
        if not self.weights.symmetric:
            args["symmetric"] = False
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
            if self.algorithm_args.smooth_search_samples:
                args["smooth_search_samples"] = self.algorithm_args.smooth_search_samples
        return args
