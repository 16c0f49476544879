"""Evaluation of float and quantized models on local data files."""

from quantmint.eval.perplexity import PERPLEXITY_WINDOWING, perplexity, read_text

__all__ = ["PERPLEXITY_WINDOWING", "perplexity", "read_text"]
