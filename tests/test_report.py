from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantmint.tools.cli import main


def test_report_float_vs_quantized(tmp_path: Path, tiny_model_dir, capsys) -> None:
    src = tiny_model_dir("llama")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 80)
    calib = tmp_path / "calib.txt"
    calib.write_text("a calibration text with some words in it . " * 200)
    for preset in ("w8a16", "w8a8-c8"):
        assert (
            main(
                [
                    "quantize",
                    str(src),
                    "--preset",
                    preset,
                    "-o",
                    str(tmp_path / preset),
                    "--calib",
                    str(calib),
                    "--calib-samples",
                    "4",
                    "--calib-seq-len",
                    "64",
                ]
            )
            == 0
        )
    capsys.readouterr()
    code = main(
        [
            "report",
            str(src),
            str(tmp_path / "w8a16"),
            str(tmp_path / "w8a8-c8"),
            "-o",
            str(tmp_path / "report"),
            "--text",
            str(text),
            "--max-tokens",
            "1024",
            "--decode-tokens",
            "8",
            "--kv-tokens",
            "32",
            "--no-vllm",  # the runtime's figures (vLLM's: tests/test_vllm.py)
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| perplexity |" in out and "w8a8-c8" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    float_row, w8a16, w8a8c8 = report["rows"]
    assert float_row["scheme"] == "float" and w8a16["scheme"] == "w8a16" and w8a8c8["scheme"] == "w8a8-c8"
    assert w8a16["checkpoint_bytes"] < float_row["checkpoint_bytes"]
    assert abs(w8a16["ppl_delta_pct"]) < 1.0
    # C8: int8 keys and values, about a quarter of this float32 model's cache
    ratio = w8a8c8["kv_cache_bytes_32"] / float_row["kv_cache_bytes_32"]
    assert 0.25 <= ratio < 0.3
    assert all(r["decode_tokens_per_s"] > 0 for r in report["rows"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_block_ptq_mse_per_block(tmp_path: Path, tiny_model_dir, capsys) -> None:
    from quantmint.config import get_preset

    src = tiny_model_dir("llama")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 80)
    config = get_preset("w8a16-ptq")
    config = config.with_updates(block_ptq={"n_outer_loops": 20, "batch_size": 2})
    (tmp_path / "ptq.yaml").write_text(config.to_yaml())
    quantize = ["quantize", str(src), "--config", str(tmp_path / "ptq.yaml"), "-o", str(tmp_path / "ptq")]
    assert main([*quantize, "--calib", str(text), "--calib-samples", "4", "--calib-seq-len", "64"]) == 0
    capsys.readouterr()
    args = ["report", str(src), str(tmp_path / "ptq"), "-o", str(tmp_path / "report"), "--text", str(text)]
    assert main([*args, "--max-tokens", "512", "--decode-tokens", "4", "--kv-tokens", "8", "--no-vllm"]) == 0
    out = capsys.readouterr().out
    assert "Block PTQ" in out and "| block | RTN | PTQ |" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    blocks = report["rows"][1]["block_ptq"]
    assert [b["block"] for b in blocks] == [0, 1]
    assert (tmp_path / "report" / "block_mse.png").stat().st_size > 1000
