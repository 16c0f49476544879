"""End-to-end on the real example models (marked slow: CI runs them; skip locally with -m 'not slow')."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantmint import load_quantized, quant_state, quantize, save_quantized
from quantmint.eval import embedding_cosine, perplexity, read_documents, read_text, sentence_embeddings
from quantmint.example_models import example_model_dir
from quantmint.models import load_float_model, load_tokenizer
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow

WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "test.txt"
LEE = SHARED_DATA / "lee" / "lee.cor"


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data folder sits beside the repository)")


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return example_model_dir("smollm2")


def test_smollm2_w8a16_perplexity_and_reload(smollm2_dir: Path, tmp_path: Path) -> None:
    _need(WIKITEXT_TEST)
    text = read_text(WIKITEXT_TEST)
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_float_model(smollm2_dir)
    # 8,192 tokens keep CI short; the README quotes the 32,768-token figure from `quantmint eval`.
    float_ppl = perplexity(model, tokenizer, text, max_tokens=8192)["ppl"]
    quantize(model, "w8a16")
    assert len(quant_state(model).modules) == 30 * 7
    quant_ppl = perplexity(model, tokenizer, text, max_tokens=8192)["ppl"]
    assert quant_ppl / float_ppl - 1 <= 0.003, (float_ppl, quant_ppl)

    save_quantized(model, tmp_path / "q", tokenizer=tokenizer)
    reloaded = load_quantized(tmp_path / "q")
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_smollm2_cli_sizes(smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantmint.cli",
            "quantize",
            str(smollm2_dir),
            "--preset",
            "w8a16",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["quantized_layers"] == 210
    assert report["quantized_linear_ratio_vs_bf16"] <= 0.505
    assert (out / "tokenizer.json").exists()


def test_minilm_w8a16_embedding_cosine(tmp_path: Path) -> None:
    _need(LEE)
    path = example_model_dir("minilm")
    docs = read_documents(LEE)
    tokenizer = load_tokenizer(path)
    model = load_float_model(path)
    reference = sentence_embeddings(model, tokenizer, docs)
    quantize(model, "w8a16")
    save_quantized(model, tmp_path / "q", tokenizer=tokenizer)
    quantized = sentence_embeddings(load_quantized(tmp_path / "q"), tokenizer, docs)
    assert embedding_cosine(reference, quantized)["cosine_mean"] >= 0.999
