"""quantmint's own algorithms, registered through the same hook as a third party's (entry point
`builtin_algorithms` in pyproject.toml)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from quantmint.algorithms.base import AlgorithmBase, BlockContext
from quantmint.config import (
    AlgorithmConfig,
    BlockPTQArgs,
    HadamardConfig,
    KVCacheConfig,
    RoundToNearestConfig,
    SmoothQuantConfig,
)
from quantmint.errors import NotSupportedError
from quantmint.hookspecs import hookimpl
from quantmint.rotation import supports_hadamard

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantmint.algorithms.ptq import BlockSteps
    from quantmint.calibration import CalibrationReport
    from quantmint.family import ModelLayout

__all__ = ["BlockPTQAlgorithm", "HadamardRotation", "KVCacheCalibration", "RTN", "SmoothQuantAlgorithm"]


class HadamardRotation(AlgorithmBase):
    """Rotates the inputs of the family's `hadamard_linears` in every block (applied as their blocks are
    read, see `PTQ.rotate_if_chosen`); measures nothing."""

    config_type: ClassVar[type[AlgorithmConfig]] = HadamardConfig

    def rotated_linears(
        self, config: AlgorithmConfig, layout: ModelLayout, targets: dict[str, nn.Module]
    ) -> set[str]:
        family = layout.family
        if not family.hadamard_linears:
            raise NotSupportedError(
                f"model family {family.name!r} declares no hadamard_linears, so no input can be rotated: "
                "set algorithm_args.hadamard: false"
            )
        names = {f"{block.name}.{rel}" for block in layout.blocks for rel in family.hadamard_linears}
        chosen = {name for name in names if name in targets}
        for name in sorted(chosen):
            width = family.adapter.weight(targets[name]).shape[1]
            if not supports_hadamard(width):
                raise NotSupportedError(
                    f"{name} has {width} input features, an order for which quantmint builds no Hadamard "
                    "matrix (2^k and 2^k * (q + 1) for a prime q = 3 mod 4, q + 1 <= 256): set "
                    "algorithm_args.hadamard: false"
                )
        return chosen


class SmoothQuantAlgorithm(AlgorithmBase):
    """Chooses each block's smoothing (fixed alpha, or the best of a grid) before its weights are rounded."""

    config_type: ClassVar[type[AlgorithmConfig]] = SmoothQuantConfig

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        return True

    def before_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        from quantmint.algorithms.smooth_quant import SmoothQuant

        assert isinstance(config, SmoothQuantConfig)
        steps = ctx.steps
        alpha = config.alpha
        if config.alpha_grid:
            alpha, _ = steps.ptq._search_alpha(
                ctx.block,
                steps.family,
                ctx.observers,
                steps.targets,
                ctx.calls,
                ctx.outputs,
                steps.head_dim,
                config.alpha_grid,
                config.search_batches,
            )
        steps.alphas.append(alpha)
        ctx.smoothing = SmoothQuant(alpha, head_dim=steps.head_dim)


class RTN(AlgorithmBase):
    """Round to nearest: the rounding every block gets (and static int8 activation ranges)."""

    config_type: ClassVar[type[AlgorithmConfig]] = RoundToNearestConfig

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        assert isinstance(config, RoundToNearestConfig)
        act = config.activations
        return act is not None and (not act.dynamic or bool(config.w8a16_outlier_ratio))


class BlockPTQAlgorithm(AlgorithmBase):
    """Block-sequential PTQ: drives calibration itself, tuning each block after RTN."""

    config_type: ClassVar[type[AlgorithmConfig]] = BlockPTQArgs

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        return True

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

    def before_block(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        from quantmint.kv_cache import KVObserver

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
    for algorithm in (HadamardRotation, SmoothQuantAlgorithm, RTN, BlockPTQAlgorithm, KVCacheCalibration):
        register(algorithm())
