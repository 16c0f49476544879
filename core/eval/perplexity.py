"""Perplexity with a fixed windowing, so figures compare across runs and tools."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantmint.errors import QuantmintError

__all__ = ["PERPLEXITY_WINDOWING", "perplexity", "read_text", "squad_contexts_text"]

PERPLEXITY_WINDOWING = (
    "the file's text is tokenized whole without special tokens; the first max_tokens tokens are cut into "
    "independent, non-overlapping windows of seq_len tokens (a shorter tail is dropped); each window is "
    "scored from its own start, on its seq_len - 1 next-token predictions; a C8 model attends through "
    "its int8 KV cache"
)


def new_cache(model: nn.Module) -> Any:
    """An empty int8 KV cache for a C8 model, else None (the model's own float cache, if any)."""
    from quantmint.algorithms.ptq import quant_state

    state = quant_state(model)
    if state is not None and state.kv_modules:
        from quantmint.algorithms.kv_cache import Int8KVCache

        return Int8KVCache.for_model(model)
    return None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file as one string (wikitext-2's `test.txt` as shipped, lines and all). A `.json` file
    is read as SQuAD v1.1, its unique paragraph contexts joined (`squad_contexts_text`); a `.jsonl` file
    as JSON Lines documents (`"text"` per line, joined by blank lines) or, if its records are BoolQ's, as
    their unique passages joined (`quantmint.io.data.detect_kind` tells which)."""
    from quantmint.io.data import detect_kind, read_boolq, read_jsonl_texts

    path = Path(path)
    if not path.is_file():
        raise QuantmintError(f"text file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return squad_contexts_text(path)
    if suffix == ".jsonl":
        if detect_kind(path) == "jsonl":
            return "\n\n".join(read_jsonl_texts(path))
        passages = (r["passage"].strip() for r in read_boolq(path))
        return "\n\n".join(dict.fromkeys(p for p in passages if p))
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is not scored
    except UnicodeDecodeError as exc:
        raise QuantmintError(f"{path} is not UTF-8 text: {exc}") from None


def squad_contexts_text(path: str | Path) -> str:
    """A second perplexity text: the unique paragraph contexts of a SQuAD v1.1 JSON file (Wikipedia prose,
    untokenized, unlike wikitext-2), in file order, joined by blank lines. A `.json` path given to
    `read_text` is read this way."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        paragraphs = [p for article in data["data"] for p in article["paragraphs"]]
        contexts = [p["context"] for p in paragraphs]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise QuantmintError(
            f"{path} is not a SQuAD v1.1 JSON file (data/paragraphs/context): {exc}"
        ) from None
    unique = list(dict.fromkeys(c.strip() for c in contexts if c.strip()))
    if not unique:
        raise QuantmintError(f"{path} holds no paragraph context")
    return "\n\n".join(unique)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    max_tokens: int = 32768,
    seq_len: int = 512,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Causal-LM perplexity of `text` (see `PERPLEXITY_WINDOWING`).

    Returns a dict: `ppl`, `nll` (mean, nats), `tokens` (input tokens used), `scored_tokens`,
    `windows`, `seq_len`, `seconds`.
    """
    if seq_len < 2:
        raise QuantmintError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n_windows = min(len(ids), max_tokens) // seq_len
    if n_windows == 0:
        raise QuantmintError(
            f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}: use a longer text"
        )
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    model.eval()
    total_nll = 0.0
    start = time.perf_counter()
    for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", disable=None):
        batch = windows[i : i + batch_size]
        cache = new_cache(model)
        # A C8 model attends through its int8 cache, so the figure includes the kv-cache rounding.
        logits = model(input_ids=batch, past_key_values=cache, use_cache=cache is not None).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
    scored = n_windows * (seq_len - 1)
    mean_nll = total_nll / scored
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": n_windows * seq_len,
        "scored_tokens": scored,
        "windows": n_windows,
        "seq_len": seq_len,
        "seconds": round(time.perf_counter() - start, 2),
    }
