"""A model family quantmint does not ship (Meta's OPT), packaged as a third party would package it.

Install it (`pip install ./examples/quantmint-opt`) and quantmint finds it through its entry point;
nothing in quantmint changes.
"""

from __future__ import annotations

from collections.abc import Callable

from quantmint import KVProjections, ModelFamily, SmoothPair, hookimpl

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

OPT = ModelFamily(
    name="opt",
    architectures=("OPTForCausalLM", "OPTModel", "OPTForSequenceClassification", "OPTForQuestionAnswering"),
    blocks="decoder.layers",  # relative to OPTModel, the base model of every OPT class
    linears=(*_QKV, "self_attn.out_proj", "fc1", "fc2"),
    smooth_pairs=(
        SmoothPair("self_attn_layer_norm", _QKV),
        SmoothPair("self_attn.v_proj", ("self_attn.out_proj",)),
        SmoothPair("final_layer_norm", ("fc1",)),
    ),
    kv=KVProjections(key="self_attn.k_proj", value="self_attn.v_proj"),
    hadamard_linears=("fc2",),  # after the activation: algorithm_args.hadamard rotates its input
)


@hookimpl
def register_model_families(register: Callable[[ModelFamily], None]) -> None:
    register(OPT)
