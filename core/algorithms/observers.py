"""Observers: forward hooks that collect the statistics calibration needs, one block at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from quantmint.algorithms.distributed import World

__all__ = ["InputObserver", "attach_input_observers"]

# torch.quantile refuses inputs above 2^24 elements; larger activations are subsampled evenly.
_QUANTILE_MAX_ELEMENTS = 1 << 24


@dataclass
class InputObserver:
    """Statistics of one linear layer's input x [..., in] over the calibration set.

    `absmax` is max |x_j| per input channel (float32 [in]): what SmoothQuant and static minmax use.
    `token_absmax` holds max_j |x_tj| of every token t seen (float32, one tensor per batch), unless
    `tokens` is False (what `token_outlier_ratio` reads; nothing else does).
    With `percentile` set, `percentiles` holds that percentile of |x| for every batch seen.
    """

    percentile: float | None = None
    tokens: bool = True
    absmax: torch.Tensor | None = None
    percentiles: list[float] = field(default_factory=list)
    token_absmax: list[torch.Tensor] = field(default_factory=list)

    def observe(self, x: torch.Tensor) -> None:
        self.add(*self.measure(x))

    def measure(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """What one batch's input x contributes: channel maxima, token maxima (None unless `tokens`)
        and the percentile."""
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if self.percentile is None:  # max |x| as max(max x, -min x): no |x| copy (as `row_absmax`)
            return _absmax(x2, 0), _absmax(x2, 1) if self.tokens else None, None
        x2 = x2.abs()
        flat = x2.flatten()
        if flat.numel() > _QUANTILE_MAX_ELEMENTS:
            flat = flat[:: flat.numel() // _QUANTILE_MAX_ELEMENTS + 1]
        percentile = float(torch.quantile(flat, self.percentile / 100.0))
        return x2.amax(dim=0), x2.amax(dim=1) if self.tokens else None, percentile

    def add(self, amax: torch.Tensor, token_amax: torch.Tensor | None, percentile: float | None) -> None:
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if token_amax is not None:
            self.token_absmax.append(token_amax)
        if percentile is not None:
            self.percentiles.append(percentile)

    def reduce(self, world: World, calls: int) -> None:
        """Combine what every rank observed on its `calls` calibration batches (data-parallel
        calibration, see `quantmint.algorithms.distributed`): the channel maxima exactly, the per-batch
        lists in one-process order."""
        if not world.distributed:
            return
        from quantmint.algorithms.distributed import interleave, max_of

        parts = world.gather((calls, self.absmax, self.token_absmax, self.percentiles))
        self.absmax = max_of([absmax for _, absmax, _, _ in parts])
        self.token_absmax = interleave([(n, tokens) for n, _, tokens, _ in parts])
        self.percentiles = interleave([(n, percentiles) for n, _, _, percentiles in parts])

    def token_outlier_ratio(self) -> float:
        """max over tokens of max_j |x_tj|, over its median: how far one token's range stands out.

        Per-token int8 gives such a token one scale for all its channels, so a ratio in the thousands
        (an attention-sink token with a massive activation) rounds its other channels to zero.
        """
        assert self.tokens, "this observer keeps no token ranges (tokens=False)"
        assert self.token_absmax, "observer saw no data"
        tokens = torch.cat(self.token_absmax)
        median = float(tokens.median())
        return float(tokens.max()) / median if median > 0 else float("inf")

    def tensor_range(self, divisor: torch.Tensor | None = None) -> float:
        """The per-tensor range for a static scale: max |x| (or the mean batch percentile).

        `divisor` [in] is a smoothing scale already folded into the weights (x becomes x / s); the
        percentile is then rescaled by the ratio of the smoothed to the raw absmax.
        """
        assert self.absmax is not None, "observer saw no data"
        raw = float(self.absmax.max())
        smoothed = raw if divisor is None else float((self.absmax / divisor).max())
        if self.percentile is None or not self.percentiles:
            return smoothed
        return sum(self.percentiles) / len(self.percentiles) * (smoothed / raw if raw > 0 else 1.0)


def _absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max |x| along `dim`, equal to `x.abs().amax(dim)` (NaN, inf and +0.0 alike)."""
    return torch.maximum(x.amax(dim=dim), x.amin(dim=dim).neg_()).abs_()


def attach_input_observers(
    modules: dict[str, nn.Module], percentile: float | None = None, tokens: bool = True
) -> tuple[dict[str, InputObserver], list[RemovableHandle]]:
    """Hook an `InputObserver` on the input of every module (`tokens`: whether they keep token ranges);
    remove the handles when done.

    Linears that read one tensor (a block's q/k/v, gate/up) are measured once per call: the last input
    seen and what it gave are kept, and a module handed that same tensor object next reuses them."""
    observers: dict[str, InputObserver] = {}
    handles = []
    last: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None, float | None]]] = []

    def hook(observer: InputObserver, x: torch.Tensor) -> None:
        if last and last[0][0] is x:
            observer.add(*last[0][1])
            return
        measured = observer.measure(x)
        last[:] = [(x, measured)]
        observer.add(*measured)

    for name, module in modules.items():
        observer = InputObserver(percentile=percentile, tokens=tokens)
        observers[name] = observer
        handles.append(module.register_forward_pre_hook(lambda _m, args, obs=observer: hook(obs, args[0])))
    return observers, handles
