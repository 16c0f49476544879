"""Reading and writing safetensors files one tensor at a time, so no file is ever held whole in memory.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header mapping each tensor name to its dtype, shape and `[begin, end)` byte offsets into the data
section, padded with spaces to a multiple of 8, then the data.

- `SafetensorsFile` parses and checks a header, then reads single tensors with `pread` into fresh
  memory. Unlike a memory map, nothing of the file stays resident once a tensor is dropped, so the
  peak RSS of a pass over a 10 GB checkpoint is its largest tensor, not the checkpoint. A caller that
  is done with each tensor before reading the next passes a `ReadArena` instead: first touches of
  fresh pages cost more than the read itself on some machines (1.7 GB/s into fresh memory vs
  6.6 GB/s into reused memory, measured on a 2-core VM).
- `CheckpointFiles` is a model directory: `model.safetensors`, or the shards of
  `model.safetensors.index.json`; a tensor is found by name in whichever shard holds it.
- `ShardWriter` writes a file whose tensor list is known in advance (`TensorSpec`): the header goes
  out first, then each tensor as it is produced, hashed on the way (sha256 for the manifest).

Both quantmint's in-memory save and its streaming paths write with `ShardWriter`, so the same tensors
give the same bytes whichever path produced them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantmint.errors import CheckpointError

__all__ = [
    "CheckpointFiles",
    "SafetensorsFile",
    "ShardWriter",
    "TensorSpec",
    "plan_shards",
    "shard_names",
]

SINGLE_SHARD = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODES = {code: dtype for dtype, code in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """The name, dtype and shape of one tensor to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tensor.dtype, tuple(tensor.shape))


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """`model.safetensors`, or Hugging Face's `model-0000i-of-0000n.safetensors` names."""
    if count == 1:
        return [SINGLE_SHARD]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


_IO_CHUNK = 16 << 20  # one huge write() is ~10x slower than 16 MiB ones on Linux (measured)
# Bytes handed to the writer threads and not yet written and hashed. It also bounds the output memory
# streaming RTN keeps for reuse; 512 MiB made no run faster on 2 cores and kept 0.3 GB more (measured).
_MAX_PENDING = 128 << 20
_DIRECT_ALIGN = 4096  # O_DIRECT's offset, length and address unit on every Linux filesystem


