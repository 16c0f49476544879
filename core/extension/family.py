"""Model families: where a model's blocks, linears, smoothing pairs and K/V projections are.

A family plugin declares its structure once, as data (`ModelFamily`); every algorithm reads the
resolved `ModelLayout` instead of keeping its own per-model tables, and every serving backend reads the
family's `ServingNeeds` (weight layout, pooling architectures, engine-side layer names) instead of keeping
tables of family names. Paths in a family are relative:
`blocks` to the model's base model (`model.base_model`, so `LlamaModel` and `LlamaForCausalLM` share
one declaration), and `linears`, `smooth_pairs` and `kv` to one block.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantmint.errors import ModelMappingError

__all__ = [
    "BlockLayout",
    "EngineRename",
    "KVProjections",
    "LinearAdapter",
    "ModelFamily",
    "ModelLayout",
    "ServingNeeds",
    "SmoothPair",
    "check_smoothing_exact",
    "fold_smoothing",
    "resolve_layout",
]


class LinearAdapter:
    """How the core reads a linear-like module as `y = x @ weight.T + bias` with weight [out, in].

    The default handles `nn.Linear`. A family whose model stores weights differently (GPT2's
    `Conv1D` keeps [in, out]) passes its own adapter, so the core never sees the difference.
    """

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight as [out_features, in_features] (may be a view)."""
        return module.weight

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Write a new [out, in] weight back in the module's own layout, in place."""
        with torch.no_grad():
            module.weight.copy_(weight)

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return module.bias

    def is_linear(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)


@dataclass(frozen=True)
class SmoothPair:
    """Outlier smoothing folds per-input-channel scales of `linears` into `prev`.

    `prev` is the norm (LayerNorm / RMSNorm) or linear whose output feeds every module in `linears`,
    with nothing nonlinear in between; all `linears` share that one input.
    """

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class KVProjections:
    """The attention module whose keys and values C8 quantizes, named through its K/V projections.

    C8 observes K/V where the model caches them (a calibration `Cache` handed to each block; see
    `quantmint.algorithms.kv_cache`), so rotary embeddings, fused or interleaved QKV rows and grouped-query
    heads need no declaration. What is still read from here:
    - the attention module that holds `k_scale` / `v_scale`: the parent of `key` (`self_attn`);
    - for a block that caches nothing (an encoder): the K/V values themselves, at `key` and `value`;
      with `fused=True` both name one QKV projection read as [q | k | v] in equal thirds, and
      `rotary=True` bounds each key channel by its rotate-half pair's range;
    - a smoothing pair that starts at `value` divides the cached values by its scales: the cached values
      must be `value`'s outputs in order (checked during calibration, refused otherwise).
    """

    key: str
    value: str
    fused: bool = False
    rotary: bool = False


@dataclass(frozen=True)
class EngineRename:
    """A serving engine names a layer otherwise than the checkpoint does: in the engine's layer name,
    `pattern` (a regular expression) is replaced by `replacement` before the checkpoint is searched.

    `engine` is the backend it applies to (`vllm`), as each engine has its own names (and bugs).
    """

    engine: str
    pattern: str
    replacement: str


@dataclass(frozen=True)
class ServingNeeds:
    """What a serving engine needs to know about a family, beyond the checkpoint's tensors.

    Attributes:
        transposed_linears: linears (relative to a block, as in `ModelFamily.linears`) whose weight the
            model's own format stores as [in, out] (transformers' `Conv1D`). quantmint's checkpoints store
            every int8 weight as [out, in]; an engine that transposes these on load must not transpose
            quantmint's, and a format that reads them as `Linear` cannot describe them.
        pooling_architectures: architectures an engine serves as pooling (embedding) models rather than
            as generators (`BertModel`).
        engine_module_names: layer names an engine spells otherwise than the checkpoint (`EngineRename`).
    """

    transposed_linears: tuple[str, ...] = ()
    pooling_architectures: tuple[str, ...] = ()
    engine_module_names: tuple[EngineRename, ...] = ()

    def renames(self, engine: str) -> tuple[EngineRename, ...]:
        """The renames that apply to `engine`."""
        return tuple(r for r in self.engine_module_names if r.engine == engine)


