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
from quantmint.io.models import load_float_model, load_tokenizer
from quantmint.tools.example_models import example_model_dir
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
            "quantmint.tools.cli",
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


WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"


def test_smollm2_smoothquant_beats_plain_w8a8(smollm2_dir: Path) -> None:
    _need(WIKITEXT_VALID)
    from quantmint.io.data import calibration_samples

    tokenizer = load_tokenizer(smollm2_dir)
    text = read_text(WIKITEXT_TEST)
    calib = calibration_samples(WIKITEXT_VALID, tokenizer, n_samples=32, seq_len=512)
    results = {}
    for name, config in (
        ("plain", {"weight_dtype": "int8", "activation_dtype": "int8"}),
        ("smooth", "w8a8-c8"),
    ):
        model = load_float_model(smollm2_dir)
        if name == "plain":
            results["float"] = perplexity(model, tokenizer, text, max_tokens=4096)["ppl"]
        quantize(model, config, calibration=calib)
        results[name] = perplexity(model, tokenizer, text, max_tokens=4096)["ppl"]
    # 4,096 tokens keep CI short; the README quotes the 32,768-token figures.
    assert results["smooth"] < results["plain"], results
    assert results["smooth"] / results["float"] - 1 < 0.02, results


def test_minilm_w8a8_embeddings_and_lee(tmp_path: Path) -> None:
    _need(LEE)
    from quantmint.eval.similarity import lee_correlation
    from quantmint.io.data import calibration_samples

    path = example_model_dir("minilm")
    tokenizer = load_tokenizer(path)
    docs = read_documents(LEE)
    model = load_float_model(path)
    reference = sentence_embeddings(model, tokenizer, docs)
    float_lee = lee_correlation(model, tokenizer, LEE.parent)["pearson"]
    calib = calibration_samples(LEE.parent / "lee_background.cor", tokenizer, n_samples=32, seq_len=128)
    quantize(model, "w8a8", calibration=calib)
    quantized = sentence_embeddings(model, tokenizer, docs)
    assert embedding_cosine(reference, quantized)["cosine_mean"] >= 0.995
    assert abs(lee_correlation(model, tokenizer, LEE.parent)["pearson"] - float_lee) <= 0.005
