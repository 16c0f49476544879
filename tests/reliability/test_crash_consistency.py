"""What a killed, racing or failing run leaves behind (quantmint.io.outdir): staging named by its owner and
removed once its owner is dead, everything synced before the rename, one writer per output, and a full
or read-only filesystem reported in one line with nothing left behind."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantmint import load_quantized, quantize, save_quantized
from quantmint.errors import QuantmintError
from quantmint.tools.cli import main
from tests.conftest import build_tiny


def _quantized() -> torch.nn.Module:
    return quantize(build_tiny("llama"), "w8a16")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _host() -> str:
    return "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


class _Spy:
    """A tokenizer whose save_pretrained runs `action(staging_dir)` (the checkpoint is being written)."""

    def __init__(self, action) -> None:
        self.action = action

    def save_pretrained(self, path) -> None:
        self.action(Path(path))


def test_staging_names_identify_their_owner(tmp_path: Path) -> None:
    seen = []
    save_quantized(_quantized(), tmp_path / "q", tokenizer=_Spy(seen.append))
    (staging,) = seen
    assert staging.parent == tmp_path
    assert staging.name.startswith(f".q.tmp-{_host()}-{os.getpid()}-"), staging.name


def test_stale_staging_of_dead_runs_is_removed_by_the_next_run(tmp_path: Path) -> None:
    dead, host = _dead_pid(), _host()
    stale = [
        f".q.tmp-{host}-{dead}-0a1b2c3d",
        f".q.old-{host}-{dead}-0a1b2c3d",
        f".q.blocks-{host}-{dead}-k2_x9abc",
    ]
    kept = [
        f".q.tmp-{host}-{os.getpid()}-0a1b2c3d",  # a live process's (this one's)
        f".q.tmp-otherhost-{dead}-0a1b2c3d",  # another machine's, on a shared filesystem
        f".qq.tmp-{host}-{dead}-0a1b2c3d",  # another output's
        ".q.tmp-0a1b2c3d",  # not our pattern (an older quantmint's): left alone
        "q.tmp-notes",
    ]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".q.tmp-{host}-{dead}-file").write_text("a file, not a staging dir")
    kept.append(f".q.tmp-{host}-{dead}-file")
    save_quantized(_quantized(), tmp_path / "q")
    load_quantized(tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q", *kept])


def test_cli_rerun_removes_stale_staging_before_working(tmp_path: Path, tiny_model_dir, capsys) -> None:
    dead, host = _dead_pid(), _host()
    for name in (f".q.tmp-{host}-{dead}-0a1b2c3d", f".q.blocks-{host}-{dead}-zz9_abcd", ".q.lock"):
        (tmp_path / name).mkdir() if not name.endswith(".lock") else (tmp_path / name).write_text(f"{dead}\n")
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(tmp_path / "q"), "--stream"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_everything_is_fsynced_before_the_rename_and_the_parent_after(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a, b, **kwargs) -> None:
        events.append(("rename", str(a)))
        real_rename(a, b, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = save_quantized(_quantized(), tmp_path / "q", tokenizer=_Spy(lambda p: (p / "sub").mkdir()))
    (renamed,) = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    staging = events[renamed][1]
    synced_before = {path for kind, path in events[:renamed] if kind == "fsync"}
    written = {str(p).replace(str(out), staging) for p in out.rglob("*")} | {staging}
    assert written <= synced_before, written - synced_before
    assert ("fsync", str(tmp_path)) in events[renamed + 1 :], (
        "the parent directory is synced after the rename"
    )


def test_a_second_writer_of_the_same_output_fails_in_one_line(tmp_path: Path) -> None:
    import fcntl

    lock = tmp_path / ".q.lock"
    with open(lock, "w") as held:  # another process holding it (flock is per open file)
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(QuantmintError, match=r"another quantmint process \(pid 4242\) is writing") as exc:
            save_quantized(_quantized(), tmp_path / "q")
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.lock"]  # the holder's: not ours to remove


def test_an_output_that_appears_meanwhile_is_left_intact(tmp_path: Path) -> None:
    out = tmp_path / "q"
    winner = save_quantized(_quantized(), tmp_path / "winner")

    def other_run_finishes(_: Path) -> None:
        winner.rename(out)

    with pytest.raises(QuantmintError, match="appeared while this run was writing it") as exc:
        save_quantized(_quantized(), out, tokenizer=_Spy(other_run_finishes))
    assert "\n" not in str(exc.value)
    load_quantized(out)  # the winner's, complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


class _FailingWrites:
    """`os` as quantmint.formats.safetensors_io sees it, but whose `write` fails with errno `code` (only
    there:
    Python's own writes go on)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        raise OSError(self.code, os.strerror(self.code))


def _error_line(err: str) -> str:
    """The one error line of a failed command (progress bars aside); no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("quantmint")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_full_disk_on_the_direct_io_path_is_enospc_not_buffererror(tmp_path: Path, monkeypatch) -> None:
    from quantmint.formats import safetensors_io
    from quantmint.formats.safetensors_io import ShardWriter, TensorSpec, _OutputFile

    probe = _OutputFile(tmp_path / "probe")
    direct = probe.direct
    probe.close()
    if not direct:
        pytest.skip(f"{tmp_path} does not take O_DIRECT: the buffered path has no staging buffer")
    monkeypatch.setattr(safetensors_io, "os", _FailingWrites(errno.ENOSPC))
    tensor = torch.zeros(100_000, dtype=torch.uint8)
    writer = ShardWriter(tmp_path / "x.safetensors", [TensorSpec.of("a", tensor)], {})
    writer.write("a", tensor)
    with pytest.raises(OSError) as exc:
        writer.close()
    assert exc.value.errno == errno.ENOSPC


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["in-memory", "stream"])
def test_a_full_disk_is_one_line_naming_the_directory(
    tmp_path: Path, tiny_model_dir, monkeypatch, capsys, stream
) -> None:
    from quantmint.formats import safetensors_io

    monkeypatch.setattr(safetensors_io, "os", _FailingWrites(errno.ENOSPC))
    out = tmp_path / "out" / "q"
    code = main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), *stream])
    err = capsys.readouterr().err
    assert code != 0
    line = _error_line(err)
    assert "No space left on device" in line and str(out) in line and "ENOSPC" in line, line
    assert list((tmp_path / "out").iterdir()) == [], "the staging directory is removed"


def test_a_read_only_output_filesystem_is_one_line(
    tmp_path: Path, tiny_model_dir, monkeypatch, capsys
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    code = main(["quantize", str(tiny_model_dir("llama")), "-o", str(ro / "q")])
    err = capsys.readouterr().err
    assert code != 0
    line = _error_line(err)
    assert "read-only" in line.lower() and str(ro / "q") in line, line
    assert list(ro.iterdir()) == []


def _try_mount(path: Path, options: str) -> bool:
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.parametrize("extra", [[], ["--stream", "--max-shard-size", "20KB"]], ids=["in-memory", "stream"])
def test_a_really_full_filesystem_is_one_line(tmp_path: Path, tiny_model_dir, capsys, extra) -> None:
    """The same on a 64 KiB tmpfs, where the kernel can mount one (root, a permissive sandbox)."""
    small = tmp_path / "small"
    if not _try_mount(small, "size=64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        code = main(["quantize", str(tiny_model_dir("llama")), "-o", str(small / "q"), *extra])
        err = capsys.readouterr().err
        assert code != 0
        line = _error_line(err)
        assert "No space left on device" in line and str(small / "q") in line, line
        assert list(small.iterdir()) == []
    finally:
        _umount(small)


def test_a_full_filesystem_under_torchrun_is_one_line(tmp_path: Path, tiny_model_dir) -> None:
    """Streaming RTN's ranks each write their share of the shards into rank 0's staging directory: the
    disk fills in one of them, rank 0 reports it in one line and removes the staging directory (then
    torchrun reports the failed rank in its own words)."""
    small = tmp_path / "small"
    if not _try_mount(small, "size=64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        command += ["-m", "quantmint", "quantize", str(tiny_model_dir("llama")), "-o", str(small / "q")]
        command += ["--stream", "--max-shard-size", "20KB"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode != 0
        ours = [line for line in done.stderr.splitlines() if line.startswith("quantmint quantize: error:")]
        assert len(ours) == 1, done.stderr
        assert "Traceback" not in done.stderr.split(ours[0])[0], done.stderr
        assert "No space left on device" in ours[0] and str(small / "q") in ours[0], ours[0]
        assert list(small.iterdir()) == []
    finally:
        _umount(small)


def test_a_really_read_only_filesystem_is_one_line(tmp_path: Path, tiny_model_dir, capsys) -> None:
    ro = tmp_path / "ro"
    if not _try_mount(ro, "size=1m,ro"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        code = main(["quantize", str(tiny_model_dir("llama")), "-o", str(ro / "q")])
        err = capsys.readouterr().err
        assert code != 0
        line = _error_line(err)
        assert "read-only" in line.lower() and str(ro / "q") in line, line
    finally:
        _umount(ro)
