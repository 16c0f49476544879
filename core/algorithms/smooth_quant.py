"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

For a smoothing pair (a norm or linear `prev` feeding `linears`), per input channel j:

    s_j = max|X_j|^α / max|W_j|^(1-α)

The linears' weight columns are multiplied by s and `prev`'s output (norm weight and bias, or linear
rows and bias) divided by s, so the float function is unchanged while the linears' input
x / s has flatter channels. Pairs are the ones the model family declares: never across a nonlinearity.
"""

from __future__ import annotations

import torch
from torch import nn

from quantmint.algorithms.observers import InputObserver
from quantmint.algorithms.rotation import is_rotated
from quantmint.errors import ModelMappingError
from quantmint.extension.family import BlockLayout, LinearAdapter, ModelFamily, SmoothPair, fold_smoothing

__all__ = ["SmoothQuant", "smoothable_pairs", "smoothing_scales"]

_EPS = 1e-5


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α) per input channel (float32 [in]), kept away from 0 and inf."""
    s = x_absmax.float().clamp_min(_EPS).pow(alpha) / w_absmax.float().clamp_min(_EPS).pow(1 - alpha)
    return s.clamp(min=_EPS, max=1 / _EPS)


def smoothable_pairs(
    block: BlockLayout, family: ModelFamily, observers: dict[str, InputObserver]
) -> list[SmoothPair]:
    """The family's pairs that `SmoothQuant.smooth_block` smooths in this block: those whose linears are
    not rotated and whose inputs were observed."""
    chosen = []
    for pair in family.smooth_pairs:
        names = [f"{block.name}.{rel}" for rel in pair.linears]
        if any(is_rotated(block.module.get_submodule(rel)) for rel in pair.linears):
            continue  # a rotated input's channels are not the channels `prev` produces
        if any(name not in observers or observers[name].absmax is None for name in names):
            continue
        chosen.append(pair)
    return chosen


class SmoothQuant:
    """The outlier-smoothing algorithm module (`outliers_suppression: smooth`).

    `alpha` smooths every pair, except the pairs named in `pair_alphas` (the pair's `prev`, relative to
    the block -> its own alpha, as the per-pair search chose it)."""

    def __init__(
        self, alpha: float = 0.5, head_dim: int | None = None, pair_alphas: dict[str, float] | None = None
    ) -> None:
        self.alpha = alpha
        self.head_dim = head_dim
        self.pair_alphas = dict(pair_alphas or {})

    def alpha_for(self, pair: SmoothPair) -> float:
        return self.pair_alphas.get(pair.prev, self.alpha)

    @torch.no_grad()
    def smooth_block(
        self, block: BlockLayout, family: ModelFamily, observers: dict[str, InputObserver]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Smooth every declared pair of one block in place.

        Args:
            observers: input statistics of the block's linears, by full module name.
        Returns:
            (inputs, outputs): the scale each smoothed linear's input was divided by (full name ->
            float32 [in]), and the scale each `prev` module's output was divided by (full name -> [out]).
        """
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        for pair in smoothable_pairs(block, family, observers):
            names = [f"{block.name}.{rel}" for rel in pair.linears]
            scales = self._smooth_pair(block.module, pair, family.adapter, observers[names[0]].absmax)
            inputs.update(dict.fromkeys(names, scales[0]))
            outputs[f"{block.name}.{pair.prev}"] = scales[1]
        return inputs, outputs

    def pair_scales(
        self, block: nn.Module, pair: SmoothPair, adapter: LinearAdapter, x_absmax: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, prev_scales) that smoothing `pair` of `block` at `alpha` would use, nothing changed:
        the linears' input is divided by `scales` [in], `prev`'s output by `prev_scales` [prev out]."""
        prev = block.get_submodule(pair.prev)
        weights = [adapter.weight(block.get_submodule(rel)).detach() for rel in pair.linears]
        w_absmax = torch.cat(weights, dim=0).abs().amax(dim=0).float()
        prev_is_linear = adapter.is_linear(prev)
        groups = 1
        if prev_is_linear:
            prev_out = adapter.weight(prev).shape[0]
            if prev_out != x_absmax.numel():
                # Grouped-query attention: each value head feeds `groups` query heads' slots of o_proj.
                if self.head_dim is None or x_absmax.numel() % prev_out or prev_out % self.head_dim:
                    raise ModelMappingError(
                        f"smoothing pair {pair.prev!r} -> {pair.linears}: {pair.prev!r} has {prev_out} "
                        f"output channels but its linears take {x_absmax.numel()} inputs (head_dim "
                        f"{self.head_dim}); fix the family's pair or remove it"
                    )
                groups = x_absmax.numel() // prev_out
        elif getattr(prev, "weight", None) is None or prev.weight.numel() != x_absmax.numel():
            raise ModelMappingError(
                f"smoothing pair {pair.prev!r} -> {pair.linears}: {pair.prev!r} is not a norm with "
                f"{x_absmax.numel()} channels (the linears' input); fix the family's pair or remove it"
            )
        if groups > 1:
            x_red = _reduce_groups(x_absmax, groups, self.head_dim)
            w_red = _reduce_groups(w_absmax, groups, self.head_dim)
            prev_scales = smoothing_scales(x_red, w_red, alpha)
            scales = _expand_groups(prev_scales, groups, self.head_dim)
        else:
            scales = prev_scales = smoothing_scales(x_absmax, w_absmax, alpha)
        return scales, prev_scales

    def _smooth_pair(
        self, block: nn.Module, pair: SmoothPair, adapter: LinearAdapter, x_absmax: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scales, prev_scales = self.pair_scales(block, pair, adapter, x_absmax, self.alpha_for(pair))
        fold_smoothing(block, pair, adapter, scales, prev_scales)
        return scales, prev_scales


def _reduce_groups(t: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """[kv_heads * groups * head_dim] (o_proj input layout) -> max over groups -> [kv_heads * head_dim]."""
    return t.reshape(-1, groups, head_dim).amax(dim=1).reshape(-1)


def _expand_groups(t: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """[kv_heads * head_dim] -> each kv head repeated for its `groups` query heads (repeat_kv's layout)."""
    kv_heads = t.numel() // head_dim
    return t.reshape(kv_heads, 1, head_dim).expand(kv_heads, groups, head_dim).reshape(-1)
