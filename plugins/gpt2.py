"""GPT2 (GPT2LMHeadModel, GPT2Model). Its linears are transformers' `Conv1D`, which stores the weight
as [in, out]; the adapter below presents it as [out, in] so the core never sees the difference."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantmint.extension.family import KVProjections, LinearAdapter, ModelFamily, ServingNeeds, SmoothPair
from quantmint.extension.hookspecs import hookimpl


class Conv1DAdapter(LinearAdapter):
    """`Conv1D` computes x @ weight + bias with weight [in, out]: its transpose is the linear weight."""

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.t() if isinstance(module, Conv1D) else module.weight

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(weight.t() if isinstance(module, Conv1D) else weight)

    def is_linear(self, module: nn.Module) -> bool:
        return isinstance(module, (Conv1D, nn.Linear))


_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

GPT2 = ModelFamily(
    name="gpt2",
    architectures=(
        "GPT2LMHeadModel",
        "GPT2Model",
        "GPT2ForSequenceClassification",
        "GPT2ForTokenClassification",
    ),
    blocks="h",
    linears=_LINEARS,
    smooth_pairs=(
        SmoothPair("ln_1", ("attn.c_attn",)),
        SmoothPair("ln_2", ("mlp.c_fc",)),
    ),
    kv=KVProjections(key="attn.c_attn", value="attn.c_attn", fused=True),
    hadamard_linears=("mlp.c_proj",),
    adapter=Conv1DAdapter(),
    # Every linear is a Conv1D: GPT2's own checkpoints store [in, out], which engines transpose on load.
    serving=ServingNeeds(transposed_linears=_LINEARS),
)


@hookimpl
def register_model_families(register: Callable[[ModelFamily], None]) -> None:
    register(GPT2)
