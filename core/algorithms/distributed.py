"""Data-parallel calibration on `torch.distributed`: the calibration batches split across ranks.

Launched by torchrun (`torchrun --nproc-per-node N -m quantmint quantize ...`, or across machines with
torchrun's rendezvous), every rank loads the model and tokenizes the same calibration samples; the
calibration engine (`quantmint.algorithms.calibration`) cuts them into the same batches as one process
would and gives rank r the batches r, r + N, r + 2N, ... Each rank runs the blocks on its own batches
only (the expensive part), and before a block is smoothed and rounded, every statistic its steps
gathered is combined across ranks, so every rank rounds the same block the same way:

- maxima (activation ranges, SmoothQuant's channel maxima, K/V ranges) with an all-reduce MAX: exact;
- lists with one entry per batch (percentiles, per-token maxima, the alpha search's losses, the pair
  search's sampled inputs) gathered and put back in the one-process order of the batches, so that what
  is computed from them (a mean, a median, a sum) is the same number as in one process;
- sums over tokens (GPTQ's x^T x) with an all-reduce SUM in float64: equal to one process's sum up to
  the order of float64 additions (relative 1e-15, which may move a GPTQ weight that sits on a rounding
  boundary by one step).

A statistic object takes part by having `reduce(world)` (`InputObserver`, `KVObserver`, the GPTQ
Hessians, ...): the pipeline calls it on every object in `BlockContext.handles` once the block ran on
every local batch. So with the same number of threads per process, N ranks write the checkpoint that one
process writes, byte for byte for RTN, static ranges, SmoothQuant and C8.

Rank 0 writes the output; the others wait for it. gloo carries the collectives on CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from quantmint.errors import ConfigError

__all__ = [
    "World",
    "current_world",
    "interleave",
    "launched",
    "max_of",
    "samples_digest",
    "torchrun_world_size",
]

T = TypeVar("T")

# Environment variables torchrun sets for every worker (`torch.distributed.run`).
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """The processes calibrating together: this one's `rank` among `size` (one process: 0 of 1).

    Every method is a collective: every rank calls it, in the same order, or all of them wait.
    """

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the output (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's items of `items` (rank r: r, r + N, ...), each with its index in `items`."""
        return [(i, items[i]) for i in range(self.rank, len(items), self.size)]

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the ranks, in place (exact)."""
        if self.distributed:
            _all_reduce(tensor, torch.distributed.ReduceOp.MAX)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; float64 tensors keep the sum exact to float64 rounding."""
        if self.distributed:
            _all_reduce(tensor, torch.distributed.ReduceOp.SUM)
        return tensor

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), by rank."""
        if not self.distributed:
            return [obj]
        found: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(found, obj)
        return found

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def interleave(self, local: Sequence[T], local_calls: int) -> list[T]:
        """The entries of every rank's `local` list in one-process order (see `interleave`).

        `local` holds this rank's entries for its `local_calls` calibration batches, in batch order."""
        if not self.distributed:
            return list(local)
        return interleave(self.gather((local_calls, list(local))))

    def same_everywhere(self, what: str, digest: str) -> None:
        """Raise ConfigError on every rank when `digest` differs between ranks (`what` names it)."""
        if not self.distributed:
            return
        digests = self.gather(digest)
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ConfigError(
                f"the ranks calibrate with different {what} (rank 0's differ from rank(s) {differ}): start "
                "every rank with the same model, config and calibration arguments"
            )


def interleave(parts: list[tuple[int, list[T]]]) -> list[T]:
    """Each rank's (calibration batches, entries) in one-process batch order, rank r holding batches
    r, r + N, ... (`World.share`). When a rank's entries are not the same number per batch (a module
    that some batches skip), they are concatenated in rank order: the same entries, another order."""
    lists = [entries for _, entries in parts]
    pers = {len(entries) // calls for calls, entries in parts if calls}
    per = pers.pop() if len(pers) == 1 else 0
    if per <= 0 or any(calls * per != len(entries) for calls, entries in parts):
        return [x for part in lists for x in part]
    chunks = [[part[i : i + per] for i in range(0, len(part), per)] for part in lists]
    out: list[T] = []
    for j in range(max((len(c) for c in chunks), default=0)):
        for c in chunks:
            if j < len(c):
                out.extend(c[j])
    return out


def max_of(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The element-wise maximum of the tensors that are not None (None when all are)."""
    found = [t for t in tensors if t is not None]
    if not found:
        return None
    out = found[0].clone()
    for t in found[1:]:
        torch.maximum(out, t, out=out)
    return out


def _all_reduce(tensor: torch.Tensor, op: Any) -> None:
    if tensor.is_cuda or torch.distributed.get_backend() != "nccl":
        torch.distributed.all_reduce(tensor, op=op)
        return
    moved = tensor.cuda()  # nccl reduces CUDA tensors only
    torch.distributed.all_reduce(moved, op=op)
    tensor.copy_(moved.cpu())


def current_world() -> World:
    """The default `torch.distributed` process group as a `World`; one process when none is initialized."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size())
    return World()


def torchrun_world_size() -> int:
    """The number of processes torchrun started this one among (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextlib.contextmanager
def launched(device: str = "cpu", timeout_minutes: float = 60.0) -> Iterator[World]:
    """The `World` of this process: under torchrun (WORLD_SIZE > 1) the default process group is
    initialized from torchrun's environment (gloo for `cpu`, nccl for `cuda`) and destroyed on exit;
    otherwise, or when the caller already initialized one, that is used as it is."""
    dist = torch.distributed
    if torchrun_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current_world()
        return
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: start the "
            "ranks with torchrun (torchrun --nproc-per-node N -m quantmint ...), or unset WORLD_SIZE"
        )
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed: run one process (without torchrun)")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    try:
        yield current_world()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def samples_digest(samples: Sequence[torch.Tensor]) -> str:
    """A digest of calibration token samples (lengths and ids): every rank must hold the same."""
    digest = hashlib.sha256()
    for sample in samples:
        t = sample.detach().to(torch.int64).contiguous().cpu()
        digest.update(str(t.numel()).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
