"""Output directories: what may be written or replaced, and writing one so that it is all or nothing.

Every command that writes a directory (`quantize` in memory and `--stream`, `export`, `synth-model`,
`report`, the example-model cache) goes through `staged_directory`, and the CLI calls
`prepare_output` before it starts working, so a bad `-o` is refused in a second, not after the model
is quantized. The rules:

- `-o` may not be an input (the float model, the checkpoint exported, a report's models), contain
  one, or lie inside one.
- `-o` may not be a file or a symbolic link, nor lie under a file.
- An existing `-o` is replaced only with `overwrite`, and only when quantmint recognizably wrote it
  (`is_quantmint_output`: a checkpoint with its manifest, an export, a synthetic model, a report) or
  it is empty. Any other directory is left alone, named in the error.
- The new directory is written into a staging sibling `.<name>.tmp-<host>-<pid>-<random>`, every
  file in it and the directory itself are fsynced, then it is renamed into place (atomically
  exchanged with the old one when replacing, where Linux allows), and the parent is fsynced.
- One process at a time writes a given `-o`: `.<name>.lock` beside it is held (flock) while the
  staging directory is renamed, and removed after. A second process gets a one-line error.
- Staging siblings of runs that died (`.<name>.tmp-`, `.old-`, `.blocks-` with this host's name and
  a pid that no longer runs) are removed by the next run to the same `-o`. Nothing else is touched.
- A full disk, a quota, a read-only filesystem or a permission refusal while writing is a one-line
  `OutputError` naming the directory and the reason; the staging directory is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from quantmint.errors import OutputError

__all__ = [
    "OUTPUT_ERRNOS",
    "is_quantmint_output",
    "output_errors",
    "prepare_output",
    "remove_stale_staging",
    "staged_directory",
    "staging_prefix",
]

MANIFEST_NAME = "quantmint_manifest.json"  # as quantmint.formats.checkpoint names it (not imported: no torch)
REPORT_FILES = frozenset({"report.md", "report.json", "report.png", "block_mse.png"})
SYNTHETIC_KEY = "quantmint_synthetic"  # in the config.json of `quantmint synth-model`
_STAGING_KINDS = ("tmp", "old", "blocks")
# Errors of the output filesystem that a user fixes, not a bug: reported in one line.
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "free some space there or choose another -o",
    errno.EDQUOT: "free some of your quota there or choose another -o",
    errno.EROFS: "the filesystem is read-only: choose another -o",
    errno.EACCES: "you may not write there: choose another -o",
    errno.EPERM: "you may not write there: choose another -o",
}
OUTPUT_ERRNOS = frozenset(_OUTPUT_ERRNOS)


def _host() -> str:
    """This machine's name as it goes into staging names: staging of another host sharing the
    filesystem (NFS) is never judged by this host's process table."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def staging_prefix(out: Path, kind: str) -> str:
    """The name prefix of this process's `kind` staging sibling of `out` (`tmp`, `old` or `blocks`);
    a random suffix follows."""
    assert kind in _STAGING_KINDS
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-"


