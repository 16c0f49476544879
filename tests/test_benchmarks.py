"""Benchmarks keep running: a quick pass prints one JSON line with the promised keys (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
