"""The PTQ algorithm: assembles algorithm modules from a `PTQConfig` and runs them in two phases.

- `apply` (mode `quantize`): calibrate and fake-quantize a float model in place; its outputs are those
  of the quantized model, so accuracy can be checked before converting.
- `apply` (mode `deploy`): rebuild the quantized structure with empty int8 cells, ready to be filled
  from a checkpoint (no float weights are needed).
- `convert`: swap every fake-quant layer for the real int8 cell that the runtime registered for its
  scheme.

`quantize(model, config)` does both phases and returns the converted model.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantmint.algorithms.base import Algorithm, BlockContext, Rounding, check_recipe, recipe_rounding
from quantmint.algorithms.calibration import BlockCall, CalibrationReport, run_sequential
from quantmint.algorithms.distributed import current_world, samples_digest
from quantmint.algorithms.observers import InputObserver, attach_input_observers
from quantmint.algorithms.rotation import carry_rotation, rotate_linear
from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.config import AlgorithmConfig, PTQConfig, get_preset
from quantmint.errors import ConfigError, QuantmintError
from quantmint.extension import registry
from quantmint.extension.family import BlockLayout, ModelFamily, ModelLayout, resolve_layout
from quantmint.extension.matching import matches_any

__all__ = ["PTQ", "BlockSteps", "QuantState", "quant_state", "quantize"]

STATE_ATTR = "_quantmint_state"


@dataclass
class QuantState:
    """What quantmint did to a model: kept on the model, written into the checkpoint's config."""

    config: PTQConfig
    family: str
    modules: dict[str, str] = field(default_factory=dict)  # module name -> scheme
    phase: str = "applied"  # "applied" (fake-quant) or "converted" (real int8 cells)
    calibration: dict[str, Any] | None = None  # samples, tokens, seconds, peak RSS of calibration
    kv_modules: list[str] = field(default_factory=list)  # attention modules holding k_scale / v_scale
    rotated: list[str] = field(default_factory=list)  # linears whose input is Hadamard-rotated
    # Out-of-core calibration (`quantmint.algorithms.streaming`) moves each finished block to the meta device
    # and
    # keeps its converted tensors here, to be read back when the checkpoint is written.
    block_store: Any = None


def quant_state(model: nn.Module) -> QuantState | None:
    """The `QuantState` of a model that quantmint quantized or loaded, else None."""
    return getattr(model, STATE_ATTR, None)


def as_config(config: PTQConfig | str | dict[str, Any]) -> PTQConfig:
    """Accept a config object, a preset name or a plain mapping."""
    if isinstance(config, PTQConfig):
        return config
    if isinstance(config, str):
        return get_preset(config)
    if isinstance(config, dict):
        return PTQConfig.from_dict(config)  # type: ignore[return-value]
    raise ConfigError(f"expected a PTQConfig, a preset name or a mapping, got {type(config).__name__}")