class _OutputFile:
    """A file written start to end, with O_DIRECT where the system allows it.

    Buffered writes cost the writer a page-cache copy plus page allocation and leave the data dirty for
    the kernel to flush later; on the 2-core VM of benchmarks/scale.py, writing a 4.3 GB checkpoint
    that way took 2-9 s of system time, against 2 s of mostly idle waiting with O_DIRECT (2.2 GB/s).
    Data goes through a page-aligned staging buffer (O_DIRECT needs aligned memory, offsets and
    lengths); the last partial block is written padded and the file truncated to its size.
    Where O_DIRECT is missing (not Linux), refused at open (tmpfs on older kernels) or refused at the
    first write (some FUSE filesystems), or turned off with QUANTMINT_DIRECT_IO=0, writes are buffered.
    """

    def __init__(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0) if os.environ.get("QUANTMINT_DIRECT_IO", "1") != "0" else 0
        self.fd = -1
        if direct:
            with contextlib.suppress(OSError):
                self.fd = os.open(path, flags | direct, 0o600)
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(path, flags, 0o600)
        self.size = 0
        self._stage = mmap.mmap(-1, _IO_CHUNK) if self.direct else None
        self._fill = 0

    def write(self, data: memoryview) -> None:
        if not self.direct:
            self._write_all(data)
            return
        assert self._stage is not None
        done = 0
        while done < len(data):
            n = min(len(data) - done, _IO_CHUNK - self._fill)
            self._stage[self._fill : self._fill + n] = data[done : done + n]
            self._fill += n
            done += n
            if self._fill == _IO_CHUNK:
                self._flush_stage(_IO_CHUNK)
        self.size += len(data)

    def _flush_stage(self, length: int) -> None:
        assert self._stage is not None
        with memoryview(self._stage) as stage:
            try:
                self._write_all(stage[:length])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # The filesystem opened the file for direct I/O but will not do it: go on buffered
                # (the staged block is still whole; nothing of it reached the file). Only Linux gets
                # here, so fcntl (not on Windows) is imported here.
                import fcntl

                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self._write_all(stage[:length])
        self._fill = 0

    def _write_all(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.write(self.fd, data[done:])

    def abort(self) -> None:
        """Close without writing what is staged (the file is being thrown away)."""
        self._fill = 0
        self.close()

    def close(self) -> None:
        try:
            if self.direct and self._fill:
                assert self._stage is not None
                padded = -(-self._fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
                self._stage[self._fill : padded] = bytes(padded - self._fill)
                self._flush_stage(padded)
                os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            stage, self._stage = self._stage, None
            if stage is not None:
                # A write that failed (a full disk) left views of the buffer in its traceback: the
                # memory goes with them. Raising BufferError here would hide that error (ENOSPC).
                with contextlib.suppress(BufferError):
                    stage.close()


class ShardWriter:
    """Writes one safetensors file whose tensors (`specs`, in file order) are known in advance.

    Call `write` once per spec, in order; `close` checks that every tensor came and returns the file's
    sha256 and size. The file is written in place: write into a staging directory. Writing and hashing
    happen on two background threads (both release the GIL), so the caller can produce the next tensor
    meanwhile; at most `_MAX_PENDING` bytes wait.
    """

    def __init__(
        self, path: str | os.PathLike[str], specs: list[TensorSpec], metadata: dict[str, str]
    ) -> None:
        self.path = Path(path)
        self.specs = specs
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for spec in specs:
            if spec.dtype not in _DTYPES:
                raise CheckpointError(
                    f"tensor {spec.name!r} has dtype {spec.dtype}, which safetensors cannot store"
                )
            header[spec.name] = {
                "dtype": _DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._hash = hashlib.sha256()
        self._file = _OutputFile(self.path)
        # Writing and hashing each take a thread (both release the GIL): on 2 cores, hashing on the
        # writing thread made the writer the slowest stage of streaming RTN (measured).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="quantmint-writer")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="quantmint-hasher")
        self._pending: deque[tuple[Future[None], Future[None], int]] = deque()
        self._emit(struct.pack("<Q", len(raw)) + raw, None)
        self._next = 0

    def _write_out(self, data: bytes | memoryview, owner: torch.Tensor | None) -> None:
        """Runs on the writer thread; `owner` keeps the tensor under `data` alive until written."""
        for start in range(0, len(data), _IO_CHUNK):
            self._file.write(data[start : start + _IO_CHUNK])

    def _hash_out(self, data: bytes | memoryview, owner: torch.Tensor | None) -> None:
        """Runs on the hashing thread, which sees the data in the order it is written."""
        for start in range(0, len(data), _IO_CHUNK):
            self._hash.update(data[start : start + _IO_CHUNK])

    def _emit(self, data: bytes | memoryview, owner: torch.Tensor | None) -> None:
        """Queue `data` (a view of `owner`, which the queue keeps alive) for writing and hashing."""
        while self._pending and sum(n for *_, n in self._pending) + len(data) > _MAX_PENDING:
            self._settle(self._pending.popleft())
        while self._pending and self._pending[0][0].done() and self._pending[0][1].done():
            self._settle(self._pending.popleft())
        written = self._thread.submit(self._write_out, data, owner)
        hashed = self._hasher.submit(self._hash_out, data, owner)
        self._pending.append((written, hashed, len(data)))

    @staticmethod
    def _settle(entry: tuple[Future[None], Future[None], int]) -> None:
        entry[0].result()
        entry[1].result()

    def _drain(self) -> None:
        while self._pending:
            self._settle(self._pending.popleft())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise CheckpointError(f"{self.path}: tensor {name!r} is one more than the file was planned for")
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(
                f"{self.path}: expected tensor {spec.name!r} {spec.dtype} {list(spec.shape)} next, "
                f"got {name!r} {tensor.dtype} {list(tensor.shape)}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._emit(_tensor_bytes(flat), flat)
        self._next += 1

    def close(self) -> dict[str, Any]:
        """Finish the file; returns {"sha256", "bytes"} for the manifest."""
        try:
            self._drain()
        except BaseException:
            self.abort()
            raise
        self._thread.shutdown()
        self._hasher.shutdown()
        self._file.close()
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next :]]
            raise CheckpointError(
                f"{self.path}: {len(missing)} planned tensor(s) never written: {missing[:3]}"
            )
        self.path.chmod(0o644)
        return {"sha256": self._hash.hexdigest(), "bytes": self.path.stat().st_size}

    def abort(self) -> None:
        self._thread.shutdown(cancel_futures=True)
        self._hasher.shutdown(cancel_futures=True)
        self._file.abort()


class ReadArena:
    """Reusable memory for reads whose tensors die before the next `reset()`.

    `take(n)` hands out the next `n` bytes of one buffer (64-byte aligned, so any dtype can view them);
    `reset()` starts again from its beginning. When a request does not fit, a larger buffer replaces
    the current one; tensors already handed out keep the old one alive until they are dropped.
    """

    ALIGN = 64

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._offset = 0

    def take(self, nbytes: int) -> torch.Tensor:
        start = -(-self._offset // self.ALIGN) * self.ALIGN
        if start + nbytes > self._buffer.numel():
            self._buffer = torch.empty(max(nbytes, 2 * self._buffer.numel()), dtype=torch.uint8)
            start = 0
        self._offset = start + nbytes
        return self._buffer[start : start + nbytes]

    def reset(self) -> None:
        self._offset = 0

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lives in the current buffer (and so will be overwritten after `reset`)."""
        return tensor.untyped_storage().data_ptr() == self._buffer.untyped_storage().data_ptr()


class SafetensorsFile:
    """One safetensors file: its header, checked against the file size, and tensors read one at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._error("is shorter than a safetensors header")
                (length,) = struct.unpack("<Q", prefix)
                if length > min(_MAX_HEADER, size - 8):
                    raise self._error(f"declares a {length}-byte header in a {size}-byte file")
                header = json.loads(f.read(length))
        except (OSError, ValueError, RecursionError) as exc:  # JSON, UTF-8, huge integers, deep nesting
            raise self._error(f"cannot be read: {' '.join(str(exc).split())[:300]}") from None
        if not isinstance(header, dict):
            raise self._error("has a header that is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + length
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - self._start
        for name, entry in header.items():
            try:
                dtype = _CODES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._error(f"has an unreadable header entry for tensor {name!r}") from None
            if not 0 <= begin <= end <= data_size or end - begin != TensorSpec(name, dtype, shape).nbytes:
                raise self._error(
                    f"is truncated or corrupt: tensor {name!r} needs bytes [{begin}, {end}) of a "
                    f"{data_size}-byte data section"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} {what}; copy or download the checkpoint again")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def spec(self, name: str) -> TensorSpec:
        dtype, shape, _, _ = self._entries[name]
        return TensorSpec(name, dtype, shape)

    def offset(self, name: str) -> int:
        """Where tensor `name`'s bytes start in the file (for readers of their own: the header checked
        that the file holds all of them)."""
        return self._start + self._entries[name][2]

    def read(self, name: str, arena: ReadArena | None = None) -> torch.Tensor:
        """The tensor `name`, in its stored dtype and shape, in memory of its own or from `arena`."""
        dtype, shape, begin, end = self._entries[name]
        buffer = arena.take(end - begin) if arena is not None else torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy()) if end > begin else memoryview(bytearray())
        done = 0
        with open(self.path, "rb", buffering=0) as f:
            while done < end - begin:
                n = os.preadv(f.fileno(), [view[done:]], self._start + begin + done)
                if n == 0:
                    raise self._error(f"ended while reading tensor {name!r}")
                done += n
        return buffer.view(dtype).reshape(shape)


class CheckpointFiles:
    """The safetensors weights of a Hugging Face model directory, single file or sharded."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / SINGLE_SHARD
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, RecursionError, KeyError, TypeError) as exc:
                reason = " ".join(str(exc).split())[:300]
                raise CheckpointError(f"{index} is not a valid safetensors index ({reason})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).is_file():
                    raise CheckpointError(f"shard {self.directory / shard} named in {index} is missing")
                self._files[shard] = SafetensorsFile(self.directory / shard)
            for name, shard in weight_map.items():
                if name not in self._files[shard]:
                    raise CheckpointError(f"{index} puts tensor {name!r} in {shard}, which does not hold it")
                self._where[name] = self._files[shard]
        elif single.is_file():
            self._files[SINGLE_SHARD] = SafetensorsFile(single)
            self._where = dict.fromkeys(self._files[SINGLE_SHARD].keys(), self._files[SINGLE_SHARD])
        else:
            found = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt*")
            )
            hint = f" (it has {found[:2]}: pickle files are not read; convert them to safetensors)"
            hint = hint if found else ""
            raise CheckpointError(f"{self.directory} has neither {SINGLE_SHARD} nor {INDEX_NAME}{hint}")

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def spec(self, name: str) -> TensorSpec:
        return self._where[name].spec(name)

    def read(self, name: str, arena: ReadArena | None = None) -> torch.Tensor:
        return self._where[name].read(name, arena)

    def location(self, name: str) -> tuple[Path, int]:
        """The file holding tensor `name` and the offset of its bytes in it."""
        file = self._where[name]
        return file.path, file.offset(name)

    @property
    def total_bytes(self) -> int:
        return sum(self.spec(name).nbytes for name in self._where)

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files.values()]
