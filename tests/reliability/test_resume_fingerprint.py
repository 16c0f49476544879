"""Block-PTQ resume: a work directory left by a run of another model is never resumed.

The resume fingerprint covers the float weights by content (not only config and shapes): two tiny
Llamas with one config and other weights, a run of A interrupted after block 0, then a run of B with the
same work directory must give exactly what a fresh run of B gives, and say on stderr that it restarted.
The same holds out of core (`--stream`), where the blocks' weights are read from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, byte_tokenizer
from safetensors.torch import load_file

from quantmint.algorithms import block_ptq
from quantmint.algorithms.ptq import quant_state, quantize
from quantmint.algorithms.streaming import quantize_checkpoint
from quantmint.config import PTQConfig, get_preset
from quantmint.formats.checkpoint import save_quantized


class _Interrupted(Exception):
    pass


def _config() -> PTQConfig:
    config = get_preset("w8a16-ptq")
    assert config.block_ptq is not None
    fast = {"n_outer_loops": 8, "batch_size": 4, "n_batches": 2}
    return config.with_updates(block_ptq={**config.block_ptq.model_dump(), **fast})


def _calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (16,), generator=generator) for _ in range(8)]


def _interrupt_after_block_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next block-PTQ run stop right after block 0 is committed to the work directory."""
    checkpoint = block_ptq.BlockPTQ._checkpoint

    def stop_after_first(self, block, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved = checkpoint(self, block, *args, **kwargs)
        raise _Interrupted
        return saved  # pragma: no cover

    monkeypatch.setattr(block_ptq.BlockPTQ, "_checkpoint", stop_after_first)


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_resume_refuses_or_restarts_on_other_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model_a, model_b = build_tiny("llama", seed=0), build_tiny("llama", seed=1)
    assert model_a.config.to_dict() == model_b.config.to_dict()
    work = tmp_path / "work"
    with monkeypatch.context() as patch:
        _interrupt_after_block_0(patch)
        with pytest.raises(_Interrupted):
            quantize(model_a, _config(), calibration=_calibration(), work_dir=work)
    assert json.loads((work / "progress.json").read_text())["next_block"] == 1
    capsys.readouterr()

    resumed = quantize(build_tiny("llama", seed=1), _config(), calibration=_calibration(), work_dir=work)
    notice = capsys.readouterr().err
    assert "another model" in notice and "starting from block 0" in notice
    fresh = quantize(model_b, _config(), calibration=_calibration())
    state = quant_state(resumed)
    assert state is not None and state.calibration["block_ptq"]["resumed_at_block"] is None
    _assert_identical(fresh.state_dict(), resumed.state_dict())
    # Saved, byte for byte.
    a = save_quantized(resumed, tmp_path / "resumed")
    b = save_quantized(fresh, tmp_path / "fresh")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_streamed_resume_fingerprints_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, seed in (("a", 0), ("b", 1)):
        build_tiny("llama", seed=seed).save_pretrained(tmp_path / name)
        byte_tokenizer().save_pretrained(tmp_path / name)
    work = tmp_path / "work"
    with monkeypatch.context() as patch:
        _interrupt_after_block_0(patch)
        with pytest.raises(_Interrupted):
            quantize_checkpoint(
                tmp_path / "a", tmp_path / "out", _config(), calibration=_calibration(), work_dir=work
            )
    capsys.readouterr()
    quantize_checkpoint(
        tmp_path / "b", tmp_path / "out", _config(), calibration=_calibration(), work_dir=work
    )
    assert "starting from block 0" in capsys.readouterr().err
    quantize_checkpoint(tmp_path / "b", tmp_path / "fresh", _config(), calibration=_calibration())
    out, fresh = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("out", "fresh"))
    _assert_identical(fresh, out)


def test_in_memory_and_streamed_runs_share_one_fingerprint(tmp_path: Path, monkeypatch) -> None:
    # Out of core the blocks are still on `meta` when the fingerprint is taken: their weights are read
    # from the checkpoint, so the two paths hash the same bytes (and one can resume the other's run).
    from quantmint.io.models import load_float_model

    build_tiny("llama", seed=0).save_pretrained(tmp_path / "a")
    byte_tokenizer().save_pretrained(tmp_path / "a")
    seen: list[str] = []
    fingerprint = block_ptq._fingerprint
    monkeypatch.setattr(block_ptq, "_fingerprint", lambda *a: seen.append(fingerprint(*a)) or seen[-1])
    quantize(load_float_model(tmp_path / "a"), _config(), calibration=_calibration(), work_dir=tmp_path / "w")
    quantize_checkpoint(
        tmp_path / "a", tmp_path / "out", _config(), calibration=_calibration(), work_dir=tmp_path / "v"
    )
    assert len(seen) == 2 and seen[0] == seen[1]