def _staging_pattern(out: Path) -> re.Pattern[str]:
    kinds = "|".join(_STAGING_KINDS)
    return re.compile(
        rf"\.{re.escape(out.name)}\.(?:{kinds})-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[A-Za-z0-9_]+"
    )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a name we wrote: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging siblings of `out` left by processes of this host that no longer run;
    returns what was removed. Only names of quantmint's exact pattern for `out` are considered."""
    pattern = _staging_pattern(out)
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.fullmatch(path.name)
        if match is None or match["host"] != _host() or _pid_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def is_quantmint_output(path: Path) -> bool:
    """Whether directory `path` is empty or was written by quantmint: a checkpoint (its manifest), an
    export (`producer` quantmint in its quantization_config), a synthetic model or a report."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    if not names or MANIFEST_NAME in names:
        return True
    if "report.json" in names and names <= REPORT_FILES:
        return True
    if "config.json" in names:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError, RecursionError):
            return False
        if not isinstance(config, dict):
            return False
        if config.get(SYNTHETIC_KEY) is True:
            return True
        block = config.get("quantization_config")
        producer = block.get("producer") if isinstance(block, dict) else None
        return isinstance(producer, dict) and producer.get("name") == "quantmint"
    return False


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _inside(path: Path, other: Path) -> bool:
    return path != other and other in path.parents


def prepare_output(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
    owned: bool = False,
) -> Path:
    """Check that `out` may be written (the rules of this module's docstring) and remove staging left
    by dead runs beside it; returns `out` as a Path. Raises `OutputError` naming the problem and fix.

    `inputs`: directories the command reads (None entries are skipped). `owned`: `out` is in
    quantmint's own cache, replaced whatever it holds.
    """
    out = Path(out)
    real = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        source = _resolved(Path(given))
        if real == source:
            raise OutputError(f"-o {out} is the input {given}: choose another output directory")
        if _inside(source, real):
            raise OutputError(
                f"-o {out} contains the input {given}: writing it would replace the input; choose "
                "another output directory"
            )
        if _inside(real, source):
            raise OutputError(f"-o {out} is inside the input {given}: choose an output directory outside it")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # a dangling link
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise OutputError(f"cannot create {out}: {ancestor} is a file, not a directory; choose another -o")
    if ancestor.is_dir() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {out}: {ancestor} is not writable (a read-only filesystem or no permission); "
            "choose another -o"
        )
    if out.is_symlink():
        raise OutputError(
            f"-o {out} is a symbolic link: pass the directory it points to or another output directory"
        )
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"-o {out} is a file, not a directory: remove it or choose another -o")
        if not overwrite:
            raise OutputError(f"output directory {out} already exists; pass --overwrite to replace it")
        if not owned and not is_quantmint_output(out):
            raise OutputError(
                f"--overwrite: {out} is not empty and quantmint did not write it (no {MANIFEST_NAME}); "
                "remove it by hand or choose another -o"
            )
    remove_stale_staging(out)
    return out


def _on_output_side(path: Path, out: Path, areas: Iterable[Path]) -> bool:
    """Whether `path` is `out`, a directory on the way to it, in one of `areas`, or in a sibling
    named `.<out name>.*` (staging, lock, block-PTQ work directory)."""
    where, real = _resolved(path), _resolved(out)
    if where == real or where in real.parents:
        return True
    if any(where == a or a in where.parents for a in map(_resolved, areas)):
        return True
    return any(
        p.parent == real.parent and (p.name == real.name or p.name.startswith(f".{real.name}."))
        for p in (where, *where.parents)
    )


@contextmanager
def output_errors(out: Path, *areas: Path) -> Iterator[None]:
    """Turn a full disk, quota, read-only filesystem or permission refusal on `out`'s side (see
    `_on_output_side`; or an error naming no file, like a failed write) into a one-line `OutputError`."""
    try:
        yield
    except OSError as exc:
        fix = _OUTPUT_ERRNOS.get(exc.errno or 0)
        if fix is None:
            raise
        if exc.filename is not None and not _on_output_side(Path(os.fsdecode(exc.filename)), out, areas):
            raise
        reason = os.strerror(exc.errno or 0)
        raise OutputError(
            f"cannot write {out}: {reason} ({errno.errorcode.get(exc.errno or 0, exc.errno)}) in "
            f"{out.parent.resolve() if out.parent.exists() else out.parent}; {fix}"
        ) from None


# --- durability -------------------------------------------------------------------------------------
def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some systems cannot open a directory: nothing to sync then
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    dirs = []
    for current, _, files in os.walk(root):
        dirs.append(Path(current))
        for name in files:
            path = Path(current) / name
            if not path.is_symlink():
                _fsync_path(path)
    for directory in reversed(dirs):
        _fsync_path(directory, directory=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap `a` and `b` (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# --- one writer per output --------------------------------------------------------------------------
@contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out` (flock; released by the kernel if this process dies); the file
    is removed on release. Another process holding it is a one-line `OutputError`."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = b""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 64, 0)
            os.close(fd)
            who = f" (pid {holder.decode(errors='replace').strip()})" if holder.strip() else ""
            raise OutputError(
                f"another quantmint process{who} is writing {out} right now; wait for it to finish or "
                "choose another -o"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder removed meanwhile: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


# --- staging ----------------------------------------------------------------------------------------
@contextmanager
def staged_directory(
    out: Path,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    owned: bool = False,
) -> Iterator[Path]:
    """Yield an empty sibling directory to write into; rename it to `out` only if the block succeeds.

    `out` is checked by `prepare_output` (inputs, files, what `overwrite` may replace) first and again
    before the rename. On any failure the staging directory is removed, so `out` is never
    half-written; an existing `out` is replaced only once the new directory is complete and synced.
    """
    out = Path(out)
    inputs = list(inputs)
    with output_errors(out):
        prepare_output(out, inputs, overwrite, owned)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f"{staging_prefix(out, 'tmp')}{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    try:
        with output_errors(out, tmp):
            yield tmp
            _fsync_tree(tmp)
            with _output_lock(out):
                remove_stale_staging(out)
                if out.exists() or out.is_symlink():
                    if not overwrite and not out.is_symlink() and out.is_dir():
                        raise OutputError(
                            f"{out} appeared while this run was writing it (another process wrote it) "
                            "and was left as it is; pass --overwrite to replace it or choose another -o"
                        )
                    prepare_output(out, inputs, overwrite, owned)
                    if _exchange(tmp, out):
                        _fsync_path(out.parent, directory=True)
                        shutil.rmtree(tmp, ignore_errors=True)  # the old output now
                    else:
                        old = out.parent / f"{staging_prefix(out, 'old')}{uuid.uuid4().hex[:8]}"
                        out.rename(old)
                        tmp.rename(out)
                        _fsync_path(out.parent, directory=True)
                        shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(out)
                    _fsync_path(out.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
