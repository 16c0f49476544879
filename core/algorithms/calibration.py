"""The sequential calibration engine: one transformer block at a time over the whole calibration set.

1. Run the model on every calibration batch until the first block, capturing that block's inputs
   (hidden states plus whatever else the model passes: masks, rotary embeddings, ...).
2. For each block in order: let the algorithm attach its observers, run the block on every cached
   input, let the algorithm transform the block (smooth, fake-quantize), then hand the block's outputs
   (the float ones, or the quantized block's if the algorithm asks) to the next block.

Only one block's activations are alive at a time: peak memory is the model plus two copies of the
calibration set's hidden states ([n_samples, seq_len, hidden] each), never every layer's activations.
The same engine drives every calibrating algorithm (SmoothQuant, static ranges, C8, block PTQ).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantmint.errors import ConfigError
from quantmint.extension.family import BlockLayout, ModelLayout

__all__ = [
    "BlockCall",
    "CalibrationReport",
    "batch_samples",
    "capture_block_inputs",
    "run_sequential",
    "share_batches",
]


class _StopForward(Exception):
    """Raised by the capture hook to stop the model once the first block's inputs are recorded."""


@dataclass
class BlockCall:
    """One batch's inputs to a block: the hidden states plus the other arguments, reused by every block."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # The batch's place among all calibration batches (in data-parallel calibration this rank holds
    # some of them: `quantmint.algorithms.distributed`).
    index: int = 0
    # The share of that batch's samples this call holds: 1 for a whole batch; block PTQ under N ranks
    # gives each rank some samples of every batch.
    weight: float = 1.0

    def run(self, block: nn.Module) -> torch.Tensor:
        out = block(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def head(self, rows: int) -> BlockCall:
        """This call on its batch's first `rows` samples: the hidden states, and every tensor argument
        whose first dimension is the batch's size, cut to `rows` (anything else passed as it is). An
        argument that only looks batched could make the cut call compute something else: whoever uses
        it checks the cut call's output against the whole call's (see `search_alpha`)."""
        batch = int(self.hidden.shape[0])
        if rows >= batch:
            return self

        def cut(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[:rows] if value.dim() >= 1 and value.shape[0] == batch else value
            if isinstance(value, tuple):
                items = [cut(v) for v in value]
                return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
            if isinstance(value, list):
                return [cut(v) for v in value]
            if isinstance(value, dict):
                return {k: cut(v) for k, v in value.items()}
            return value

        return BlockCall(self.hidden[:rows], cut(self.args), cut(self.kwargs), self.index, self.weight)


@dataclass
class CalibrationReport:
    samples: int = 0
    tokens: int = 0
    blocks: int = 0
    seconds: float = 0.0
    block_seconds: list[float] = field(default_factory=list)


def batch_samples(samples: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack equal-length 1-D token tensors into [batch, seq] int64 batches (order kept within a length)."""
    if not samples:
        raise ConfigError("calibration needs at least one sample")
    by_length: dict[int, list[torch.Tensor]] = {}
    for sample in samples:
        if sample.dim() != 1 or sample.numel() < 2:
            raise ConfigError(
                f"calibration samples are 1-D token tensors of length >= 2, got {tuple(sample.shape)}"
            )
        by_length.setdefault(int(sample.numel()), []).append(sample)
    batches = []
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            batches.append(torch.stack(group[i : i + batch_size]).long())
    return batches


def _check_token_ids(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Refuse token ids the model has no embedding for (an IndexError deep in the forward otherwise)."""
    get = getattr(model, "get_input_embeddings", None)
    size = getattr(get(), "num_embeddings", None) if callable(get) else None
    if not isinstance(size, int) or not batches:
        return
    top = max(int(batch.max()) for batch in batches)
    if top >= size or min(int(batch.min()) for batch in batches) < 0:
        raise ConfigError(
            f"calibration token id {top:,} is outside the model's vocabulary of {size:,} entries: the "
            "samples were tokenized by another model's tokenizer; use this model's own"
        )


def share_batches(batches: list[torch.Tensor], batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """This process's calibration batches, each with its index among `batches`: all of them, or in
    data-parallel calibration every N-th (`quantmint.algorithms.distributed`)."""
    from quantmint.algorithms.distributed import current_world

    world = current_world()
    if len(batches) < world.size:
        raise ConfigError(
            f"{world.size} ranks share {len(batches)} calibration batch(es) of up to {batch_size} samples: "
            f"every rank needs one; give at least {world.size * batch_size} calibration samples or start "
            "fewer ranks"
        )
    return world.share(batches)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, layout: ModelLayout, batches: list[torch.Tensor]
) -> list[BlockCall]:
    """Run `model` on each batch up to its first block and record that block's call."""
    _check_token_ids(model, batches)
    calls: list[BlockCall] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        calls.append(BlockCall(hidden=hidden, args=rest, kwargs=kwargs))
        raise _StopForward

    handle = layout.blocks[0].module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise RuntimeError("the first block was not called for every calibration batch")
    return calls


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    layout: ModelLayout,
    samples: list[torch.Tensor],
    attach: Callable[[BlockLayout], Any],
    finish: Callable[[BlockLayout, Any, list[BlockCall], list[torch.Tensor]], bool],
    batch_size: int = 8,
    desc: str = "calibrate",
    done: Callable[[BlockLayout], None] | None = None,
) -> CalibrationReport:
    """Calibrate `model` block by block (see the module docstring).

    Args:
        samples: 1-D int64 token tensors (equal lengths are batched together).
        attach: called before a block runs; returns whatever it needs later (observers, handles).
        finish: called after the block ran with (block, what `attach` returned, the block's inputs, its
            float outputs); transforms the block in place and returns True if the next block should
            receive the transformed block's outputs instead of the float ones.
        done: called once the block's outputs are taken (out-of-core calibration frees it here).
    """
    start = time.perf_counter()
    batches = batch_samples(samples, batch_size)
    report = CalibrationReport(samples=len(samples), tokens=sum(b.numel() for b in batches))
    mine = share_batches(batches, batch_size)
    calls = capture_block_inputs(model, layout, [batch for _, batch in mine])
    for call, (index, _) in zip(calls, mine, strict=True):
        call.index = index
    for block in tqdm(layout.blocks, desc=desc, unit="block", disable=None):
        t0 = time.perf_counter()
        state = attach(block)
        outputs = [call.run(block.module) for call in calls]
        if finish(block, state, calls, outputs):
            outputs = [call.run(block.module) for call in calls]
        for call, out in zip(calls, outputs, strict=True):
            call.hidden = out
        if done is not None:
            done(block)
        report.block_seconds.append(round(time.perf_counter() - t0, 3))
    report.blocks = len(layout.blocks)
    report.seconds = round(time.perf_counter() - start, 2)
    return report
