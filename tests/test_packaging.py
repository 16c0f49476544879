"""The built wheel imports correctly on its own (installed with --no-deps into a temp target)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("quantmint-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import quantmint, quantmint.plugins.llama, quantmint.backends.torch\n"
        "from quantmint import registry\n"
        f"assert quantmint.__file__.startswith({str(target)!r}), quantmint.__file__\n"
        "print(sorted(registry.model_families()), sorted(registry.cell_classes()))\n"
        "from quantmint import native\n"
        "assert (native._SOURCES / 'rtn.c').is_file(), 'the wheel lacks the native kernel sources'\n"
        "from quantmint.backends.torch import int8_weight_only\n"
        "assert int8_weight_only.WOQ_SOURCE.is_file(), 'the wheel lacks the torch runtime kernel source'\n"
    )
    # Run from an empty directory so that the source tree is not importable.
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "['bert', 'gpt2', 'llama'] ['w4a16', 'w4a8', 'w8a16', 'w8a8']" in result.stdout
