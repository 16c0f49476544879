"""The algorithm interface: what one step of a quantization recipe does, and the registry of them.

A recipe is an ordered list of `AlgorithmConfig`s (plain data, see `quantmint.config`); `PTQConfig.recipe()`
turns a config or preset into one. Each config type is run by the `Algorithm` registered for it through
the `register_algorithms` hook, built-ins included (entry point `builtin_algorithms`), so a package
outside quantmint adds an algorithm with one module and two lines of `pyproject.toml`.

Calibration runs block by block (`quantmint.algorithms.calibration`); for each block, after its inputs were
observed on every calibration batch, the pipeline calls on every step of the recipe, in order
(first, in every mode, `rotated_linears` says which linears get their input rotated as they are read):

0. `before_block(config, ctx)`: before the block runs on the calibration batches, attach observers
   (the kv cache observes K and V);
1. `before_round(config, ctx)`: change the float block or choose how it is rounded (SmoothQuant picks
   its smoothing; a clipping step edits weights);
2. the weights of the block are rounded (RTN) with what step 1 chose;
3. `after_round(config, ctx)`: record what was measured (the kv cache stores its scales).

An algorithm that drives calibration itself (block PTQ tunes each block against its float output)
returns a report from `run`; otherwise `run` returns None and the sequential engine runs. When no step
`needs_calibration`, the same per-block steps run without data (no observers, no calls).

The pipeline asks the recipe, never a particular algorithm, what it needs to know:

- `rounding(config)`: the one step that rounds weights says how (`Rounding`: the scheme, the
  fake-quantized twin of a float linear, ...); a recipe without one quantizes no linear;
- `kv_cache_modules(config, layout)`: the attention modules a step stores k_scale / v_scale in;
- `calibration_calls(config)`: how many of a block's calibration calls `before_round` reads;
- `deploy(config, steps, schemes)`: mode deploy, give the model the empty structure this step's
  checkpoint tensors are read into (int8 cells, kv-cache scales).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from quantmint.config import AlgorithmConfig, PTQConfig
from quantmint.errors import ConfigError, PluginError

if TYPE_CHECKING:
    import argparse

    import torch
    from torch import nn

    from quantmint.algorithms.calibration import BlockCall, CalibrationReport
    from quantmint.algorithms.observers import InputObserver
    from quantmint.algorithms.ptq import BlockSteps
    from quantmint.cells.fake_quant import FakeQuantLinear
    from quantmint.extension.family import BlockLayout, ModelFamily, ModelLayout

__all__ = [
    "Algorithm",
    "AlgorithmBase",
    "BlockContext",
    "algorithm_for",
    "algorithms",
    "Rounding",
    "check_recipe",
    "recipe_from_data",
    "per_block_steps",
    "recipe_rounding",
]


@dataclass
class BlockContext:
    """One calibrated block, as the recipe's steps see it from observing to rounding."""

    steps: BlockSteps
    block: BlockLayout
    observers: dict[str, InputObserver]  # the input of every family linear of the block
    # Removed (`.remove()`) once the block ran on every batch: `before_block` adds its own hooks here.
    handles: list[Any] = field(default_factory=list)
    calls: list[BlockCall] = field(default_factory=list)  # the block's inputs (set before `before_round`)
    outputs: list[torch.Tensor] = field(default_factory=list)  # the float block's output for each call
    # Set by a `before_round` step: an object whose `smooth_block(block, family, observers)` returns the
    # (input scales, prev output scales) the rounding applies (`quantmint.algorithms.smooth_quant`).
    smoothing: Any = None
    kv_observer: Any = None  # the block's `KVObserver`, when the recipe calibrates the kv cache
    prev_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # folded into `prev` outputs


class Rounding(Protocol):
    """How the recipe's weight-rounding step turns a float linear into its fake-quantized twin (see
    `quantmint.algorithms.rtn.RoundToNearest`, the built-in one)."""

    @property
    def scheme(self) -> str:
        """The scheme of the linears it rounds (`w8a16`, `w8a8`, `w4a16`, `w4a8`: an int8 cell's)."""
        ...

    @property
    def num_bits(self) -> int:
        """Bits of a rounded weight."""
        ...

    @property
    def input_percentile(self) -> float | None:
        """The percentile the input observers clip activation ranges to (None: min-max)."""
        ...

    def fake_linear(
        self,
        module: nn.Module,
        family: ModelFamily,
        observer: InputObserver | None,
        smoothing: torch.Tensor | None,
        convert_only: bool = False,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
        name: str | None = None,
    ) -> FakeQuantLinear:
        """The fake-quantized twin of one float linear, given its input observer and smoothing."""
        ...

    @property
    def file_rounding(self) -> tuple[str, int] | None:
        """(strategy, bits) when a weight may be rounded straight from its file by the native per-channel
        kernel (`quantmint.numerics.native_rtn.quantize_weight_from_file`) with the same result as
        `fake_linear` (plain RTN); None otherwise, and the weight is read, then rounded."""
        ...


