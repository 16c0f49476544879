"""Evaluation of float and quantized models on local data files."""

from quantmint.eval.embeddings import embedding_cosine, read_documents, sentence_embeddings
from quantmint.eval.perplexity import PERPLEXITY_WINDOWING, perplexity, read_text, squad_contexts_text

__all__ = [
    "PERPLEXITY_WINDOWING",
    "embedding_cosine",
    "perplexity",
    "read_documents",
    "read_text",
    "sentence_embeddings",
    "squad_contexts_text",
]
