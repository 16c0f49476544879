"""Sentence embeddings of encoder models (BERT family), and how close a quantized model's are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantmint.errors import QuantmintError

__all__ = ["embedding_cosine", "read_documents", "sentence_embeddings"]


def read_documents(path: str | Path) -> list[str]:
    """One document per non-empty line. UTF-8, else Latin-1 (the Lee corpus is Latin-1)."""
    path = Path(path)
    if not path.is_file():
        raise QuantmintError(f"documents file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    if not docs:
        raise QuantmintError(f"{path} holds no documents (one per line expected)")
    return docs


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 16, max_length: int = 256
) -> torch.Tensor:
    """Mean-pooled last hidden states over real tokens, L2-normalised: [len(texts), hidden] float32.

    This is sentence-transformers' pooling for all-MiniLM-L6-v2 (mean, then normalise).
    """
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Per-document cosine between two embedding matrices [n, hidden]: mean and min."""
    cos = nn.functional.cosine_similarity(reference.float(), other.float(), dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "documents": len(cos)}