@dataclass(frozen=True)
class ModelFamily:
    """The structure of one family of transformer models, declared once as data.

    Attributes:
        name: short unique name (`llama`, `gpt2`, `bert`).
        architectures: model class names handled (`LlamaForCausalLM`, `MistralModel`, ...).
        blocks: path of the `nn.ModuleList` of transformer blocks, relative to `model.base_model`.
        linears: paths of the linears to quantize, relative to one block.
        smooth_pairs: norm→linear and linear→linear pairs that outlier smoothing may use.
        kv: where the attention keys and values are produced, for kv-cache quantization.
        hadamard_linears: linears after a nonlinearity (the MLP's down projection), whose input an
            online Hadamard rotation flattens for int8 activations (`algorithm_args.hadamard`).
        default_ignore: module patterns left in float unless the user asks otherwise.
        adapter: how to read this family's linear modules (see `LinearAdapter`).
        serving: what serving engines need to know about it (see `ServingNeeds`).
    """

    name: str
    architectures: tuple[str, ...]
    blocks: str
    linears: tuple[str, ...]
    smooth_pairs: tuple[SmoothPair, ...] = ()
    kv: KVProjections | None = None
    hadamard_linears: tuple[str, ...] = ()
    default_ignore: tuple[str, ...] = ()
    adapter: LinearAdapter = field(default_factory=LinearAdapter)
    serving: ServingNeeds = field(default_factory=ServingNeeds)

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.architectures


@dataclass
class BlockLayout:
    """One transformer block of a concrete model, with full module names."""

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Module]  # full name -> module


@dataclass
class ModelLayout:
    """A family's declared structure resolved against one model instance."""

    family: ModelFamily
    blocks: list[BlockLayout]

    def linears(self) -> Iterator[tuple[str, nn.Module]]:
        """(full name, module) of every linear the family quantizes, in block order."""
        for block in self.blocks:
            yield from block.linears.items()


def _base_model_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def resolve_layout(model: nn.Module, family: ModelFamily, check_exact: bool = True) -> ModelLayout:
    """Find every declared block and linear of `family` in `model`, and check the declaration.

    Every declared path must exist in every block, every smoothing pair's shapes must match, and (with
    `check_exact`, when the model's weights are in memory) every smoothing pair must leave the first
    block's function unchanged when scales are folded into it (`check_smoothing_exact`). The model is not
    changed. Raises `ModelMappingError`, one line naming the family, what does not fit and the fix.
    """
    prefix = _join(_base_model_prefix(model), family.blocks)
    try:
        block_list = model.get_submodule(prefix)
    except AttributeError:
        raise ModelMappingError(
            f"model family {family.name!r} expects its blocks at {prefix!r}, but "
            f"{type(model).__name__} has no such module; the family plugin does not fit this model"
        ) from None
    if not isinstance(block_list, nn.ModuleList) or len(block_list) == 0:
        raise ModelMappingError(
            f"model family {family.name!r}: {prefix!r} in {type(model).__name__} is not a non-empty "
            f"ModuleList of blocks (got {type(block_list).__name__})"
        )
    blocks = []
    for index, block in enumerate(block_list):
        block_name = f"{prefix}.{index}"
        linears = {}
        for rel in family.linears:
            try:
                module = block.get_submodule(rel)
            except AttributeError:
                raise ModelMappingError(
                    f"model family {family.name!r} declares linear {rel!r} in each block, but "
                    f"{block_name}.{rel} does not exist in {type(model).__name__}; fix the path in the "
                    "family (a typo?) or remove it"
                ) from None
            if not family.adapter.is_linear(module):
                raise ModelMappingError(
                    f"model family {family.name!r}: {block_name}.{rel} is a {type(module).__name__}, "
                    "not a linear layer its adapter can read"
                )
            linears[f"{block_name}.{rel}"] = module
        for rel in _declared_paths(family):
            try:
                block.get_submodule(rel)
            except AttributeError:
                raise ModelMappingError(
                    f"model family {family.name!r} declares {rel!r} in each block (smoothing or K/V), "
                    f"but {block_name}.{rel} does not exist in {type(model).__name__}; fix the path in the "
                    "family (a typo?) or remove it"
                ) from None
        for pair in family.smooth_pairs:
            _check_pair_shapes(model, family, block, block_name, pair)
        blocks.append(BlockLayout(index=index, name=block_name, module=block, linears=linears))
    layout = ModelLayout(family=family, blocks=blocks)
    if check_exact and family.smooth_pairs:
        check_smoothing_exact(model, layout)
    return layout


def _head_dim(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    return getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)


def _pair_text(pair: SmoothPair) -> str:
    return f"SmoothPair({pair.prev!r}, {tuple(pair.linears)!r})"