class PTQ:
    """Post-training quantization of one model, configured by a `PTQConfig`."""

    def __init__(
        self,
        config: PTQConfig | str | dict[str, Any],
        family: str | None = None,
        recipe: list[AlgorithmConfig] | None = None,
    ) -> None:
        """`recipe` replaces `config.recipe()` (the ordered algorithm steps), e.g. to add a step of a
        plugin's algorithm; `config` still gives the ignore list and mode (`PTQConfig.with_recipe`)."""
        self.config = as_config(config)
        if recipe is not None and list(recipe) != self.config.recipe():
            self.config = self.config.with_recipe(list(recipe))
        self.family_name = family
        self.recipe = self.config.recipe()
        self._algorithms: list[tuple[AlgorithmConfig, Algorithm]] | None = None
        self._rounding: tuple[Rounding | None] | None = None
        # Out-of-core calibration reads and frees each block through this (`BlockSteps.loader`).
        self.block_loader: Any = None
        self._rotated: set[str] = set()  # set by apply (see `rotated`)

    @property
    def algorithms(self) -> list[tuple[AlgorithmConfig, Algorithm]]:
        """Each step of the recipe with its registered algorithm, validated against the recipe."""
        if self._algorithms is None:
            self._algorithms = check_recipe(self.recipe)
        return self._algorithms

    @property
    def needs_calibration(self) -> bool:
        """Whether a step of the recipe measures anything on calibration data (smoothing, static
        activation ranges, kv-cache scales, block PTQ)."""
        return any(alg.needs_calibration(step, self.recipe) for step, alg in self.algorithms)

    @property
    def rounding(self) -> Rounding | None:
        """How the recipe's weight-rounding step rounds a linear (None: the recipe rounds no weights)."""
        if self._rounding is None:
            self._rounding = (recipe_rounding(self.algorithms),)
        return self._rounding[0]

    def kv_attention_modules(self, layout: ModelLayout) -> dict[str, BlockLayout]:
        """Full names of the attention modules that a step of the recipe gives kv-cache scales (C8),
        with their blocks."""
        modules: dict[str, BlockLayout] = {}
        for step, algorithm in self.algorithms:
            modules.update(algorithm.kv_cache_modules(step, layout))
        return modules

    # --- structure ----------------------------------------------------------------------------
    def layout(self, model: nn.Module) -> ModelLayout:
        family = registry.find_family(model, self.family_name)
        # deploy mode builds a checkpoint's empty cells: its float weights are not real, so only the
        # declared paths and shapes are checked, not the smoothing pairs' exactness
        return resolve_layout(model, family, check_exact=self.config.mode != "deploy")

    def ignore_patterns(self, family: ModelFamily) -> list[str]:
        return [*self.config.ignore, *family.default_ignore]

    def targets(self, layout: ModelLayout) -> dict[str, nn.Module]:
        """Linears this config quantizes: the family's linears minus the ignore list, by full name (none
        when no step of the recipe rounds weights)."""
        if self.rounding is None:
            return {}
        ignore = self.ignore_patterns(layout.family)
        return {name: m for name, m in layout.linears() if not matches_any(name, ignore)}

    def rotated(self, layout: ModelLayout, targets: dict[str, nn.Module]) -> set[str]:
        """Targets whose input gets an online rotation from a step of the recipe (the Hadamard step:
        the family's `hadamard_linears` in every block)."""
        chosen: set[str] = set()
        for step, algorithm in self.algorithms:
            chosen |= algorithm.rotated_linears(step, layout, targets)
        return chosen

    def rotate_if_chosen(self, name: str, module: nn.Module, family: ModelFamily) -> None:
        """Fold the Hadamard rotation into a float linear chosen by `rotated` (W -> W H) and rotate its
        input from now on; the model computes the same function."""
        if name in self._rotated:
            rotate_linear(module, family.adapter)

    def is_rotated(self, name: str) -> bool:
        """Whether the linear `name` gets its input rotated (chosen by `rotated` in `apply`)."""
        return name in self._rotated

    @property
    def scheme(self) -> str:
        """The scheme of the quantized linears ('' when the recipe rounds no weights)."""
        rounding = self.rounding
        return "" if rounding is None else rounding.scheme

    # --- phases -------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(
        self,
        model: nn.Module,
        calibration: list[torch.Tensor] | None = None,
        batch_size: int = 8,
        schemes: dict[str, str] | None = None,
        work_dir: str | os.PathLike[str] | None = None,
    ) -> nn.Module:
        """Fake-quantize `model` in place (mode quantize) or give it empty int8 cells (mode deploy).

        Args:
            calibration: 1-D int64 token tensors (see `quantmint.io.data.calibration_samples`); needed
                when the config smooths outliers or uses static activation ranges.
            batch_size: calibration samples per forward pass.
            schemes: deploy mode: the scheme of each module as saved (calibration may have kept some
                W8A8 linears at W8A16); others get the config's scheme.
            work_dir: block PTQ keeps each tuned block here, so a killed run started again with the
                same arguments resumes after the last finished block (None: no resuming).
        """
        if quant_state(model) is not None:
            raise ConfigError(
                "this model was already quantized by quantmint; start again from the float model"
            )
        layout = self.layout(model)
        targets = self.targets(layout)
        if not targets and self.rounding is not None:
            raise ConfigError(
                f"the ignore list {self.ignore_patterns(layout.family)} excludes every linear of "
                f"family {layout.family.name!r}: nothing is left to quantize"
            )
        state = QuantState(config=self.config, family=layout.family.name)
        self._rotated = self.rotated(layout, targets)
        state.rotated = sorted(self._rotated)
        if self.config.mode == "deploy":
            steps = BlockSteps(self, model, layout, targets, state)
            for step, algorithm in self.algorithms:
                algorithm.deploy(step, steps, schemes or {})
            state.phase = "converted"
        elif self.needs_calibration:
            if not calibration:
                calibrating = [s.name for s, a in self.algorithms if a.needs_calibration(s, self.recipe)]
                raise ConfigError(
                    f"{self.config.scheme_name} needs calibration data (measured by the recipe's "
                    f"{', '.join(calibrating)}): pass calibration=quantmint.io.data.calibration_samples(...) "
                    "(CLI: --calib FILE)"
                )
            state.calibration = self._calibrate(
                model, layout, targets, calibration, batch_size, state, work_dir
            )
        else:
            steps = BlockSteps(self, model, layout, targets, state)
            for block in tqdm(layout.blocks, desc="round weights", unit="block", disable=None):
                steps.run_without_data(block)
        setattr(model, STATE_ATTR, state)
        return model

    def _fake_linear(
        self,
        module: nn.Module,
        family: ModelFamily,
        observer: InputObserver | None,
        smoothing: torch.Tensor | None,
        convert_only: bool = False,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
        name: str | None = None,
    ) -> FakeQuantLinear:
        """The fake-quantized twin of one float linear, as the recipe's rounding step makes it (see
        `Rounding.fake_linear`)."""
        rounding = self.rounding
        if rounding is None:
            raise ConfigError(f"{name or type(module).__name__}: no step of the recipe rounds weights")
        return rounding.fake_linear(
            module, family, observer, smoothing, convert_only=convert_only, quantized=quantized, name=name
        )

    def _transform_block(
        self,
        block: BlockLayout,
        family: ModelFamily,
        observers: dict[str, InputObserver],
        targets: dict[str, nn.Module],
        smooth: Any,
    ) -> dict[str, torch.Tensor]:
        """Smooth (`smooth`, set by a step's `before_round`, see `BlockContext.smoothing`), then
        fake-quantize the targets of one block in place; returns the scales folded into `prev` outputs
        (see `SmoothQuant.smooth_block`)."""
        if smooth:  # smoothing would spread a NaN or inf to the linears sharing its input: name its source
            for name, module in block.linears.items():
                weight = family.adapter.weight(module)
                if name in targets and not bool(torch.isfinite(weight).all()):
                    raise QuantmintError(
                        f"the float weight of {name} holds NaN or inf values (its int8 scale would be NaN "
                        "or inf): the float model is corrupt; check it with torch.isfinite"
                    )
        inputs, outputs = smooth.smooth_block(block, family, observers) if smooth else ({}, {})
        for name, module in block.linears.items():
            if name in targets:
                fake = self._fake_linear(module, family, observers.get(name), inputs.get(name), name=name)
                block.module.set_submodule(name[len(block.name) + 1 :], fake)
        return outputs

    def _calibrate(
        self,
        model: nn.Module,
        layout: ModelLayout,
        targets: dict[str, nn.Module],
        samples: list[torch.Tensor],
        batch_size: int,
        state: QuantState,
        work_dir: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Block by block: observe inputs, smooth, fake-quantize (see `quantmint.algorithms.calibration`);
        with
        `block_ptq`, then tune each block (see `quantmint.algorithms.block_ptq`)."""
        steps = BlockSteps(self, model, layout, targets, state)
        steps.loader = self.block_loader
        steps.work_dir = work_dir
        # Data-parallel calibration: the ranks must calibrate the same thing, or the result is no one's.
        if steps.world.distributed:
            steps.world.same_everywhere(
                "configs or calibration samples", f"{self.config.to_yaml()}\n{samples_digest(samples)}"
            )
        for step, algorithm in self.algorithms:  # a step that drives calibration itself (block PTQ)
            driven = algorithm.run(step, steps, samples)
            if driven is not None:
                return steps.result(driven)
        report = run_sequential(
            model, layout, samples, steps.attach, steps.finish, batch_size=batch_size, done=steps.done
        )
        return steps.result(report)

    def weight_scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of a linear's `weight_scale` under the recipe's rounding (see `quant_math.weight_absmax`)."""
        rounding = self.rounding
        shape = getattr(rounding, "weight_scale_shape", None)
        if shape is None:
            raise ConfigError("no step of the recipe rounds weights into scales of a known shape")
        return shape(out_features, in_features)

    @torch.no_grad()
    def convert(self, model: nn.Module) -> nn.Module:
        """Swap every `FakeQuantLinear` for the registered int8 cell of its scheme."""
        state = quant_state(model)
        if state is None:
            raise ConfigError("convert() needs a model that apply() has prepared; call apply(model) first")
        if state.phase == "converted":
            return model
        fakes = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
        for name, fake in tqdm(fakes, desc="convert to int8", unit="linear", disable=None):
            model.set_submodule(
                name, carry_rotation(fake, cell_class(fake.scheme, fake.weight.device).from_fake_quant(fake))
            )
        state.phase = "converted"
        return model


class BlockSteps:
    """What calibration does to each block, shared by the sequential engine and block PTQ.

    `attach` hooks the observers a block needs; `finish` (after the block ran on every calibration
    batch) smooths it, fake-quantizes its linears by RTN and stores its kv-cache scales; `done` is
    called when the engine has no more use for the block.

    With a `loader` (out-of-core calibration, see `quantmint.algorithms.streaming.BlockLoader`), `attach`
    first
    reads the block's float weights from the checkpoint and `done` converts the block, stores its
    tensors and gives its memory back.
    """

    loader: Any = None
    work_dir: str | os.PathLike[str] | None = None  # block PTQ's resume directory (see `PTQ.apply`)

    def __init__(
        self,
        ptq: PTQ,
        model: nn.Module,
        layout: ModelLayout,
        targets: dict[str, nn.Module],
        state: QuantState,
    ) -> None:
        self.ptq = ptq
        self.model = model
        self.layout = layout
        self.targets = targets
        self.state = state
        self.family = layout.family
        self.head_dim = _head_dim(model)
        rounding = ptq.rounding
        self.percentile = None if rounding is None else rounding.input_percentile
        # Whether the observers keep each token's range (a rounding that does not say may read them)
        self.token_ranges = rounding is not None and getattr(rounding, "reads_token_ranges", True)
        self.kv_modules = {block.name: name for name, block in ptq.kv_attention_modules(layout).items()}
        self.alphas: list[float] = []  # a fixed alpha, per block
        self.pair_alphas: dict[str, float] = {}  # the searched alpha of each smoothing pair, by `prev`'s name
        self.extra: dict[str, Any] = {}
        # Whether the float pass runs the rotated linears rotated: only when a step reads their inputs
        # (`AlgorithmBase.reads_rotated_inputs`); otherwise `finish` rotates them before rounding.
        self.rotate_early = any(
            getattr(algorithm, "reads_rotated_inputs", lambda _config: True)(step)
            for step, algorithm in ptq.algorithms
        )
        # Whether a block gives the same output on the first samples of a batch as on the whole batch
        # (checked once by the alpha search before it runs fewer samples; None: not checked yet).
        self.cut_calls_ok: bool | None = None
        # The ranks calibrating together (data-parallel calibration under torchrun; else one process).
        self.world = current_world()

    def attach(self, block: BlockLayout) -> BlockContext:
        if self.loader is not None:
            self.loader.load(block)
        if self.rotate_early:
            self.rotate(block)
        # Observe every family linear of the block: smoothing needs them even when one is ignored.
        observers, handles = attach_input_observers(block.linears, self.percentile, self.token_ranges)
        ctx = BlockContext(self, block, observers, handles=list(handles))
        for step, algorithm in self.ptq.algorithms:
            algorithm.before_block(step, ctx)
        return ctx

    def finish(
        self,
        block: BlockLayout,
        ctx: BlockContext,
        calls: list[BlockCall],
        outputs: list[torch.Tensor],
        observed: int | None = None,
    ) -> bool:
        """`observed`: how many calls the observers saw when `calls` holds fewer (block PTQ passes only
        what the steps read)."""
        # Every hook goes before anything runs the block again (the alpha search runs copies of it).
        for handle in ctx.handles:
            handle.remove()
        if self.world.distributed:  # every rank's statistics combined before anything is chosen
            seen = len(calls) if observed is None else observed
            for observer in ctx.observers.values():
                observer.reduce(self.world, seen)
            for handle in ctx.handles:
                if callable(getattr(handle, "reduce", None)):
                    handle.reduce(self.world, seen)
        ctx.calls, ctx.outputs = calls, outputs
        observers = ctx.observers
        self.rotate(block)  # (done already when `rotate_early`)
        for step, algorithm in self.ptq.algorithms:
            algorithm.before_round(step, ctx)
        ctx.prev_scales = self.round_block(block, observers, ctx.smoothing)
        for name in block.linears:
            if name in self.targets:
                self.state.modules[name] = self.model.get_submodule(name).scheme
        for step, algorithm in self.ptq.algorithms:
            algorithm.after_round(step, ctx)
        return False

    def round_block(
        self, block: BlockLayout, observers: dict[str, InputObserver], smoothing: Any = None
    ) -> dict[str, torch.Tensor]:
        """Apply `smoothing` (see `BlockContext.smoothing`) and round the targets of `block` in place by
        the recipe's rounding; returns the scales folded into `prev` outputs."""
        return self.ptq._transform_block(block, self.family, observers, self.targets, smoothing)

    def rotate(self, block: BlockLayout) -> None:
        """Fold the rotation into the block's chosen linears (`PTQ.rotate_if_chosen`; idempotent)."""
        for name, module in block.linears.items():
            self.ptq.rotate_if_chosen(name, module, self.family)

    def run_without_data(self, block: BlockLayout) -> None:
        """A recipe that measures nothing: the per-block steps with no observers and no calls."""
        self.rotate(block)
        self.finish(block, BlockContext(self, block, {}), [], [])

    @property
    def calibration_calls(self) -> int | None:
        """How many of a block's calibration calls the recipe's `before_round` steps read (None: all)."""
        wanted = [alg.calibration_calls(step) for step, alg in self.ptq.algorithms]
        return None if None in wanted else max(wanted, default=0)

    def done(self, block: BlockLayout) -> None:
        if self.loader is not None:
            self.loader.release(block)

    def result(self, report: CalibrationReport) -> dict[str, Any]:
        result: dict[str, Any] = {
            "samples": report.samples,
            "tokens": report.tokens,
            "seconds": report.seconds,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if self.world.distributed:  # samples and tokens above are the whole set's, shared by the ranks
            result["ranks"] = self.world.size
        if self.alphas:
            result["smooth_alpha_per_block"] = self.alphas
        if self.pair_alphas:
            result["smooth_alpha_per_pair"] = self.pair_alphas
        kept = sorted(n for n, scheme in self.state.modules.items() if scheme != self.ptq.scheme)
        if kept:
            result["kept_w8a16"] = kept
        result.update(self.extra)
        return result


def cell_class(scheme: str, device: str | torch.device | None = None) -> type[QuantizedLinear]:
    """The quantized-layer class for `scheme` on `device` (None: torch's default device), from the runtime
    that serves both (`registry.cell_class`: by capability and priority)."""
    return registry.cell_class(scheme, device)


def quantize(
    model: nn.Module,
    config: PTQConfig | str | dict[str, Any] = "w8a16",
    family: str | None = None,
    calibration: list[torch.Tensor] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    recipe: list[AlgorithmConfig] | None = None,
) -> nn.Module:
    """Quantize a float model in place and return it with real int8 layers (apply, then convert).

    Args:
        model: a float transformers model that a registered model family handles.
        config: a `PTQConfig`, a preset name (`w8a16`, ...) or a mapping of config keys.
        family: force a model family by name instead of matching the model's class.
        calibration: token samples for configs that calibrate (SmoothQuant, static activations,
            block PTQ).
        work_dir: block PTQ's resume directory (see `PTQ.apply`).
        recipe: the algorithm steps to run instead of `config.recipe()` (see `PTQ`).
    """
    ptq = PTQ(as_config(config).with_updates(mode="quantize"), family=family, recipe=recipe)
    ptq.apply(model, calibration=calibration, work_dir=work_dir)
    return ptq.convert(model)


def _head_dim(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    return head_dim or (hidden // heads if hidden and heads else None)
