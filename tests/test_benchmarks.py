"""Benchmarks keep running: a quick pass prints one JSON line with the promised keys (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_int8_matmul_quick_prints_one_json_line() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "int8_matmul.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["benchmark"] == "int8_matmul"
    kernels = {row["kernel"] for row in report["results"]}
    assert "quantmint.Int8WeightOnlyLinear[fp32]" in kernels and "F.linear[fp32]" in kernels
    for row in report["results"]:
        if row["kernel"].startswith("quantmint.") and row.get("sqnr_db") is not None:
            assert row["sqnr_db"] > 35, row  # our cell computes what the math says
    assert report["best"]


def test_int8_matmul_never_ranks_a_saturating_kernel_best() -> None:
    """A kernel the saturation probe caught wrong is listed as excluded, however fast it timed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("int8_matmul", ROOT / "benchmarks" / "int8_matmul.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    saturating = module.saturating_kernels({"fast[onednn]": 0.9, "exact": 0.004, "broken": "error: no"})
    assert saturating == {"fast[onednn]", "broken"}
    row = {"layer": "8x8", "M": 1, "act": "fp32"}
    rows = [
        {**row, "kernel": "F.linear[fp32]", "kind": "float", "median_us": 10.0},
        {**row, "kernel": "fast[onednn][fp32]", "kind": "w8a8", "median_us": 1.0},
        {**row, "kernel": "exact[fp32]", "kind": "w8a8", "median_us": 5.0},
    ]
    entry = module.best_summary(rows, saturating)["8x8/M=1/fp32"]
    assert entry["w8a8"]["kernel"] == "exact[fp32]" and entry["excluded"] == ["fast[onednn][fp32]"]
    assert module.best_summary(rows)["8x8/M=1/fp32"]["w8a8"]["kernel"] == "fast[onednn][fp32]"


# --- smoothquant_vs_llmcompressor: the pure helpers and the plan, without llm-compressor or a model -----


def _sq_module() -> ModuleType:
    """The benchmark loaded from its path (benchmarks/ is not a package)."""
    import importlib.util

    path = ROOT / "benchmarks" / "smoothquant_vs_llmcompressor.py"
    spec = importlib.util.spec_from_file_location("smoothquant_vs_llmcompressor", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _sq_run(calib_s: float, ppl: float, rss: float, sha: str = "abc") -> dict[str, object]:
    return {
        "load_s": 1.0,
        "calib_s": calib_s,
        "peak_rss_mb": rss,
        "calib_peak_rss_mb": rss / 2,
        "ppl": ppl,
        "calib_sha256": sha,
        "eval_sha256": "e",
    }


def test_smoothquant_vs_llmcompressor_arguments_and_plan() -> None:
    sq = _sq_module()
    args = sq.parse_args([])
    assert (args.samples, args.seq_len, args.seed, args.eval_tokens, args.llmc_alpha) == (
        128,
        512,
        0,
        32768,
        0.8,
    )
    # The default venv follows the checkout (or $QUANTMINT_LLMC_VENV), not one machine's layout.
    expected = (
        os.environ.get("QUANTMINT_LLMC_VENV") or Path(sq.__file__).resolve().parents[2] / "venvs" / "llmc"
    )
    assert args.venv == Path(expected) and args.llmc_batch_size == 1
    for bad in (["--samples", "0"], ["--eval-tokens", "100"], ["--llmc-alpha", "1.5"]):
        with pytest.raises(SystemExit):
            sq.parse_args(bad)
    args = sq.parse_args(["--venv", "/tmp/v", "--alpha05", "--eval-tokens", "4096", "--threads", "3"])
    children = sq.plan(args, "MODEL", "IDS")
    assert [c.name for c in children] == [
        "float",
        "quantmint",
        "llmcompressor",
        "quantmint_alpha0.5",
        "llmcompressor_alpha0.5",
    ]
    assert [c.name for c in sq.plan(sq.parse_args([]), "M", "I")] == [
        "float",
        "quantmint",
        "llmcompressor",
        "quantmint_alpha0.5",
    ]
    by_name = {c.name: c for c in children}
    assert by_name["llmcompressor"].python == "/tmp/v/bin/python"
    assert by_name["quantmint"].python == sys.executable
    assert (
        by_name["llmcompressor"].spec["alpha"] == 0.8
        and by_name["llmcompressor_alpha0.5"].spec["alpha"] == 0.5
    )
    assert by_name["quantmint"].spec["alpha"] is None and by_name["quantmint_alpha0.5"].spec["alpha"] == 0.5
    assert {c.spec["calib_ids"] for c in children} == {"IDS"}  # one set of token ids for every child
    assert {(c.spec["eval_tokens"], c.spec["threads"]) for c in children} == {(4096, 3)}
    argv = by_name["llmcompressor"].argv("OUT")
    assert argv[2:4] == ["--child", "llmcompressor"] and json.loads(argv[5])["batch_size"] == 1


def test_smoothquant_vs_llmcompressor_report() -> None:
    sq = _sq_module()
    quantmint, llmc = _sq_run(100.0, 26.276, 2000.0), _sq_run(350.0, 26.333, 3000.0)
    cmp = sq.compare(26.149, quantmint, llmc)
    assert cmp["time_ratio"] == 3.5 and cmp["total_time_ratio"] == round(351 / 101, 3)
    assert cmp["rss_ratio"] == 1.5 and cmp["calib_rss_ratio"] == 1.5
    assert cmp["ppl_delta_pct"] == {"quantmint": 0.486, "llmcompressor": 0.704}
    assert cmp["ppl_quantmint_vs_llmcompressor_pct"] < 0 and cmp["goal_met"] is True
    assert sq.compare(26.149, _sq_run(200.0, 26.276, 1.0), llmc)["goal_met"] is False  # only 1.75x faster
    assert sq.compare(26.149, _sq_run(100.0, 26.4, 1.0), llmc)["goal_met"] is False  # worse perplexity
    assert sq.compare(26.149, {}, llmc)["time_ratio"] is None

    meta = {"calibration": {"sha256": "abc"}, "eval": {"max_tokens": 4096}}
    results = {
        "float": {"ppl": 26.149, "eval_sha256": "e"},
        "float_venv": {"ppl": 26.1491, "eval_sha256": "e"},
        "quantmint": quantmint,
        "llmcompressor": llmc,
        "quantmint_alpha0.5": _sq_run(50.0, 26.4, 1000.0),
    }
    report = sq.assemble(results, meta)
    assert report["benchmark"] == "smoothquant_vs_llmcompressor" and set(report["runs"]) == {
        "quantmint",
        "llmcompressor",
        "quantmint_alpha0.5",
    }
    assert report["float"]["venv_matches"] is True and report["comparison"] == cmp
    fast = report["comparison_quantmint_alpha0.5_vs_llmcompressor"]
    assert fast["time_ratio"] == 7.0 and fast["goal_met"] is False  # faster, but worse perplexity
    assert report["goal_met"] is True  # the searched run met it
    assert report["calibration"]["same_ids_in_every_child"] and report["eval"]["same_ids_in_every_child"]
    json.dumps(report)  # one JSON line
    results["llmcompressor"] = _sq_run(350.0, 26.333, 3000.0, sha="other")
    assert sq.assemble(results, meta)["calibration"]["same_ids_in_every_child"] is False


def test_smoothquant_vs_llmcompressor_scores_a_second_text(tmp_path: Path) -> None:
    sq = _sq_module()
    args = sq.parse_args([])
    assert args.second_text == str(sq.SQUAD)  # on by default: SQuAD v1.1 dev contexts
    children = sq.plan(args, "M", "I", "SECOND.txt")
    assert {c.spec["second_text"] for c in children} == {"SECOND.txt"}
    assert {c.spec["second_text"] for c in sq.plan(sq.parse_args(["--second-text", ""]), "M", "I")} == {None}
    # A SQuAD file becomes its unique contexts as one plain text, written once for every child.
    squad = tmp_path / "dev.json"
    paragraphs = [{"context": "Alpha is a letter.", "qas": []}, {"context": "Beta is too.", "qas": []}]
    squad.write_text(json.dumps({"data": [{"paragraphs": paragraphs}, {"paragraphs": paragraphs[:1]}]}))
    written = sq.write_second_text(str(squad), tmp_path / "second.txt")
    assert Path(written).read_text() == "Alpha is a letter.\n\nBeta is too."
    assert sq.write_second_text(None, tmp_path / "none.txt") is None
    from quantmint.errors import QuantmintError

    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(QuantmintError, match="not a SQuAD v1.1 JSON file"):
        sq.write_second_text(str(tmp_path / "bad.json"), tmp_path / "x.txt")

    quantmint = {**_sq_run(100.0, 26.276, 2000.0), "ppl_second": 20.9}
    llmc = {**_sq_run(350.0, 26.333, 3000.0), "ppl_second": 21.0}
    cmp = sq.compare(26.149, quantmint, llmc, float_second=20.8)
    assert cmp["ppl_second_delta_pct"] == {"quantmint": 0.481, "llmcompressor": 0.962}
    assert cmp["goal_met"] is True
    worse = sq.compare(26.149, {**quantmint, "ppl_second": 21.1}, llmc, float_second=20.8)
    assert worse["goal_met"] is False  # better on wikitext, worse on the second text
    assert "ppl_second_delta_pct" not in sq.compare(26.149, _sq_run(1.0, 1.0, 1.0), _sq_run(1.0, 1.0, 1.0))


def test_smoothquant_vs_llmcompressor_refuses_torch_and_cuda_in_the_venv() -> None:
    sq = _sq_module()

    def report(*names: str) -> dict[str, object]:
        return {"install": [{"metadata": {"name": n, "version": "1"}} for n in names]}

    assert sq.forbidden_installs(report("llmcompressor", "transformers", "nvidia-ml-py")) == []
    assert sq.forbidden_installs(report("torch", "nvidia_cublas_cu12", "triton", "datasets")) == [
        "torch==1",
        "nvidia-cublas-cu12==1",
        "triton==1",
    ]


def _dry_run_plan(script: str) -> dict:
    """The one JSON line a benchmark's --dry-run prints (8 samples, a venv that does not exist)."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--dry-run",
            "--samples",
            "8",
            "--venv",
            "/nonexistent/venv",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    plan = json.loads(lines[0])
    assert plan["dry_run"] is True and plan["calibration"]["samples"] == 8
    return plan


def test_smoothquant_vs_llmcompressor_dry_run_prints_the_plan() -> None:
    plan = _dry_run_plan("smoothquant_vs_llmcompressor.py")
    assert [c["kind"] for c in plan["children"]] == ["float", "quantmint", "llmcompressor", "quantmint"]
    assert plan["children"][2]["python"] == "/nonexistent/venv/bin/python"


def test_gptq_vs_llmcompressor_dry_run_prints_the_plan() -> None:
    plan = _dry_run_plan("gptq_vs_llmcompressor.py")
    children = {c["name"]: c for c in plan["children"]}
    assert plan["children"][0]["kind"] == "float"
    assert children["quantmint_w4a16_g128"]["spec"]["preset"] == "w4a16-gptq"
    assert children["llmcompressor_w4a16_g128"]["spec"]["scheme"] == "W4A16"
    assert children["llmcompressor_w4a16_g128"]["python"] == "/nonexistent/venv/bin/python"
    assert children["llmcompressor_w4a16_asym_g32"]["spec"]["weights"] == {
        "num_bits": 4,
        "symmetric": False,
        "group_size": 32,
    }
    # the asymmetric pairs: quantmint's GPTQ with zero points against llm-compressor's W4A16_ASYM
    assert children["quantmint_w4a16_asym_g128"]["spec"]["preset"] == "w4a16-asym-gptq"
    assert "group_size" not in children["quantmint_w4a16_asym_g128"]["spec"]
    assert children["quantmint_w4a16_asym_g32"]["spec"]["preset"] == "w4a16-asym-gptq"
    assert children["quantmint_w4a16_asym_g32"]["spec"]["group_size"] == 32
    assert children["llmcompressor_w4a16_asym_g128"]["spec"]["scheme"] == "W4A16_ASYM"
    names = list(children)
    assert names.index("quantmint_w4a16_asym_g32") + 1 == names.index("llmcompressor_w4a16_asym_g32")


# --- scale: streaming RTN vs raw I/O on a small synthetic checkpoint --------------------------------------


SCALE = [sys.executable, str(ROOT / "benchmarks" / "scale.py")]


@pytest.mark.slow
def test_scale_benchmark_prints_rtn_and_io_figures(tmp_path: Path) -> None:
    result = subprocess.run(
        [*SCALE, "rtn", "--sizes", "50MB,80MB", "--ranks", "2,1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["benchmark"] == "scale_rtn"
    small, run = report["runs"]
    assert run["input_bytes"] > 40e6 and 0 < run["output_bytes"] < run["input_bytes"]
    rtn, one = run["rtn"]
    assert rtn["exit_code"] == 0 and rtn["ranks"] == 2 and one["exit_code"] == 0 and one["ranks"] == 1
    marginal = report["marginal"]  # one worker, on the bytes 80MB has beyond 50MB
    assert marginal["sizes"] == ["50MB", "80MB"]
    assert marginal["extra_bytes"] == run["input_bytes"] - small["input_bytes"] > 20e6
    assert set(marginal) == {"sizes", "extra_bytes", "io_gbps", "rtn_gbps", "ratio_vs_io"}
    assert rtn["ratio_vs_io"] > 0 and run["io"]["seconds"] > 0
    # the fastest of two runs, each writing buffered and O_DIRECT
    assert run["io"]["seconds"] == min(t for r in run["io"]["runs"] for t in (r["buffered"], r["direct"]))
    assert rtn["peak_rss_mb"] > run["largest_tensor_bytes"] / 2**20  # the child held at least one tensor
    assert not list(tmp_path.glob("out-*")), "outputs are removed after measuring"


def _word_text(path: Path) -> Path:
    """A small text of a few words in a fixed order: calibration and perplexity for a tiny model."""
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "home"]
    path.write_text(" ".join(words[(i * 7 + i // 3) % len(words)] for i in range(1500)))
    return path


# --- block_ptq_speed: both settings on a tiny Llama, one JSON line ----------------------------------------
def test_block_ptq_speed_prints_both_settings(tmp_path: Path) -> None:
    from conftest import build_tiny, byte_tokenizer

    build_tiny("llama").save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    text = _word_text(tmp_path / "text.txt")
    new = {"n_outer_loops": 12, "early_stop": True, "eval_every": 4, "patience": 2, "holdout_batches": 1}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "block_ptq_speed.py"),
            *("--model", str(tmp_path), "--calib", str(text), "--eval-text", str(text)),
            *("--preset", "w8a8-ptq", "--hadamard", "--blocks", "1", "--first", "1", "--samples", "8"),
            *("--seq-len", "32", "--eval-tokens", "256", "--eval-seq-len", "32"),
            *("--old", json.dumps({"n_outer_loops": 12, "early_stop": False}), "--new", json.dumps(new)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["benchmark"] == "block_ptq_speed" and report["hadamard"] is True
    old, new_run = report["old"], report["new"]
    assert old["blocks_tuned"] == new_run["blocks_tuned"] == [1] and old["blocks"] == 2
    assert old["steps_per_block"] == [12] and new_run["steps_per_block"][0] <= 12
    assert old["block_ptq"]["early_stop"] is False and new_run["block_ptq"]["early_stop"] is True
    for run in (old, new_run):
        assert run["seconds"] > 0 and run["minutes_all_blocks"] >= run["minutes"] and run["ppl"] > 0
        assert run["ppl_delta_pct"] == pytest.approx(100 * (run["ppl"] / report["float_ppl"] - 1), abs=0.01)
    assert report["speedup"] == pytest.approx(old["seconds"] / new_run["seconds"], rel=0.01)


# --- distributed: one process and torchrun ranks side by side, one JSON line ------------------------------
def test_distributed_benchmark_compares_ranks_with_one_process(tiny_model_dir, tmp_path: Path) -> None:
    text = _word_text(tmp_path / "text.txt")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "distributed.py"),
            *("--model", str(tiny_model_dir("llama")), "--calib", str(text), "--samples", "16"),
            *("--seq-len", "32", "--ranks", "2", "--threads", "2", "--max-shard-size", "40KB"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["benchmark"] == "distributed" and report["ranks"] == 2
    calibrate, stream = report["calibrate"], report["stream"]
    assert calibrate["ranks"]["ranks"] == 2 and calibrate["ranks"]["threads_per_process"] == 1
    assert calibrate["one_all_threads"]["threads_per_process"] == 2
    assert calibrate["identical"] is True and stream["identical"] is True
    ratio = calibrate["one_split_threads"]["calibration_s"] / calibrate["ranks"]["calibration_s"]
    assert calibrate["scaling"] == pytest.approx(ratio, rel=0.01)
    ranks_vs_one = stream["one"]["wall_s"] / stream["ranks"]["wall_s"]
    assert stream["ranks_vs_one"] == pytest.approx(ranks_vs_one, rel=0.01)


def test_distributed_benchmark_refuses_threads_it_cannot_split() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--ranks", "2", "--threads", "3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--threads 3 is not a multiple of --ranks 2" in result.stderr
