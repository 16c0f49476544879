"""Native CPU kernels: C sources compiled on first use and called through ctypes. quantmint's own are in
`quantmint/csrc`; a backend passes the path of its own (the torch runtime's AMX kernel is
`quantmint/backends/torch/csrc/woq.c`), with the extra compiler flags it needs.

The kernels are plain C, built with the machine's own compiler (``$CC``, else ``cc``/``gcc``/``clang``)
at ``-O3 -march=native``, once per source, compiler and CPU: the shared library is cached under
``$QUANTMINT_CACHE`` (default ``$XDG_CACHE_HOME/quantmint`` or ``~/.cache/quantmint``), written to a
temporary name and renamed, so processes building it at once do not see half a file. ctypes releases
the GIL while a kernel runs, so Python threads can split the work of one call.

Everything here is optional: with no compiler, a build error or ``QUANTMINT_NATIVE=0``, `library`
returns None (saying why once on stderr, unless disabled on purpose) and the callers use torch, which
gives the same results (the tests hold each kernel to its torch reference).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cache_dir", "cpu_features", "library"]

_SOURCES = Path(__file__).resolve().parent / "csrc"
_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where built kernels are kept (``$QUANTMINT_CACHE``, else the user's cache directory)."""
    if os.environ.get("QUANTMINT_CACHE"):
        return Path(os.environ["QUANTMINT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantmint"


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _flags(extra: Sequence[str] = ()) -> list[str]:
    flags = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", *extra]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")  # compilers default to 256-bit vectors on AVX-512
    return flags


def cpu_features() -> tuple[str, frozenset[str]]:
    """This CPU's vendor (``vendor_id`` in /proc/cpuinfo, e.g. ``AuthenticAMD``, ``GenuineIntel``; ""
    where unknown) and its feature flags (``avx512_bf16``, ``amx_bf16``, ...; empty where unknown)."""
    vendor, flags = "", frozenset(_cpu_signature().partition(":")[2].split())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id":
                vendor = value.strip()
                break
    except OSError:
        pass
    return vendor, flags


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not load on another."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            return line
    return platform.machine()


def _build(name: str, source: Path, compiler: str, extra_flags: Sequence[str] = ()) -> Path:
    flags = _flags(extra_flags)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), compiler, version, " ".join(flags), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library(
    name: str, source: str | os.PathLike[str] | None = None, flags: Sequence[str] = ()
) -> ctypes.CDLL | None:
    """The compiled C source `source` (default: quantmint's own `csrc/<name>.c`), built with the common
    flags plus `flags` (e.g. `-fopenmp`: the library then links libgomp.so.1, which the loader resolves to
    the copy torch has already loaded, so kernels share torch's thread pool); None where it cannot be built
    or loaded (see the module doc)."""
    if os.environ.get("QUANTMINT_NATIVE", "1") == "0":
        return None
    path = Path(source) if source is not None else _SOURCES / f"{name}.c"
    key = f"{path.resolve()}\0{' '.join(flags)}"
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        lib = None
        compiler = _compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
            if not path.is_file():
                raise RuntimeError(f"its source {path} is missing")
            lib = ctypes.CDLL(str(_build(name, path, compiler, flags)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            print(
                f"quantmint: native kernel {name!r} unavailable, using torch instead ({exc}); "
                "set QUANTMINT_NATIVE=0 to skip it",
                file=sys.stderr,
            )
        _LOADED[key] = lib
        return lib
