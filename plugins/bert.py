"""BERT encoders (BertModel and the BERT task heads, e.g. all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections.abc import Callable

from quantmint.family import KVProjections, ModelFamily, SmoothPair
from quantmint.hookspecs import hookimpl

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
    # BERT is post-norm: each block's inputs come from the previous block's last LayerNorm, so the
    # norm→linear pairs inside a block start at the attention output's LayerNorm.
    smooth_pairs=(
        SmoothPair("attention.self.value", ("attention.output.dense",)),
        SmoothPair("attention.output.LayerNorm", ("intermediate.dense",)),
    ),
    kv=KVProjections(key="attention.self.key", value="attention.self.value"),
)


@hookimpl
def register_model_families(register: Callable[[ModelFamily], None]) -> None:
    register(BERT)