def _pair_groups(
    model: nn.Module, family: ModelFamily, block: nn.Module, block_name: str, pair: SmoothPair
) -> int:
    """How many of the linears' input channels each of `prev`'s output channels feeds: 1, or the number
    of query heads per key/value head when `prev` is a value projection feeding grouped-query attention.
    Raises `ModelMappingError` when the shapes do not fit."""
    adapter = family.adapter
    prev = block.get_submodule(pair.prev)
    where = f"model family {family.name!r}: smoothing pair {_pair_text(pair)} in {block_name}"
    ins = {}
    for rel in pair.linears:
        module = block.get_submodule(rel)
        if not adapter.is_linear(module):
            raise ModelMappingError(
                f"{where}: {rel!r} is a {type(module).__name__}, not a linear layer its adapter can read; "
                "a pair's `linears` must be linears"
            )
        ins[rel] = adapter.weight(module).shape[1]
    if len(set(ins.values())) > 1:
        raise ModelMappingError(
            f"{where}: its linears take inputs of different sizes ({ins}), so they cannot share one input; "
            "list only linears fed by `prev` in one pair"
        )
    width = next(iter(ins.values()))
    if adapter.is_linear(prev):
        out = adapter.weight(prev).shape[0]
        if out == width:
            return 1
        head_dim = _head_dim(model)
        if head_dim and width % out == 0 and out % head_dim == 0:
            return width // out  # grouped-query attention: v_proj -> o_proj
        raise ModelMappingError(
            f"{where}: {pair.prev!r} has {out} output channels but its linears take {width} inputs; "
            "a pair's `prev` must produce the very input of its linears (fix the pair or remove it)"
        )
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ModelMappingError(
            f"{where}: {pair.prev!r} is a {type(prev).__name__}, neither a linear nor a norm with a "
            "per-channel weight; a pair's `prev` must be one of these"
        )
    if weight.numel() != width:
        raise ModelMappingError(
            f"{where}: norm {pair.prev!r} has {weight.numel()} channels but its linears take {width} "
            "inputs; a pair's `prev` must produce the very input of its linears (fix the pair or remove it)"
        )
    return 1


def _check_pair_shapes(
    model: nn.Module, family: ModelFamily, block: nn.Module, block_name: str, pair: SmoothPair
) -> None:
    _pair_groups(model, family, block, block_name, pair)


# (family, architecture, model config) -> checked; the check is structural, so one per model config.
_EXACT_CHECKED: set[tuple[Any, ...]] = set()
_EXACT_RTOL = 1e-7
_EXACT_TOKENS = 6


def _cache_key(model: nn.Module, family: ModelFamily) -> tuple[Any, ...] | None:
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    if to_json is None:
        return None
    try:
        return (family, type(model).__name__, to_json(use_diff=False))
    except Exception:
        return None


class _Captured(Exception):
    pass


def _to64(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(torch.float64) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to64(o) for o in obj)
    if isinstance(obj, list):
        return [_to64(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    return obj


def _first_tensor(out: Any) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out[0]
    return out


@torch.no_grad()
def _block_inputs(model: nn.Module, block: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first block's arguments for a few random tokens (the model stops at that block)."""
    captured: dict[str, Any] = {}

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, _EXACT_TOKENS), generator=torch.Generator().manual_seed(0))
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        try:
            model(input_ids=ids.to(device), use_cache=False)
        except TypeError as exc:
            if "use_cache" not in str(exc):
                raise
            model(input_ids=ids.to(device))
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise ModelMappingError(
            f"{type(model).__name__} never ran its first block on input_ids; the family's `blocks` is not "
            "the blocks the model runs"
        )
    kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("past_key_value", "past_key_values")}
    return _to64(captured["args"]), _to64(kwargs)


