"""A toy quantmint algorithm from outside quantmint: clip each weight row to a percentile of its
magnitudes before the block is rounded, and record how much was clipped.

Use it by naming it in a config file's recipe (`quantmint quantize MODEL -o OUT --config clip.yaml
--calib FILE`, or `quantize(model, PTQConfig.load("clip.yaml"), calibration=samples)`):

    recipe:
      - {name: percentile_clip, percentile: 99.0}
      - {name: rtn, weights: {strategy: channel}}

or with its own option of `quantmint quantize`, which puts the step before the preset's recipe
(`quantmint quantize MODEL -o OUT --preset w8a16 --clip-percentile 99 --calib FILE`),
or by putting its config in a recipe from Python:

    from quantmint.algorithms.ptq import quantize
    config = quantmint.config.get_preset("w8a16")
    recipe = [PercentileClipConfig(percentile=99.0), *config.recipe()]
    quantize(model, config, calibration=samples, recipe=recipe)
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

import torch
from pydantic import Field

from quantmint.algorithms.base import AlgorithmBase, BlockContext
from quantmint.config import AlgorithmConfig, PTQConfig, RoundToNearestConfig
from quantmint.extension.hookspecs import hookimpl

__all__ = ["PercentileClip", "PercentileClipConfig"]


class PercentileClipConfig(AlgorithmConfig):
    """Clip |W| of each output row to this percentile of that row's magnitudes."""

    name: ClassVar[str] = "percentile_clip"
    percentile: float = Field(default=99.0, gt=50.0, le=100.0)

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        if not any(isinstance(step, RoundToNearestConfig) for step in recipe):
            raise ValueError("percentile_clip clips weights before they are rounded: add a weight dtype")


class PercentileClip(AlgorithmBase):
    config_type: ClassVar[type[AlgorithmConfig]] = PercentileClipConfig

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        return True  # runs per block, in the calibrated pipeline

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--clip-percentile",
            type=float,
            metavar="P",
            help="percentile_clip: clip each weight row to this percentile of its magnitudes first",
        )

    def apply_cli_options(self, config: PTQConfig, args: argparse.Namespace) -> PTQConfig:
        if args.clip_percentile is None:
            return config
        try:
            step = PercentileClipConfig(percentile=args.clip_percentile)
        except ValueError as exc:
            raise ValueError(f"--clip-percentile: {exc}") from None
        return config.with_recipe([step, *config.recipe()])

    def before_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        assert isinstance(config, PercentileClipConfig)
        steps = ctx.steps
        clipped = 0
        for name, module in ctx.block.linears.items():
            if name not in steps.targets:
                continue
            weight = steps.family.adapter.weight(module)  # [out, in]
            limit = torch.quantile(
                weight.detach().float().abs(), config.percentile / 100.0, dim=1, keepdim=True
            )
            clipped += int((weight.abs() > limit).sum())
            weight.data.copy_(torch.maximum(torch.minimum(weight, limit), -limit).to(weight.dtype))
        steps.extra.setdefault("percentile_clip", []).append({"block": ctx.block.name, "clipped": clipped})


@hookimpl
def register_algorithms(register: Any) -> None:
    register(PercentileClip())
