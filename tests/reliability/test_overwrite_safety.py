"""The rules for `-o` and `--overwrite` (quantmint.io.outdir): nothing quantmint did not write is ever
replaced, an input is never written over, and each refusal is one line naming the fix."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from quantmint import load_quantized, quantize, save_quantized
from quantmint.errors import QuantmintError
from quantmint.tools.cli import main
from tests.conftest import build_tiny, unrotated


def _fingerprint(path: Path) -> dict[str, str]:
    """Every file under `path` with its sha256: what must not change."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def model(tmp_path: Path, tiny_model_dir) -> Path:
    """A float model of the test's own at tmp_path/parent/model, beside an unrelated file."""
    path = tmp_path / "parent" / "model"
    shutil.copytree(tiny_model_dir("llama"), path)
    (tmp_path / "parent" / "notes.txt").write_text("the user's own file\n")
    return path


def _refused(capsys, argv: list[str], *fragments: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _quantize(model: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "-o", str(out), "--preset", "w8a16", *extra]


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["in-memory", "stream"])
def test_overwrite_refuses_a_directory_that_contains_the_input_model(model: Path, capsys, stream) -> None:
    parent = model.parent
    before = _fingerprint(parent)
    _refused(capsys, _quantize(model, parent, "--overwrite", *stream), "contains the input", "another")
    assert _fingerprint(parent) == before


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["in-memory", "stream"])
def test_overwrite_refuses_the_input_model_dir(model: Path, capsys, stream) -> None:
    before = _fingerprint(model)
    _refused(capsys, _quantize(model, model, "--overwrite", *stream), "is the input")
    assert _fingerprint(model) == before


def test_output_inside_the_input_model_dir_is_refused(model: Path, capsys) -> None:
    before = _fingerprint(model)
    _refused(capsys, _quantize(model, model / "quantized"), "inside the input")
    assert _fingerprint(model) == before


def test_overwrite_refuses_a_directory_quantmint_did_not_write(model: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8 not a checkpoint")
    line = _refused(capsys, _quantize(model, other, "--overwrite"), str(other), "remove it by hand")
    assert "choose another -o" in line
    assert (other / "cat.jpg").read_bytes() == b"\xff\xd8 not a checkpoint"
    # What --overwrite may replace: quantmint's own checkpoint, an empty directory.
    out = tmp_path / "q"
    assert main(_quantize(model, out)) == 0
    assert main(_quantize(model, out, "--overwrite")) == 0
    load_quantized(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_quantize(model, empty, "--overwrite")) == 0
    load_quantized(empty)
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "parent", "photos", "q"]


def test_output_that_is_a_file_is_refused(model: Path, capsys) -> None:
    notes = model.parent / "notes.txt"
    _refused(capsys, _quantize(model, notes, "--overwrite"), "is a file")
    assert notes.read_text() == "the user's own file\n"


def test_output_under_a_file_is_refused(model: Path, capsys) -> None:
    notes = model.parent / "notes.txt"
    _refused(capsys, _quantize(model, notes / "out"), "is a file", "choose another -o")
    assert notes.read_text() == "the user's own file\n"


def test_output_that_is_a_symlink_is_refused(model: Path, tmp_path: Path, capsys) -> None:
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    before = _fingerprint(model)
    _refused(capsys, _quantize(model, link, "--overwrite"), "link")
    assert _fingerprint(model) == before and link.is_symlink()


def test_save_quantized_refuses_the_directory_the_model_was_loaded_from(model: Path) -> None:
    from quantmint.io.models import load_float_model

    before = _fingerprint(model)
    with pytest.raises(QuantmintError, match="is the input"):
        save_quantized(quantize(load_float_model(model), "w8a16"), model, overwrite=True)
    assert _fingerprint(model) == before


def _w8a8_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    calibration = [torch.randint(0, 256, (32,)) for _ in range(2)]
    return save_quantized(quantize(build_tiny("llama"), unrotated("w8a8"), calibration=calibration), path)


def test_export_refuses_to_write_over_its_input(tmp_path: Path, capsys) -> None:
    src = _w8a8_checkpoint(tmp_path / "ckpt")
    before = _fingerprint(src)
    _refused(capsys, ["export", str(src), "-o", str(src), "--overwrite"], "is the input")
    _refused(capsys, ["export", str(src), "-o", str(tmp_path), "--overwrite"], "contains the input")
    assert _fingerprint(src) == before


def test_export_overwrite_replaces_a_previous_export_only(tmp_path: Path, capsys) -> None:
    from quantmint.formats.export import export_checkpoint

    src = _w8a8_checkpoint(tmp_path / "ckpt")
    export_checkpoint(src, tmp_path / "ct")
    export_checkpoint(src, tmp_path / "ct", overwrite=True)  # its own earlier export: replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QuantmintError, match="remove it by hand"):
        export_checkpoint(src, foreign, overwrite=True)
    assert json.loads((foreign / "config.json").read_text()) == {"model_type": "llama"}


def test_report_refuses_to_write_over_a_directory_it_did_not_write(tmp_path: Path) -> None:
    from quantmint.tools.report import write_report

    report = {"rows": [{"model": str(tmp_path / "m"), "scheme": "float"}], "kv_key": "kv", "options": {}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(QuantmintError, match="is the input"):
        write_report(report, tmp_path / "m")
    with pytest.raises(QuantmintError, match="contains the input"):
        write_report(report, tmp_path)
    assert (tmp_path / "m" / "config.json").read_text() == "{}"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(QuantmintError, match="remove it by hand"):
        write_report(report, mine)
    assert (mine / "thesis.tex").read_text() == "x"
    write_report({**report, "rows": []}, tmp_path / "r")
    write_report({**report, "rows": []}, tmp_path / "r")  # its own earlier report: replaced
    assert (tmp_path / "r" / "report.json").is_file()


def test_synth_model_overwrite_replaces_its_own_output_only(tmp_path: Path, capsys) -> None:
    from quantmint.io.outdir import is_quantmint_output, prepare_output

    out = tmp_path / "synth"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "quantmint_synthetic": True}))
    assert is_quantmint_output(out)
    prepare_output(out, overwrite=True)  # accepted
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))  # someone's own model
    code = main(["synth-model", str(out), "--size", "50MB", "--overwrite"])
    err = capsys.readouterr().err
    assert code != 0 and "remove it by hand" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama"}
