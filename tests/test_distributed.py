"""Data-parallel calibration on torch.distributed (`quantmint.algorithms.distributed`): N ranks started by
torchrun write the checkpoint that one process writes."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantmint.algorithms.distributed import World, interleave, max_of, samples_digest
from quantmint.formats.checkpoint import CALIBRATION_NAME

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def _env() -> dict[str, str]:
    # One thread per process on both sides: a matmul's float result may depend on the thread count.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _torchrun(ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]


def _quantize(ranks: int, model: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    args = ["-m", "quantmint", "quantize", str(model), "-o", str(out), *options]
    command = [sys.executable, *args] if ranks == 1 else _torchrun(ranks, *args)
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)


def _calibrated(preset: str) -> list[str]:
    return ["--preset", preset, "--calib", str(DATA), "--calib-samples", "16", "--calib-seq-len", "48"]


def _calibration_record(path: Path) -> dict:
    record = json.loads((path / CALIBRATION_NAME).read_text())
    for key in ("seconds", "peak_rss_mb", "ranks"):
        record.pop(key, None)
    return record


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        if name == CALIBRATION_NAME:  # timings differ; what was measured and chosen may not
            assert _calibration_record(a) == _calibration_record(b)
        else:
            assert filecmp.cmp(a / name, b / name, shallow=False), name


needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"calibration text {DATA} is not there")


@needs_data
@pytest.mark.parametrize(
    ("preset", "options"),
    [
        ("w8a8", []),  # SmoothQuant: channel maxima, the per-block alpha search's losses
        ("w8a8-c8", ["--stream"]),  # + K/V ranges, out of core
        ("w4a16-gptq", []),  # GPTQ's x^T x: a float64 sum over the ranks
    ],
)
def test_two_ranks_write_the_checkpoint_one_process_writes(
    tiny_model_dir, tmp_path: Path, preset: str, options: list[str]
) -> None:
    src = tiny_model_dir("llama")
    one = _quantize(1, src, tmp_path / "one", *_calibrated(preset), *options)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _quantize(2, src, tmp_path / "two", *_calibrated(preset), *options)
    assert two.returncode == 0, two.stderr[-2000:]
    report = json.loads(two.stdout)  # rank 0 prints the report, once
    assert report["ranks"] == 2 and report["calibration"]["ranks"] == 2
    assert report["calibration"]["samples"] == 16
    if preset != "w4a16-gptq":
        _assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
        return
    # Summed in float64 in another order: equal to 1e-15, so at most a weight on a rounding boundary moves
    # one step (none did on this machine, but it is not guaranteed).
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if a[name].dtype in (torch.int8, torch.uint8, torch.int32):
            moved = (a[name].int() - b[name].int()).abs()
            assert int(moved.max()) <= 1 and float((moved > 0).float().mean()) <= 1e-3, name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_two_ranks_share_the_shards_of_streaming_rtn(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    shards = ["--preset", "w8a16", "--stream", "--max-shard-size", "40KB"]
    one = _quantize(1, src, tmp_path / "one", *shards)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _quantize(2, src, tmp_path / "two", *shards)
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(list((tmp_path / "two").glob("*.safetensors"))) > 2
    assert json.loads(two.stdout)["ranks"] == 2
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    refused = _quantize(1, src, tmp_path / "three", *shards, "--workers", "2")  # the option torchrun replaced
    assert refused.returncode == 2 and "--workers was replaced by torchrun" in refused.stderr
    assert "torchrun --standalone --nproc-per-node N -m quantmint quantize" in refused.stderr
    assert not (tmp_path / "three").exists()


@needs_data
def test_ranks_refuse_what_they_cannot_share(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    few = _quantize(2, src, tmp_path / "few", *_calibrated("w8a8"), "--calib-samples", "4")
    assert few.returncode != 0
    assert "2 ranks share 1 calibration batch" in few.stderr and "start fewer ranks" in few.stderr
    config = tmp_path / "ptq.yaml"
    config.write_text(_block_ptq_yaml(steps=2, batch_size=1))
    tuned = _quantize(2, src, tmp_path / "tuned", *_calibrated("w8a8-ptq")[2:], "--config", str(config))
    assert tuned.returncode != 0
    assert "set block_ptq.batch_size to at least 2" in tuned.stderr
    assert not (tmp_path / "few").exists() and not (tmp_path / "tuned").exists()


def _block_ptq_yaml(steps: int, batch_size: int | None = None) -> str:
    from quantmint.config import get_preset

    config = get_preset("w8a8-ptq")
    args = {"n_outer_loops": steps, **({"batch_size": batch_size} if batch_size else {})}
    return config.with_updates(block_ptq=config.block_ptq.model_copy(update=args)).to_yaml()


@needs_data
def test_two_ranks_tune_block_ptq_as_one_process_does(tiny_model_dir, tmp_path: Path) -> None:
    """Every step takes the batch one process takes, its samples shared by the ranks and the gradients
    summed: the same tuning up to float sums (after hundreds of Adam steps those differences grow, so two
    steps are compared here, closely)."""
    src = tiny_model_dir("llama")
    config = tmp_path / "ptq.yaml"
    config.write_text(_block_ptq_yaml(steps=2))
    options = [*_calibrated("w8a8-ptq")[2:], "--config", str(config)]
    for ranks in (1, 2):
        run = _quantize(ranks, src, tmp_path / str(ranks), *options)
        assert run.returncode == 0, run.stderr[-2000:]
    one, two = (_calibration_record(tmp_path / str(r))["block_ptq"] for r in (1, 2))
    assert one["batches"] == two["batches"]
    for a, b in zip(one["blocks"], two["blocks"], strict=True):
        assert a["kept"] == b["kept"] and a["loss_start"] == b["loss_start"]
        for key in ("rtn_mse", "ptq_mse", "loss_end"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    a = load_file(tmp_path / "1" / "model.safetensors")
    b = load_file(tmp_path / "2" / "model.safetensors")
    for name in a:
        if a[name].dtype == torch.int8:
            moved = (a[name].int() - b[name].int()).abs()
            assert int(moved.max()) <= 1 and float((moved > 0).float().mean()) <= 1e-3, name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7)


def test_ranks_with_different_calibration_samples_are_refused(tiny_model_dir, tmp_path: Path) -> None:
    """Through the Python API: each rank's own samples (a bug in the caller) give one error on every rank."""
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            import torch
            from quantmint.algorithms.distributed import launched
            from quantmint.algorithms.ptq import quantize
            from quantmint.errors import ConfigError
            from quantmint.io.models import load_float_model

            with launched() as world:
                model = load_float_model({str(tiny_model_dir("llama"))!r})
                gen = torch.Generator().manual_seed(world.rank)  # a different seed on each rank
                samples = [torch.randint(0, 256, (32,), generator=gen) for _ in range(16)]
                try:
                    quantize(model, "w8a8", calibration=samples)
                except ConfigError as exc:
                    print(f"rank {{world.rank}}: {{exc}}")
                    sys.exit(3)
            """
        )
    )
    command = _torchrun(2, str(script))
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode != 0
    for rank in (0, 1):
        refused = f"rank {rank}: the ranks calibrate with different configs or calibration samples"
        assert refused in result.stdout


def test_interleave_puts_rank_entries_back_in_batch_order() -> None:
    # 7 batches over 3 ranks: rank 0 has 0, 3, 6; rank 1 has 1, 4; rank 2 has 2, 5 (two entries each).
    parts = [
        (3, ["0a", "0b", "3a", "3b", "6a", "6b"]),
        (2, ["1a", "1b", "4a", "4b"]),
        (2, ["2a", "2b", "5a", "5b"]),
    ]
    assert interleave(parts) == [f"{i}{x}" for i in range(7) for x in "ab"]
    # A module that some batches skip: not as many entries per batch, so all of them in rank order.
    assert interleave([(2, ["0", "2", "2b"]), (1, ["1"])]) == ["0", "2", "2b", "1"]
    assert World().share(list("abcde")) == list(enumerate("abcde"))
    assert World(rank=1, size=2).share(list("abcde")) == [(1, "b"), (3, "d")]


def test_max_of_skips_ranks_that_saw_nothing() -> None:
    a, b = torch.tensor([1.0, 5.0, -2.0]), torch.tensor([3.0, 4.0, -1.0])
    assert torch.equal(max_of([a, None, b]), torch.tensor([3.0, 5.0, -1.0]))
    assert max_of([None, None]) is None
    assert torch.equal(a, torch.tensor([1.0, 5.0, -2.0]))  # the inputs are left alone


def test_samples_digest_sees_every_token() -> None:
    samples = [torch.arange(8), torch.arange(4)]
    assert samples_digest(samples) == samples_digest([s.clone() for s in samples])
    assert samples_digest(samples) != samples_digest([torch.arange(8), torch.tensor([0, 1, 2, 4])])
    assert samples_digest(samples) != samples_digest(samples[::-1])
