"""A model family quantmint does not ship (EleutherAI's GPT-NeoX: Pythia, GPT-NeoX-20B), packaged as a
third party would package it.

Its layout is unlike Llama's: one fused projection `attention.query_key_value` whose output rows are
interleaved per head ([q_h | k_h | v_h] for each head h, not [q | k | v] in thirds), rotary embeddings
over only part of each head (`rotary_pct`), LayerNorms with bias and, by default, a parallel residual
(attention and MLP both read the block's input). Install it (`pip install ./examples/quantmint-gptneox`)
and quantmint finds it through its entry point; nothing in quantmint changes.
"""

from __future__ import annotations

from collections.abc import Callable

from quantmint import KVProjections, ModelFamily, SmoothPair, hookimpl

GPTNEOX = ModelFamily(
    name="gptneox",
    architectures=(
        "GPTNeoXForCausalLM",
        "GPTNeoXModel",
        "GPTNeoXForSequenceClassification",
        "GPTNeoXForTokenClassification",
        "GPTNeoXForQuestionAnswering",
    ),
    blocks="layers",  # relative to GPTNeoXModel (`gpt_neox` in every head class)
    linears=(
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ),
    # Only the two exact pairs. Each LayerNorm feeds one linear and nothing else, with or without the
    # parallel residual: `input_layernorm` only the fused q/k/v projection, `post_attention_layernorm`
    # only the MLP's up projection (in the parallel residual it reads the block input, not the attention
    # output, but it is still that norm's only consumer). Not declared: `attention.query_key_value` ->
    # `attention.dense` (v feeds dense through the attention softmax weights per head, but q and k share
    # the fused rows, so a per-column scale of v cannot be folded into dense alone) and
    # `mlp.dense_h_to_4h` -> `mlp.dense_4h_to_h` (across GELU).
    smooth_pairs=(
        SmoothPair("input_layernorm", ("attention.query_key_value",)),
        SmoothPair("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
    # Keys and values both come out of the fused projection; `attention` is the module that caches them.
    kv=KVProjections(key="attention.query_key_value", value="attention.query_key_value", fused=True),
    hadamard_linears=("mlp.dense_4h_to_h",),  # after GELU: algorithm_args.hadamard rotates its input
)


@hookimpl
def register_model_families(register: Callable[[ModelFamily], None]) -> None:
    register(GPTNEOX)
