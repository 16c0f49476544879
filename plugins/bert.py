"""BERT encoders (BertModel and the BERT task heads, e.g. all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections.abc import Callable

from quantmint.extension.family import EngineRename, KVProjections, ModelFamily, ServingNeeds, SmoothPair
from quantmint.extension.hookspecs import hookimpl

_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")

BERT = ModelFamily(
    name="bert",
    architectures=(
        "BertModel",
        "BertForMaskedLM",
        "BertForPreTraining",
        "BertLMHeadModel",
        "BertForNextSentencePrediction",
        "BertForSequenceClassification",
        "BertForMultipleChoice",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
    ),
    blocks="encoder.layer",
    linears=(*_QKV, "attention.output.dense", "intermediate.dense", "output.dense"),
    # BERT is post-norm: every LayerNorm's output is also the residual of the next sub-layer, so
    # folding a scale into it would change the function. Only value -> attention output is exact
    # (the attention context is linear in the values).
    smooth_pairs=(SmoothPair("attention.self.value", ("attention.output.dense",)),),
    kv=KVProjections(key="attention.self.key", value="attention.self.value"),
    hadamard_linears=("output.dense",),
    serving=ServingNeeds(
        # The base model and the masked-LM head are served as embedding models, not generators.
        pooling_architectures=("BertModel", "BertForMaskedLM"),
        # vLLM 0.32's BertAttention passes its self-attention the prefix `attention.output`, so the fused
        # q/k/v layer is named `attention.output.qkv_proj` instead of `attention.self.qkv_proj`.
        engine_module_names=(
            EngineRename("vllm", r"\.attention\.output\.qkv_proj$", ".attention.self.qkv_proj"),
        ),
    ),
)


@hookimpl
def register_model_families(register: Callable[[ModelFamily], None]) -> None:
    register(BERT)
