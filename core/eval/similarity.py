"""Document similarity against human ratings (Lee et al. 2005), with Pearson and Spearman in torch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantmint.errors import QuantmintError

__all__ = ["lee_correlation", "read_similarity_matrix", "pearson", "spearman", "average_ranks"]

LEE_DOCUMENTS = "lee.cor"
LEE_RATINGS = "similarities0-1.txt"


# ---------------------------------------------------------------- correlation primitives


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.as_tensor(x).flatten().double(), torch.as_tensor(y).flatten().double()
    if x.numel() != y.numel():
        raise QuantmintError(f"correlation needs two equally long vectors, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        raise QuantmintError(f"correlation needs at least 2 values, got {x.numel()}")
    return x, y


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's r of two vectors of equal length (any float dtype; computed in float64).

    NaN when either vector is constant, as scipy returns.
    """
    x, y = _check_pair(x, y)
    x, y = x - x.mean(), y - y.mean()
    denominator = x.norm() * y.norm()
    if denominator == 0:
        return float("nan")
    return float((x @ y / denominator).clamp(-1.0, 1.0))


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing their mean rank: float64 [len(x)].

    Equals `scipy.stats.rankdata(x, method="average")`: `[10, 20, 20, 5]` gives `[2, 3.5, 3.5, 1]`.
    """
    x = torch.as_tensor(x).flatten()
    values, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # a group of equal values holds ranks ends - counts + 1 .. ends
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties share their mean rank, as scipy does)."""
    x, y = _check_pair(x, y)
    return pearson(average_ranks(x), average_ranks(y))


# ---------------------------------------------------------------- the Lee corpus


def read_similarity_matrix(path: str | Path) -> torch.Tensor:
    """A square whitespace-separated matrix of numbers (the Lee ratings): float64 [n, n]."""
    path = Path(path)
    if not path.is_file():
        raise QuantmintError(f"similarity matrix {path} does not exist")
    rows = [line.split() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
    try:
        matrix = [[float(v) for v in row] for row in rows]
    except ValueError as exc:
        raise QuantmintError(f"{path} holds a value that is not a number: {exc}") from None
    widths = {len(row) for row in matrix}
    if not matrix or widths != {len(matrix)}:
        raise QuantmintError(
            f"{path} must be a square matrix, one row per line; it has {len(matrix)} rows of "
            f"{sorted(widths)} values"
        )
    return torch.tensor(matrix, dtype=torch.float64)


@torch.no_grad()
def lee_correlation(
    model: nn.Module, tokenizer: Any, lee_dir: str | Path, batch_size: int = 16
) -> dict[str, Any]:
    """Correlation of an encoder's document similarities with the Lee human ratings.

    `lee_dir` holds `lee.cor` (50 documents, one per line, Latin-1) and `similarities0-1.txt` (50×50
    ratings, tab-separated; the upper triangle holds them). The documents are embedded with
    `sentence_embeddings` (mean pooling, L2-normalised), every pair's cosine is compared with its rating
    over the strict upper triangle (1,225 pairs for 50 documents).

    Returns a dict: `pearson`, `spearman`, `pairs`, `documents`, `seconds`.
    """
    from quantmint.eval.embeddings import read_documents, sentence_embeddings

    lee_dir = Path(lee_dir)
    if not lee_dir.is_dir():
        raise QuantmintError(
            f"Lee directory {lee_dir} does not exist: pass the folder with {LEE_DOCUMENTS} and {LEE_RATINGS}"
        )
    docs = read_documents(lee_dir / LEE_DOCUMENTS)
    ratings = read_similarity_matrix(lee_dir / LEE_RATINGS)
    if ratings.shape[0] != len(docs):
        raise QuantmintError(
            f"{lee_dir / LEE_RATINGS} is {ratings.shape[0]}×{ratings.shape[1]} but {lee_dir / LEE_DOCUMENTS} "
            f"holds {len(docs)} documents: the matrix needs one row and column per document"
        )
    start = time.perf_counter()
    embeddings = sentence_embeddings(model, tokenizer, docs, batch_size=batch_size).double()
    cosines = embeddings @ embeddings.T  # the embeddings are unit vectors
    i, j = torch.triu_indices(len(docs), len(docs), offset=1)
    model_scores, human_scores = cosines[i, j], ratings[i, j]
    return {
        "pearson": pearson(model_scores, human_scores),
        "spearman": spearman(model_scores, human_scores),
        "pairs": int(i.numel()),
        "documents": len(docs),
        "seconds": round(time.perf_counter() - start, 2),
    }
