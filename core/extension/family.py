"""Model families: where a model's blocks, linears, smoothing pairs and K/V projections are.

A family plugin declares its structure once, as data (`ModelFamily`); every algorithm reads the
resolved `ModelLayout` instead of keeping its own per-model tables, and every serving backend reads the
family's `ServingNeeds` (weight layout, pooling architectures, engine-side layer names) instead of keeping
tables of family names. Paths in a family are relative:
`blocks` to the model's base model (`model.base_model`, so `LlamaModel` and `LlamaForCausalLM` share
one declaration), and `linears`, `smooth_pairs` and `kv` to one block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

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
    """The modules whose outputs are the attention keys and values.

    With `fused=True`, `key` and `value` name one fused QKV projection (GPT2's `c_attn`) whose output
    is [q | k | v] in equal thirds. `rotary=True` says keys are rotated (RoPE, rotate-half layout)
    before they are cached.
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


def resolve_layout(model: nn.Module, family: ModelFamily) -> ModelLayout:
    """Find every declared block and linear of `family` in `model`.

    Raises `ModelMappingError` naming the first path the family declares that `model` does not have.
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
                    f"{block_name}.{rel} does not exist in {type(model).__name__}"
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
                    f"but {block_name}.{rel} does not exist in {type(model).__name__}"
                ) from None
        blocks.append(BlockLayout(index=index, name=block_name, module=block, linears=linears))
    return ModelLayout(family=family, blocks=blocks)


def _declared_paths(family: ModelFamily) -> list[str]:
    paths = [p.prev for p in family.smooth_pairs]
    paths += [lin for p in family.smooth_pairs for lin in p.linears]
    if family.kv is not None:
        paths += [family.kv.key, family.kv.value]
    return paths