@torch.no_grad()
def fold_smoothing(
    block: nn.Module,
    pair: SmoothPair,
    adapter: LinearAdapter,
    scales: torch.Tensor,
    prev_scales: torch.Tensor,
) -> None:
    """Fold smoothing scales into one pair of `block`, in place: `prev`'s output channels (and bias) are
    divided by `prev_scales` [prev out] and the input columns of the pair's linears multiplied by `scales`
    [in] (`prev_scales` repeated per query head under grouped-query attention). Weights are scaled in
    float32 (float64 stays float64) and stored in their own dtype. SmoothQuant folds with this, and
    `check_smoothing_exact` checks a family's pairs with it."""
    prev = block.get_submodule(pair.prev)
    linears = [block.get_submodule(rel) for rel in pair.linears]
    if adapter.is_linear(prev):
        w = adapter.weight(prev).detach()
        adapter.set_weight(prev, (w.to(_compute_dtype(w)) / prev_scales[:, None]).to(w.dtype))
        bias = adapter.bias(prev)
    else:
        prev.weight.div_(prev_scales.to(prev.weight.dtype))
        bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.div_(prev_scales.to(bias.dtype))
    for module in linears:
        w = adapter.weight(module).detach()
        adapter.set_weight(module, (w.to(_compute_dtype(w)) * scales[None, :]).to(w.dtype))


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.promote_types(w.dtype, torch.float32)


@torch.no_grad()
def check_smoothing_exact(model: nn.Module, layout: ModelLayout) -> None:
    """Refuse a smoothing pair that changes the function of the model's first block.

    Random positive per-channel scales are folded into each pair of a float64 copy of the first block,
    which runs on a few random tokens; the output must equal the unscaled copy's within float64 rounding.
    Runs once per (family, model config); the model is not changed. Skipped (structure and shapes are
    still checked) when the weights are not in memory (meta tensors: streamed quantization).
    """
    family = layout.family
    block = layout.blocks[0].module
    params = list(block.parameters())
    if not params or any(p.is_meta for p in params) or any(p.is_meta for p in model.parameters()):
        return
    key = _cache_key(model, family)
    if key is not None and key in _EXACT_CHECKED:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tokens: threads cost more than they give
    try:
        _check_pairs(model, layout)
    finally:
        torch.set_num_threads(threads)
    if key is not None:
        _EXACT_CHECKED.add(key)


def _check_pairs(model: nn.Module, layout: ModelLayout) -> None:
    family = layout.family
    block = layout.blocks[0].module
    args, kwargs = _block_inputs(model, block)
    twin = copy.deepcopy(block).to(torch.float64).eval()
    reference = _first_tensor(twin(*args, **kwargs)).clone()
    if not bool(torch.isfinite(reference).all()):
        raise ModelMappingError(
            f"model family {family.name!r}: the first block of {type(model).__name__} gives non-finite "
            "outputs in float64 on random tokens, so its smoothing pairs cannot be checked; load the "
            "model's real weights first"
        )
    tolerance = _EXACT_RTOL * max(float(reference.abs().max()), 1e-30)
    head_dim = _head_dim(model) or 1
    gen = torch.Generator().manual_seed(1)
    for pair in family.smooth_pairs:
        groups = _pair_groups(model, family, twin, layout.blocks[0].name, pair)
        prev = twin.get_submodule(pair.prev)
        width = (
            family.adapter.weight(prev).shape[0] if family.adapter.is_linear(prev) else prev.weight.numel()
        )
        # log-uniform in [1/4, 4]: positive, far enough from 1 that a wrong pair moves the output
        scales = torch.exp((torch.rand(width, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(4))
        touched = [twin.get_submodule(rel) for rel in (pair.prev, *pair.linears)]
        saved = [(t, t.detach().clone()) for m in touched for t in m.parameters(recurse=False)]
        scales = scales.to(reference.device)
        cols = scales
        if groups > 1:  # each value head's scale repeated for the query heads that read it
            kv_heads = scales.numel() // head_dim
            cols = scales.reshape(kv_heads, 1, head_dim).expand(kv_heads, groups, head_dim).reshape(-1)
        fold_smoothing(twin, pair, family.adapter, cols, scales)
        moved = float((_first_tensor(twin(*args, **kwargs)) - reference).abs().max())
        for tensor, value in saved:
            tensor.copy_(value)
        if not moved <= tolerance:
            raise ModelMappingError(
                f"model family {family.name!r}: smoothing pair {_pair_text(pair)} is not exact in "
                f"{type(model).__name__}: folding scales into it moves the block output by {moved:.3g} "
                f"(float64 tolerance {tolerance:.3g}); `prev` must feed exactly these linears with nothing "
                "nonlinear between and no other use of its output (e.g. the right norm, not across an "
                "activation): fix the pair or remove it"
            )


def _declared_paths(family: ModelFamily) -> list[str]:
    paths = [p.prev for p in family.smooth_pairs]
    paths += [lin for p in family.smooth_pairs for lin in p.linears]
    if family.kv is not None:
        paths += [family.kv.key, family.kv.value]
    return paths
