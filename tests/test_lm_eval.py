"""lm-evaluation-harness on quantmint checkpoints through `python -m quantmint.lm_eval`, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import quantmint
from quantmint.lm_eval import main
from quantmint.lm_eval.tasks.quantmint_data import wikitext_documents
from tests.conftest import SHARED_DATA, build_tiny, byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install -c constraints.txt -e '.[lm-eval]'; CI gets it from dev)",
)

WIKITEXT = (
    " \n = Alpha Beta = \n \n Alpha Beta is a small test article , with 2 @,@ 000 words . \n \n"
    " = = Section = = \n \n It has a section heading too . \n \n"
    " = Gamma = \n \n Gamma is the second article . \n"
)
BOOLQ = [
    {"question": "is alpha a letter", "passage": "Alpha -- Alpha is a letter.", "idx": 0, "label": "true"},
    {"question": "is gamma a number", "passage": "Gamma -- Gamma is a letter.", "idx": 1, "label": "false"},
    {"question": "does beta come second", "passage": "Beta -- Beta is second.", "idx": 2, "label": "true"},
]


@pytest.fixture(scope="module")
def w8a16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama quantized to W8A16 and saved as a quantmint checkpoint with the byte tokenizer."""
    out = tmp_path_factory.mktemp("lm-eval") / "tiny-w8a16"
    quantmint.save_quantized(
        quantmint.quantize(build_tiny("llama"), "w8a16"), out, tokenizer=byte_tokenizer()
    )
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data folder laid out as shared/data (wikitext-2/test.txt, boolq/val.jsonl)."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "test.txt").write_text(WIKITEXT, encoding="utf-8")
    (root / "boolq").mkdir()
    (root / "boolq" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in BOOLQ), encoding="utf-8")
    squad = {
        "version": "1.1",
        "data": [
            {
                "title": "Alpha",
                "paragraphs": [
                    {
                        "context": "Alpha is the first letter of the Greek alphabet.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "What is alpha?",
                                "answers": [{"answer_start": 9, "text": "the first letter"}],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (root / "squad").mkdir()
    (root / "squad" / "dev-v1.1.json").write_text(json.dumps(squad), encoding="utf-8")
    return root


def offline_env() -> dict[str, str]:
    """The network switched off for Hugging Face, and any other HTTP(S) request sent to a closed port."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")),
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--model_args", "pretrained=ckpt,trust_remote_code=True"],
        ["--model_args", "pretrained=ckpt", "trust_remote_code=1"],
        ["--trust_remote_code", "--model_args", "pretrained=ckpt"],
    ],
)
def test_trust_remote_code_is_refused_in_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", "hf", *argv, "--tasks", "quantmint_boolq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trust_remote_code" in err and "never runs code" in err


def test_missing_data_dir_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--data-dir", str(tmp_path / "absent"), "--tasks", "quantmint_boolq"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_wikitext_documents_split_on_top_level_headings() -> None:
    pages = wikitext_documents(WIKITEXT)
    assert [p.strip().splitlines()[0].strip() for p in pages] == ["= Alpha Beta =", "= Gamma ="]
    assert "= = Section = =" in pages[0]
    test_txt = SHARED_DATA / "wikitext-2" / "test.txt"
    if test_txt.is_file():  # the published article count of WikiText-2 test (shared/data/README.md)
        assert len(wikitext_documents(test_txt.read_text(encoding="utf-8"))) == 62


def run_lm_eval(data_dir: Path, cwd: Path, args: list[str], timeout: int) -> dict[str, Any]:
    """`python -m quantmint.lm_eval --data-dir DATA ARGS --output_path cwd/results` offline; its results."""
    out = cwd / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantmint.lm_eval",
            "--data-dir",
            str(data_dir),
            *args,
            "--output_path",
            str(out),
        ],
        cwd=cwd,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    return json.loads(results_file.read_text())["results"]


@needs_lm_eval
def test_lm_eval_runs_offline_on_a_quantmint_checkpoint(
    w8a16_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    results = run_lm_eval(
        data_dir,
        tmp_path,
        [
            *("--model", "hf", "--model_args", f"pretrained={w8a16_dir},dtype=float32", "--device", "cpu"),
            *("--tasks", "quantmint_wikitext2,quantmint_boolq,quantmint_squad", "--limit", "2"),
        ],
        timeout=300,
    )
    wikitext = results["quantmint_wikitext2"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert wikitext[f"{metric},none"] > 0
    # a random tiny model over 256 bytes: close to uniform, far from a garbage load's overflowing scores
    assert 1.0 < wikitext["byte_perplexity,none"] < 1000.0
    assert 0.0 <= results["quantmint_boolq"]["acc,none"] <= 1.0
    assert {"exact_match,none", "f1,none"} <= results["quantmint_squad"].keys()


@needs_lm_eval
def test_hf_backend_scores_the_int8_model(w8a16_dir: Path) -> None:
    """lm-eval's log-likelihood of a text equals quantmint's runtime's on the same tokens."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(w8a16_dir), dtype="float32", device="cpu", batch_size=1)
    kinds = {type(m).__name__ for m in lm.model.modules()}
    assert any("Int8" in k for k in kinds), kinds  # int8 layers, not int8 codes loaded as float weights

    text = "The quick brown fox jumps over the lazy dog."
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (lm_eval_ll,) = lm.loglikelihood_rolling([request])

    model = quantmint.load_quantized(w8a16_dir)
    # lm-eval's rolling window: the whole text after one prefix token (the tokenizer's EOS here)
    ids = [lm.prefix_token_id, *byte_tokenizer()(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    ours = float(logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    assert lm_eval_ll == pytest.approx(ours, rel=1e-5, abs=1e-4)

    float_model = build_tiny("llama")
    with torch.no_grad():
        float_lp = float_model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    float_ll = float(float_lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    assert lm_eval_ll != float_ll  # the int8 weights, not the float ones they came from


@needs_lm_eval
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_runs_offline_on_a_quantmint_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    """lm-eval's vllm backend loads the checkpoint through quantmint's vLLM plugin (~1 min on 2 cores)."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("QUANTMINT_REQUIRE_VLLM") == "1":  # CI: a missing vLLM fails, as in test_vllm.py
            pytest.fail("vLLM is not installed but QUANTMINT_REQUIRE_VLLM=1: pip install 'quantmint[vllm]'")
        pytest.skip("vLLM is not installed: pip install 'quantmint[vllm]'")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(  # head size 64: a shape vLLM's CPU attention accepts
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = quantmint.quantize(transformers.LlamaForCausalLM(config).eval(), "w8a16")
    ckpt = tmp_path / "tiny-w8a16"
    quantmint.save_quantized(model, ckpt, tokenizer=byte_tokenizer())
    model_args = f"pretrained={ckpt},dtype=float32,max_model_len=256,enforce_eager=True"
    results = run_lm_eval(
        data_dir,
        tmp_path,
        [
            *("--model", "vllm", "--model_args", model_args),
            *("--tasks", "quantmint_wikitext2,quantmint_boolq", "--limit", "2"),
        ],
        timeout=600,
    )
    assert 1.0 < results["quantmint_wikitext2"]["byte_perplexity,none"] < 1000.0
    assert 0.0 <= results["quantmint_boolq"]["acc,none"] <= 1.0
