"""kill -9 at seeded random points of `quantmint quantize` (in memory, `--stream`, block PTQ): the output
directory is then absent or complete (it loads and its manifest verifies), and once a rerun succeeds
no staging, lock or work directory is left beside it.

Each case kills a few runs: some after a random delay (anywhere from start-up to the end), some just as
the staging directory appears (the output being written, synced and renamed), each run with
`--overwrite`, so a kill can also land while a complete earlier output is being replaced.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantmint import load_quantized
from quantmint.config import get_preset

ENV = {**os.environ, "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def block_ptq_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A w8a8 block-PTQ config with few steps and a small calibration text."""
    path = tmp_path_factory.mktemp("kill9-inputs")
    preset = get_preset("w8a8-ptq")
    fast = {**preset.block_ptq.model_dump(), "n_outer_loops": 20, "n_batches": 2, "batch_size": 2}
    (path / "ptq.yaml").write_text(preset.with_updates(block_ptq=fast).to_yaml())
    (path / "calib.txt").write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(100))
    )
    return path / "ptq.yaml", path / "calib.txt"


def _command(model: Path, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "quantmint.tools.cli",
        "quantize",
        str(model),
        "-o",
        str(out),
        "--overwrite",
        *extra,
    ]


def _staging_appeared(parent: Path, out: Path) -> bool:
    return any(p.name.startswith(f".{out.name}.tmp-") for p in parent.iterdir())


def _run_and_kill(command: list[str], out: Path, how: str, rng: random.Random) -> int | None:
    """Start `command` and SIGKILL it (`how`: "delay" after a random time, "staging" as the staging
    directory appears); returns its exit status if it ended first, else None."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + (rng.uniform(0.3, 9.0) if how == "delay" else 120)
        while time.monotonic() < deadline and proc.poll() is None:
            if how == "staging" and _staging_appeared(out.parent, out):
                time.sleep(rng.uniform(0.0, 0.01))
                break
            time.sleep(0.001)
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    return None


def _assert_absent_or_complete(out: Path) -> None:
    if out.exists():
        load_quantized(out)  # verifies every shard's sha256 against the manifest


def _exchange_works(tmp_path: Path) -> bool:
    """Whether this filesystem swaps two directories atomically (then --overwrite never leaves the
    output absent, even for an instant)."""
    from quantmint.io.outdir import _exchange

    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return _exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def _kill_then_rerun(model: Path, tmp_path: Path, extra: list[str], plan: list[str], seed: int) -> None:
    rng = random.Random(seed)
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = parent / "q"
    command = _command(model, out, extra)
    atomic_replace = _exchange_works(tmp_path)
    for how in plan:
        existed = out.exists()
        status = _run_and_kill(command, out, how, rng)
        assert status in (None, 0), f"a run that was not killed failed with status {status}"
        _assert_absent_or_complete(out)
        if existed and atomic_replace:
            assert out.exists(), "a killed --overwrite run removed the complete output it was replacing"
    result = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    load_quantized(out)
    assert sorted(p.name for p in parent.iterdir()) == ["q"], "staging or work left after a rerun"


def test_kill9_in_memory_leaves_no_broken_output_or_orphans(tmp_path: Path, tiny_model_dir) -> None:
    _kill_then_rerun(tiny_model_dir("llama"), tmp_path, [], ["delay", "staging", "staging"], seed=1)


def test_kill9_streamed_leaves_no_broken_output_or_orphans(tmp_path: Path, tiny_model_dir) -> None:
    _kill_then_rerun(tiny_model_dir("llama"), tmp_path, ["--stream"], ["staging", "delay", "staging"], seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["in-memory", "stream"])
def test_kill9_block_ptq_leaves_no_broken_output_or_orphans(
    tmp_path: Path, tiny_model_dir, block_ptq_files, stream
) -> None:
    config, calib = block_ptq_files
    extra = ["--config", str(config), "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "32"]
    _kill_then_rerun(
        tiny_model_dir("llama"), tmp_path, [*extra, *stream], ["delay", "delay", "staging"], seed=3
    )