@runtime_checkable
class Algorithm(Protocol):
    """Runs the recipe steps of one config type. Subclass `AlgorithmBase` for no-op defaults."""

    config_type: ClassVar[type[AlgorithmConfig]]
    # True when `run` keeps its progress in the work dir, so a killed run started again resumes (block PTQ)
    resumable: ClassVar[bool]

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        """Whether this step measures anything on calibration data."""
        ...

    def validate(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> None:
        """Raise ConfigError when `config` cannot run with the rest of `recipe`."""
        ...

    def rotated_linears(
        self, config: AlgorithmConfig, layout: ModelLayout, targets: dict[str, nn.Module]
    ) -> set[str]:
        """Targets whose input this step rotates online, the rotation folded into their weights."""
        ...

    def run(
        self, config: AlgorithmConfig, steps: BlockSteps, samples: list[torch.Tensor]
    ) -> CalibrationReport | None:
        """Drive calibration over all blocks and return its report, or None for the sequential engine."""
        ...

    def before_block(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        """Per block, before it runs on the calibration batches: attach observers (to `ctx.handles`)."""
        ...

    def before_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        """Per block, before its weights are rounded."""
        ...

    def after_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        """Per block, after its weights are rounded."""
        ...

    def rounding(self, config: AlgorithmConfig) -> Rounding | None:
        """How this step rounds the weights of the quantized linears; None when it rounds none."""
        ...

    def kv_cache_modules(self, config: AlgorithmConfig, layout: ModelLayout) -> dict[str, BlockLayout]:
        """Full names of the attention modules this step gives k_scale / v_scale, with their blocks."""
        ...

    def calibration_calls(self, config: AlgorithmConfig) -> int | None:
        """How many of a block's calibration calls `before_round` reads (`ctx.calls`, `ctx.outputs`);
        block PTQ keeps only these in memory. None: all of them."""
        ...

    def deploy(self, config: AlgorithmConfig, steps: BlockSteps, schemes: dict[str, str]) -> None:
        """Mode deploy: give `steps.model` the empty tensors this step's checkpoint entries are read
        into (`schemes`: each quantized linear's scheme as saved)."""
        ...

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        """Add this algorithm's options to `quantmint quantize` (SmoothQuant's `--smooth-alpha`)."""
        ...

    def apply_cli_options(self, config: PTQConfig, args: argparse.Namespace) -> PTQConfig:
        """`config` changed as this algorithm's options in `args` ask (unchanged when none is given);
        ValueError, naming the option and the fix, when the config cannot take them."""
        ...


class AlgorithmBase:
    """No-op defaults of `Algorithm`: a subclass sets `config_type` and overrides what it takes part in."""

    config_type: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    resumable: ClassVar[bool] = False

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        return False

    def validate(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> None:
        try:
            config.check(recipe)
        except ValueError as exc:
            raise ConfigError(f"{config.name}: {exc}") from None

    def rotated_linears(
        self, config: AlgorithmConfig, layout: ModelLayout, targets: dict[str, nn.Module]
    ) -> set[str]:
        return set()

    def run(
        self, config: AlgorithmConfig, steps: BlockSteps, samples: list[torch.Tensor]
    ) -> CalibrationReport | None:
        return None

    def before_block(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        return None

    def before_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        return None

    def after_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        return None

    def rounding(self, config: AlgorithmConfig) -> Rounding | None:
        return None

    def kv_cache_modules(self, config: AlgorithmConfig, layout: ModelLayout) -> dict[str, BlockLayout]:
        return {}

    def calibration_calls(self, config: AlgorithmConfig) -> int | None:
        return None

    def reads_rotated_inputs(self, config: AlgorithmConfig) -> bool:
        """Whether this step reads, while a block runs in float, the input of a linear the recipe
        rotates (through its own hooks, or through the input observers its rounding reads). Optional:
        an algorithm without this method is taken to read them. When no step of the recipe does, the
        float pass runs those linears unrotated (the same function, without the rotation's cost) and
        they are rotated just before the block is rounded (`BlockSteps.finish`)."""
        return True

    def deploy(self, config: AlgorithmConfig, steps: BlockSteps, schemes: dict[str, str]) -> None:
        return None

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        return None

    def apply_cli_options(self, config: PTQConfig, args: argparse.Namespace) -> PTQConfig:
        return config


def _validate_algorithm(obj: Any, plugin: str) -> None:
    config_type = getattr(obj, "config_type", None)
    if not (isinstance(config_type, type) and issubclass(config_type, AlgorithmConfig)) or not isinstance(
        obj, Algorithm
    ):
        raise PluginError(
            f"plugin {plugin!r} registered {obj!r}, which is not a quantmint Algorithm (an object with "
            "`config_type`, an AlgorithmConfig subclass, and the Algorithm methods: subclass AlgorithmBase)"
        )
    if not config_type.name:
        raise PluginError(
            f"plugin {plugin!r}: {config_type.__name__} has no `name`; set name: ClassVar[str] = '...'"
        )


def algorithms() -> dict[str, Algorithm]:
    """Every registered algorithm, by its config type's `name` (`rtn`, `smooth_quant`, ...)."""
    from quantmint.extension import registry

    return registry.algorithms(_validate_algorithm)


def algorithm_for(config: AlgorithmConfig | str) -> Algorithm:
    """The algorithm registered for a recipe step (or for a step name); ConfigError if there is none."""
    from quantmint.extension import registry

    name = config if isinstance(config, str) else config.name
    found = algorithms()
    algorithm = found.get(name)
    if algorithm is None:
        raise ConfigError(
            f"unknown algorithm {name!r}; registered algorithms: {', '.join(sorted(found)) or 'none'} "
            f"(is its plugin installed, or excluded by {registry.PLUGINS_ENV}?)"
        )
    if not isinstance(config, str) and not isinstance(config, algorithm.config_type):
        raise ConfigError(
            f"algorithm {name!r} runs {algorithm.config_type.__name__} steps, not {type(config).__name__}"
        )
    return algorithm


def check_recipe(recipe: list[AlgorithmConfig]) -> list[tuple[AlgorithmConfig, Algorithm]]:
    """Each step of `recipe` with its algorithm, validated against the rest of the recipe."""
    pairs = [(step, algorithm_for(step)) for step in recipe]
    for step, algorithm in pairs:
        algorithm.validate(step, recipe)
    return pairs


def per_block_steps(pairs: list[tuple[AlgorithmConfig, Algorithm]]) -> list[str]:
    """The steps that take part in the per-block pipeline (`run`, `before_block`, `before_round`,
    `after_round`), by name: an algorithm not built on `AlgorithmBase` is counted in."""
    hooks = ("run", "before_block", "before_round", "after_round")
    return [
        step.name
        for step, alg in pairs
        if not isinstance(alg, AlgorithmBase)
        or any(getattr(type(alg), h) is not getattr(AlgorithmBase, h) for h in hooks)
    ]


def recipe_rounding(pairs: list[tuple[AlgorithmConfig, Algorithm]]) -> Rounding | None:
    """The rounding of the recipe's one weight-rounding step (None: the recipe rounds no weights);
    ConfigError when two steps round weights."""
    found = [(step, r) for step, alg in pairs if (r := alg.rounding(step)) is not None]
    if len(found) > 1:
        names = ", ".join(step.name for step, _ in found)
        raise ConfigError(f"the recipe rounds weights in {len(found)} steps ({names}): keep one")
    return found[0][1] if found else None


def recipe_from_data(data: Any) -> list[AlgorithmConfig]:
    """A recipe from plain data (YAML): a list of mappings, each with the `name` of a registered
    algorithm and its config's keys, e.g. `[{name: smooth_quant, alpha: 0.6}, {name: rtn, weights: {}}]`."""
    if not isinstance(data, list):
        raise ConfigError(f"a recipe is a list of steps, got {type(data).__name__}")
    recipe = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"recipe step {i} must be a mapping with a 'name', got {item!r:.80}")
        args = {k: v for k, v in item.items() if k != "name"}
        config_type = algorithm_for(item["name"]).config_type
        try:
            recipe.append(config_type.from_dict(args))
        except ConfigError as exc:
            raise ConfigError(f"step {i} ({item['name']}): {exc}") from None
    check_recipe(recipe)
    return recipe
