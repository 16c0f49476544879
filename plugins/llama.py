"""Llama and the families that share its module layout (Mistral, Qwen2, Qwen3).

Qwen3 adds a per-head RMSNorm to the query and key projections' outputs (`self_attn.q_norm`, `k_norm`):
they sit after the linears, so the input-norm pair still folds exactly, and the int8 KV cache stores keys
after them, as the model attends."""

from __future__ import annotations

from collections.abc import Callable

from quantmint.extension.family import KVProjections, ModelFamily, ServingNeeds, SmoothPair
from quantmint.extension.hookspecs import hookimpl

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")

LLAMA = ModelFamily(
    name="llama",
    architectures=tuple(
        f"{prefix}{suffix}"
        for prefix in ("Llama", "Mistral", "Qwen2", "Qwen3")
        for suffix in ("ForCausalLM", "Model", "ForSequenceClassification", "ForQuestionAnswering")
    ),
    blocks="layers",
    linears=(*_ATTN, "self_attn.o_proj", *_MLP_IN, "mlp.down_proj"),
    smooth_pairs=(
        SmoothPair("input_layernorm", _ATTN),
        SmoothPair("self_attn.v_proj", ("self_attn.o_proj",)),
        SmoothPair("post_attention_layernorm", _MLP_IN),
        SmoothPair("mlp.up_proj", ("mlp.down_proj",)),
    ),
    kv=KVProjections(key="self_attn.k_proj", value="self_attn.v_proj", rotary=True),
    hadamard_linears=("mlp.down_proj",),
    # nn.Linear weights [out, in], generators, and the engines' own layer names: nothing to declare.
    serving=ServingNeeds(),
)


@hookimpl
def register_model_families(register: Callable[[ModelFamily], None]) -> None:
    register(LLAMA)
