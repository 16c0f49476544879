"""quantmint's own algorithms, registered through the same hook as a third party's (entry point
`builtin_algorithms` in pyproject.toml)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from quantmint.algorithms.base import AlgorithmBase, BlockContext, Rounding
from quantmint.algorithms.rotation import MIN_BLOCK, rotation_block
from quantmint.config import (
    AlgorithmConfig,
    BlockPTQArgs,
    HadamardConfig,
    KVCacheConfig,
    PTQConfig,
    RoundToNearestConfig,
    SmoothQuantConfig,
)
from quantmint.errors import NotSupportedError
from quantmint.extension.family import BlockLayout
from quantmint.extension.hookspecs import hookimpl

if TYPE_CHECKING:
    import argparse

    import torch
    from torch import nn

    from quantmint.algorithms.calibration import BlockCall, CalibrationReport
    from quantmint.algorithms.observers import InputObserver
    from quantmint.algorithms.ptq import BlockSteps
    from quantmint.extension.family import ModelLayout

logger = logging.getLogger(__name__)

__all__ = ["BlockPTQAlgorithm", "HadamardRotation", "KVCacheCalibration", "RTN", "SmoothQuantAlgorithm"]


def _with_algorithm_args(config: PTQConfig, option: str, **updates: Any) -> PTQConfig:
    """`config` with these `algorithm_args` changed and the others kept; ValueError names `option`."""
    try:
        return config.with_updates(algorithm_args={**config.algorithm_args.model_dump(), **updates})
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


class HadamardRotation(AlgorithmBase):
    """Rotates the inputs of the family's `hadamard_linears` in every block (applied as their blocks are
    read, see `PTQ.rotate_if_chosen`); measures nothing."""

    config_type: ClassVar[type[AlgorithmConfig]] = HadamardConfig

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument(
            "--hadamard",
            action="store_const",
            const=True,
            help="W8A8: rotate the MLP down projection's input by a Hadamard matrix, refusing a model where "
            "it cannot be (algorithm_args.hadamard: true)",
        )
        group.add_argument(
            "--no-hadamard",
            dest="hadamard",
            action="store_const",
            const=False,
            help="no Hadamard rotation, where the preset has one (algorithm_args.hadamard: false), e.g. to "
            "export to compressed-tensors",
        )

    def apply_cli_options(self, config: PTQConfig, args: argparse.Namespace) -> PTQConfig:
        if args.hadamard is None:
            return config
        option = "--hadamard" if args.hadamard else "--no-hadamard"
        return _with_algorithm_args(config, option, hadamard=args.hadamard)

    def calibration_calls(self, config: AlgorithmConfig) -> int | None:
        return 0

    def reads_rotated_inputs(self, config: AlgorithmConfig) -> bool:
        return False

    def rotated_linears(
        self, config: AlgorithmConfig, layout: ModelLayout, targets: dict[str, nn.Module]
    ) -> set[str]:
        assert isinstance(config, HadamardConfig)
        family = layout.family
        if not family.hadamard_linears:
            if config.auto:
                logger.info(
                    "hadamard: auto: model family %r declares no hadamard_linears; nothing is rotated",
                    family.name,
                )
                return set()
            raise NotSupportedError(
                f"model family {family.name!r} declares no hadamard_linears, so no input can be rotated: "
                "set algorithm_args.hadamard: false or auto (on the command line: leave out --hadamard)"
            )
        names = {f"{block.name}.{rel}" for block in layout.blocks for rel in family.hadamard_linears}
        chosen = {name for name in names if name in targets}
        rotated: set[str] = set()
        blocked: dict[int, int] = {}
        unrotated: dict[int, int] = {}
        for name in sorted(chosen):
            width = family.adapter.weight(targets[name]).shape[1]
            block = rotation_block(width)
            if block is None and config.auto:
                unrotated[width] = unrotated.get(width, 0) + 1
                continue
            if block is None:
                raise NotSupportedError(
                    f"{name} has {width} input features, a width quantmint cannot rotate (no Hadamard matrix "
                    f"of that order, nor of an order >= {MIN_BLOCK} dividing it; orders 2^k times a Paley "
                    "order q + 1 or 2(q + 1), q prime, are built): set algorithm_args.hadamard: false "
                    "or auto (on the command line: leave out --hadamard)"
                )
            if block < width:
                blocked[width] = block
            rotated.add(name)
        for width, block in sorted(blocked.items()):
            logger.info(
                "hadamard: no Hadamard matrix of order %d is built here; inputs of width %d are rotated in "
                "%d blocks of %d (I ⊗ H, still exact in float)",
                width,
                width,
                width // block,
                block,
            )
        for width, count in sorted(unrotated.items()):
            logger.info(
                "hadamard: auto: %d linear(s) with %d input features are not rotated (no Hadamard matrix, "
                "nor blocks of at least %d, of that width)",
                count,
                width,
                MIN_BLOCK,
            )
        return rotated


class SmoothQuantAlgorithm(AlgorithmBase):
    """Chooses each block's smoothing (fixed alpha, or the best of a grid) before its weights are rounded."""

    config_type: ClassVar[type[AlgorithmConfig]] = SmoothQuantConfig

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--smooth-alpha",
            type=float,
            metavar="ALPHA",
            help="SmoothQuant: this alpha for every block, no per-block search (algorithm_args.smooth_alpha, "
            "an empty smooth_alpha_grid)",
        )

    def apply_cli_options(self, config: PTQConfig, args: argparse.Namespace) -> PTQConfig:
        if args.smooth_alpha is None:
            return config
        if config.outliers_suppression != "smooth":
            raise ValueError(
                f"--smooth-alpha: this config does no SmoothQuant (outliers_suppression: "
                f"{config.outliers_suppression}); pick a W8A8 preset or drop the option"
            )
        return _with_algorithm_args(
            config, "--smooth-alpha", smooth_alpha=args.smooth_alpha, smooth_alpha_grid=[]
        )

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        return True

    def calibration_calls(self, config: AlgorithmConfig) -> int | None:
        assert isinstance(config, SmoothQuantConfig)
        if config.alpha_grid and config.search == "block":
            return config.search_batches  # the block search re-runs the block on these calls
        return 0  # the pair search reads the linears' inputs captured while the block runs (`PairInputs`)

    def reads_rotated_inputs(self, config: AlgorithmConfig) -> bool:
        return False  # a pair with a rotated linear is neither smoothed nor searched (`smoothable_pairs`)

    def before_block(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        assert isinstance(config, SmoothQuantConfig)
        if config.alpha_grid and config.search == "pair":
            ctx.handles.append(PairInputs(ctx.block, ctx.steps.family, config.search_batches))

    def before_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        from quantmint.algorithms.smooth_quant import SmoothQuant

        assert isinstance(config, SmoothQuantConfig)
        steps = ctx.steps
        if not config.alpha_grid or config.search == "block":
            alpha = config.alpha
            if config.alpha_grid:
                alpha, _ = search_alpha(
                    steps,
                    ctx.block,
                    ctx.observers,
                    ctx.calls,
                    ctx.outputs,
                    config.alpha_grid,
                    config.search_batches,
                    config.search_samples,
                    config.search_loss,
                )
            steps.alphas.append(alpha)
            ctx.smoothing = SmoothQuant(alpha, head_dim=steps.head_dim)
            return
        captured = next(h for h in ctx.handles if isinstance(h, PairInputs))
        chosen: dict[str, float] = {}
        for prev, inputs in captured.inputs.items():
            if inputs:
                alpha, errors = search_pair_alpha(
                    steps, ctx.block, ctx.observers, prev, inputs, config.alpha_grid
                )
                if errors:  # a pair that is not smoothed (rotated, unobserved) records no alpha
                    chosen[prev] = alpha
        captured.inputs.clear()
        steps.pair_alphas.update({f"{ctx.block.name}.{prev}": alpha for prev, alpha in chosen.items()})
        ctx.smoothing = SmoothQuant(config.alpha, head_dim=steps.head_dim, pair_alphas=chosen)


# Tokens of the linears' inputs per smoothing pair that the alpha search rounds and multiplies, spread
# evenly over the first `search_batches` calibration calls of the block.
SEARCH_TOKENS = 1024


class PairInputs:
    """While a block runs on its calibration calls, keeps a strided sample of the input of each
    smoothing pair's linears (at most `SEARCH_TOKENS` tokens from the first `calls` calls): what
    `search_pair_alpha` rounds. A handle of `BlockContext.handles` (`remove` drops the hooks)."""

    def __init__(self, block: BlockLayout, family: Any, calls: int, tokens: int | None = None) -> None:
        self.calls = calls
        self.per_call = -(-(tokens or SEARCH_TOKENS) // calls)
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self._hooks = []
        for pair in family.smooth_pairs:
            self.inputs[pair.prev] = []
            module = block.module.get_submodule(pair.linears[0])
            self._hooks.append(module.register_forward_pre_hook(self._hook(self.inputs[pair.prev])))

    def _hook(self, store: list[torch.Tensor]) -> Any:
        import torch

        def capture(_module: Any, args: tuple[Any, ...]) -> None:
            if len(store) >= self.calls:
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] > self.per_call:
                x = x[torch.linspace(0, x.shape[0] - 1, self.per_call).round().long()]
            store.append(x.clone())

        return capture

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def reduce(self, world: Any, calls: int) -> None:
        """Data-parallel calibration: the inputs of the first `self.calls` batches of the whole
        calibration set, in one-process order, on every rank."""
        if not world.distributed:
            return
        from quantmint.algorithms.distributed import interleave

        parts = world.gather(self.inputs)
        for prev in self.inputs:
            merged = interleave([(len(part[prev]), part[prev]) for part in parts])
            self.inputs[prev] = merged[: self.calls]


def search_alpha(
    steps: BlockSteps,
    block: BlockLayout,
    observers: dict[str, InputObserver],
    calls: list[BlockCall],
    outputs: list[torch.Tensor],
    grid: list[float],
    search_batches: int,
    search_samples: int = 0,
    loss: str = "mse",
) -> tuple[float, dict[float, float]]:
    """The smoothing alpha of `grid` whose quantized block output is closest (MSE) to the float one
    on the first `search_batches` calls (`smooth_alpha_search: block`, the presets' search): every grid
    point rounds a copy of the whole block and runs it, so the choice sees what the block's other
    operations (attention, the MLP's gate) make of each linear's error.

    `search_samples` > 0: only that many samples, the first ceil(search_samples / search_batches) of
    each of those batches, are run per grid point (the cost of the search is linear in them).

    `loss`: how a batch's rounded output is measured against the float one (`block_loss`'s kinds)."""

    from quantmint.algorithms.smooth_quant import SmoothQuant

    # The first `search_batches` batches of the calibration set; in data-parallel calibration each rank
    # runs the ones it holds and the losses are summed in one-process order on every rank.
    subset = [i for i, call in enumerate(calls) if call.index < search_batches]
    runs = [calls[i] for i in subset]
    targets = [outputs[i] for i in subset]
    if search_samples:
        rows = -(-search_samples // search_batches)
        cut = [call.head(rows) for call in runs]
        if steps.cut_calls_ok is None:  # checked once: every block is called with the same arguments
            # (by every rank, on the batches it holds, so that all ranks cut or none)
            verdicts = steps.world.gather(_cut_calls_agree(block.module, cut, targets) if cut else None)
            steps.cut_calls_ok = False not in verdicts
        if steps.cut_calls_ok:
            runs, targets = cut, [out[: c.hidden.shape[0]] for out, c in zip(targets, cut, strict=True)]
    local: dict[float, list[tuple[int, float, float]]] = {}
    for alpha in grid:
        trial = rounded_copy(steps, block, observers, SmoothQuant(alpha, steps.head_dim))
        local[alpha] = [
            (call.index, call.weight, _search_loss(call.run(trial), target, loss))
            for call, target in zip(runs, targets, strict=True)
        ]
    parts = steps.world.gather(local)
    losses = {alpha: _sum_by_batch([entry for part in parts for entry in part[alpha]]) for alpha in grid}
    return min(losses, key=losses.__getitem__), losses


def _search_loss(out: torch.Tensor, target: torch.Tensor, loss: str) -> float:
    from quantmint.algorithms.block_ptq import block_loss

    if loss == "mse":  # the bytes of the searches before the other measures (the presets' digests)
        return float((out - target).float().pow(2).mean())
    return float(block_loss(out, target, loss))


def rounded_copy(
    steps: BlockSteps, block: BlockLayout, observers: dict[str, InputObserver], smoothing: Any
) -> nn.Module:
    """A copy of `block`'s module smoothed by `smoothing` and rounded as the recipe rounds (the block is
    left as it is): what one grid point of the alpha search runs."""
    import copy

    trial = copy.deepcopy(block.module)
    layout = BlockLayout(
        index=block.index,
        name=block.name,
        module=trial,
        linears={n: trial.get_submodule(n[len(block.name) + 1 :]) for n in block.linears},
    )
    steps.round_block(layout, observers, smoothing)
    return trial


def _cut_calls_agree(module: nn.Module, cut: list[BlockCall], outputs: list[torch.Tensor]) -> bool:
    """Whether the float block on each cut call (`BlockCall.head`) gives the first rows of the whole
    call's output: a family whose block takes an argument that only looks batched (first dimension
    the batch's size by chance) would not, and its search then runs whole batches (logged)."""
    for call, out in zip(cut, outputs, strict=True):
        got = call.run(module).float()
        want = out[: got.shape[0]].float()
        # Batch-size-dependent float kernels differ by ~1e-7 of the norm; a wrong cut by far more.
        if got.shape != want.shape or float((got - want).norm()) > 1e-4 * float(want.norm()):
            logger.warning(
                "the alpha search runs whole calibration batches: this model's blocks computed something "
                "else on the first samples of a batch alone (an argument that looks batched is not)"
            )
            return False
    return True


def _sum_by_batch(entries: list[tuple[int, float, float]]) -> float:
    """The sum over batches, in batch order, of each batch's loss from its (batch index, share, loss)
    entries: one whole batch's loss as it is, shares of one batch (block PTQ's ranks) weighted."""
    by_batch: dict[int, list[tuple[float, float]]] = {}
    for index, weight, loss in entries:
        by_batch.setdefault(index, []).append((weight, loss))
    total = 0.0
    for index in sorted(by_batch):
        shares = by_batch[index]
        total += shares[0][1] if len(shares) == 1 else sum(w * loss for w, loss in shares)
    return total


def search_pair_alpha(
    steps: BlockSteps,
    block: BlockLayout,
    observers: dict[str, InputObserver],
    prev: str,
    inputs: list[torch.Tensor],
    grid: list[float],
) -> tuple[float, dict[float, float]]:
    """The alpha of `grid` that smooths the pair whose `prev` is `prev` (relative to the block) best: the
    smallest squared error, summed over the pair's linears, between their float outputs and the outputs
    of their smoothed, rounded twins (the recipe's rounding: int8 weights and activations) on `inputs`
    (the linears' float inputs as captured by `PairInputs`). Nothing in the block is changed.

    Only the pair's linears are compared: smoothing a pair changes no other linear's rounding (`prev`'s
    rows are divided by a scale, and a per-channel or per-group weight scale absorbs that), so the pairs
    of a block can be chosen one by one. Returns (alpha, {alpha: error}); a pair that `smooth_block`
    would skip (rotated, unobserved) gets the first alpha with no errors."""
    import copy

    import torch

    from quantmint.algorithms.smooth_quant import SmoothQuant, smoothable_pairs

    pair = next((p for p in smoothable_pairs(block, steps.family, observers) if p.prev == prev), None)
    if pair is None:
        return grid[0], {}
    adapter = steps.family.adapter
    names = [f"{block.name}.{rel}" for rel in pair.linears]
    linears = [block.module.get_submodule(rel) for rel in pair.linears]
    dtype = adapter.weight(linears[0]).dtype
    x = torch.cat(inputs).to(dtype)
    reference = [m(x).float() for m in linears]
    smooth = SmoothQuant(head_dim=steps.head_dim)
    errors: dict[float, float] = {}
    for alpha in grid:
        scales, _ = smooth.pair_scales(block.module, pair, adapter, observers[names[0]].absmax, alpha)
        x_in = (x.float() / scales).to(dtype)
        error = 0.0
        for name, module, ref in zip(names, linears, reference, strict=True):
            trial = copy.deepcopy(module)
            w = adapter.weight(module).detach()
            adapter.set_weight(trial, (w.float() * scales[None, :]).to(w.dtype))
            fake = steps.ptq._fake_linear(trial, steps.family, observers[name], scales, name=name)
            error += float((fake(x_in).float() - ref).pow(2).sum())
        errors[alpha] = error
    return min(errors, key=errors.__getitem__), errors


class RTN(AlgorithmBase):
    """Round to nearest: the rounding every block gets (and static int8 activation ranges)."""

    config_type: ClassVar[type[AlgorithmConfig]] = RoundToNearestConfig

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        assert isinstance(config, RoundToNearestConfig)
        act = config.activations
        return act is not None and (not act.dynamic or bool(config.w8a16_outlier_ratio))

    def calibration_calls(self, config: AlgorithmConfig) -> int | None:
        return 0

    def reads_rotated_inputs(self, config: AlgorithmConfig) -> bool:
        """Only static input scales and the outlier-token ratio read a linear's input observer."""
        return self.needs_calibration(config, [])

    def rounding(self, config: AlgorithmConfig) -> Rounding | None:
        from quantmint.algorithms.rtn import RoundToNearest

        assert isinstance(config, RoundToNearestConfig)
        return RoundToNearest(config.weights, config.activations, config.w8a16_outlier_ratio)

    def deploy(self, config: AlgorithmConfig, steps: BlockSteps, schemes: dict[str, str]) -> None:
        """Empty int8 cells for every target, each of the scheme it was saved with."""
        from quantmint.algorithms.ptq import cell_class
        from quantmint.algorithms.rotation import mark_rotated
        from quantmint.algorithms.rtn import RoundToNearest

        assert isinstance(config, RoundToNearestConfig)
        rounding = RoundToNearest(config.weights, config.activations, config.w8a16_outlier_ratio)
        adapter = steps.family.adapter
        group_size = config.weights.group_size
        for name, module in steps.targets.items():
            scheme = schemes.get(name, rounding.scheme)
            weight = adapter.weight(module)
            out_features, in_features = weight.shape
            bias = adapter.bias(module)
            cell = cell_class(scheme).empty(
                in_features,
                out_features,
                bias is not None,
                weight.dtype,
                rounding.weight_scale_shape(out_features, in_features),
                static_input=scheme.endswith("a8") and rounding.static_input,
                **({"group_size": group_size} if group_size else {}),
                **({} if config.weights.symmetric else {"zero_points": True}),
            )
            if steps.ptq.is_rotated(name):
                mark_rotated(cell)
            steps.model.set_submodule(name, cell)
            steps.state.modules[name] = scheme


class BlockPTQAlgorithm(AlgorithmBase):
    """Block-sequential PTQ: drives calibration itself, tuning each block after RTN."""

    config_type: ClassVar[type[AlgorithmConfig]] = BlockPTQArgs
    resumable: ClassVar[bool] = True

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        return True

    def calibration_calls(self, config: AlgorithmConfig) -> int | None:
        return 0

    def run(
        self, config: AlgorithmConfig, steps: BlockSteps, samples: list[torch.Tensor]
    ) -> CalibrationReport | None:
        from quantmint.algorithms.block_ptq import BlockPTQ

        assert isinstance(config, BlockPTQArgs)
        return BlockPTQ(config, steps, steps.work_dir).run(samples)


class KVCacheCalibration(AlgorithmBase):
    """Stores each attention module's static k_scale / v_scale once its block is rounded."""

    config_type: ClassVar[type[AlgorithmConfig]] = KVCacheConfig

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        return True

    def calibration_calls(self, config: AlgorithmConfig) -> int | None:
        return 0

    def reads_rotated_inputs(self, config: AlgorithmConfig) -> bool:
        return False  # the keys and values, at the attention

    def kv_cache_modules(self, config: AlgorithmConfig, layout: ModelLayout) -> dict[str, BlockLayout]:
        from quantmint.algorithms.kv_cache import attention_module_name

        kv = layout.family.kv
        if kv is None:
            raise NotSupportedError(
                f"model family {layout.family.name!r} declares no K/V projections, so its kv cache cannot be "
                "quantized; use a preset without -c8"
            )
        return {f"{block.name}.{attention_module_name(kv)}": block for block in layout.blocks}

    def deploy(self, config: AlgorithmConfig, steps: BlockSteps, schemes: dict[str, str]) -> None:
        """Empty k_scale / v_scale buffers on every attention module, sized by the kv strategy."""
        import torch

        from quantmint.algorithms.kv_cache import kv_features

        assert isinstance(config, KVCacheConfig)
        layout = steps.layout
        kv = layout.family.kv
        # Sized like the cache (kv_heads x head_dim), which is where C8 observes K/V (`kv_features`).
        features = kv_features(getattr(steps.model, "config", None))
        for name, block in self.kv_cache_modules(config, layout).items():
            if features is None:  # a config without head counts: the projection's width
                key = block.module.get_submodule(kv.key)
                features = layout.family.adapter.weight(key).shape[0] // (3 if kv.fused else 1)
            strategy = config.kvcache.strategy
            if strategy == "head" and not steps.head_dim:
                raise NotSupportedError(
                    f"{name}: the model config gives no head_dim, so kv-cache scales per 'head' cannot be "
                    "sized; use kvcache.strategy: channel"
                )
            size = {"channel": features, "tensor": 1}.get(strategy) or features // (steps.head_dim or 1)
            attn = steps.model.get_submodule(name)
            attn.register_buffer("k_scale", torch.empty(size, dtype=torch.float32))
            attn.register_buffer("v_scale", torch.empty(size, dtype=torch.float32))
            steps.state.kv_modules.append(name)

    def before_block(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        from quantmint.algorithms.kv_cache import KVObserver

        steps, block = ctx.steps, ctx.block
        if block.name in steps.kv_modules:
            ctx.kv_observer = KVObserver(block, steps.family.kv)
            ctx.handles.append(ctx.kv_observer)

    def after_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        assert isinstance(config, KVCacheConfig)
        steps, block = ctx.steps, ctx.block
        kv_observer = ctx.kv_observer
        if kv_observer is None:
            return
        v_divisor = ctx.prev_scales.get(f"{block.name}.{steps.family.kv.value}")
        k_scale, v_scale = kv_observer.scales(config.kvcache.strategy, steps.head_dim, v_divisor)
        attn = steps.model.get_submodule(steps.kv_modules[block.name])
        attn.register_buffer("k_scale", k_scale)
        attn.register_buffer("v_scale", v_scale)
        steps.state.kv_modules.append(steps.kv_modules[block.name])


@hookimpl
def register_algorithms(register: Any) -> None:
    from quantmint.algorithms.gptq import GPTQ  # it builds on RTN below: imported once this module is

    for algorithm in (
        HadamardRotation,
        SmoothQuantAlgorithm,
        RTN,
        GPTQ,
        BlockPTQAlgorithm,
        KVCacheCalibration,
    ):
        register(algorithm())
