"""Block-sequential PTQ (BRECQ-style, as in FMS Model Optimizer): tune each block against its float output.

For each transformer block in order:

1. run the float block on the cached float inputs of every calibration batch, observing what the
   config's other modules need (SmoothQuant statistics, static ranges, K/V scales); its outputs are the
   targets, and the next block's float inputs;
2. smooth and round to nearest as the other algorithms do (`BlockSteps.finish`): the RTN block, whose
   output MSE is the baseline;
3. replace each quantized linear by a `LearnableQuantLinear` and minimise
   `MSE(block_q(x), block_float(x)) / MSE_rtn + round_reg * rounding regulariser` with Adam over
   `n_outer_loops` steps, one calibration batch per step. Learned: AdaRound's soft rounding of every
   weight (annealed to hard 0/1), the weight scales (LSQ-style, in log space, so a scale below the
   MinMax one clips) and, with static activations, the activation scale. With `rounding_method:
   signround` the rounding is AutoRound's instead: an offset in [-0.5, 0.5] before round-to-nearest,
   straight-through gradients, signed steps; it starts at RTN and is never soft;
4. freeze: hard rounding, plain int weights and scales in a `FakeQuantLinear`, so the result is an
   ordinary quantmint model that every backend serves. If the tuned block's MSE is not below RTN's
   (it can happen on a block RTN already gets right), the RTN block is kept; the log says so.

The quantized block's input is the float model's (`inputs: float`) or the output of the already
quantized blocks before it (`inputs: quantized`, BRECQ/QDrop); the target is always the float output.

Memory: the model, one block's optimizer state, and the cached hidden states of the calibration batches
([batch, seq, hidden] per batch, two or three streams), in RAM or as safetensors files on disk with one
batch in RAM at a time (`cache`). With a `work_dir`, every finished block and the inputs of the next
are saved there; a run killed at any point and started again with the same arguments resumes at the
next block and ends with the same tensors, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from quantmint.algorithms.calibration import BlockCall, CalibrationReport, batch_samples, capture_block_inputs
from quantmint.algorithms.rotation import carry_rotation, is_rotated, mark_rotated
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.config import BlockPTQArgs
from quantmint.errors import ConfigError
from quantmint.extension.family import BlockLayout
from quantmint.numerics import quant_math
from quantmint.tools.memory import available_memory_bytes

if TYPE_CHECKING:
    from collections.abc import Iterable

    from quantmint.algorithms.ptq import BlockSteps

__all__ = ["BlockPTQ", "HiddenStore", "LearnableQuantLinear", "block_loss"]

# AdaRound's rectified sigmoid h(v) = clamp(sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1).
_ZETA, _GAMMA = 1.1, -0.1
PROGRESS_NAME = "progress.json"


class LearnableQuantLinear(nn.Module):
    """The training-time twin of a `FakeQuantLinear`: learned rounding and scales.

    `w_q = s * clamp(floor(W / s_rtn) + h(v), qmin, qmax)`: AdaRound's soft rounding `h(v)` in [0, 1]
    (initialised so that `h(v) = frac(W / s_rtn)`) chooses, for every weight, the RTN grid point below
    or above it; `s = s_rtn * exp(log_scale)` ([rows or 1, groups], as the weight scale) is learned as
    a step size (LSQ). Keeping the integer grid of `s_rtn` fixed stops a changing scale from moving
    weights between rounding variables. Activations are int8-rounded as the cell will (per token, or
    per tensor with `a = a_rtn * exp(log_act_scale)` learned), with straight-through gradients.
    """

    def __init__(
        self, weight: torch.Tensor, rtn: FakeQuantLinear, num_bits: int, method: str = "adaround"
    ) -> None:
        super().__init__()
        w = weight.detach().float()
        self.register_buffer("w", w)
        self.bias = None if rtn.bias is None else nn.Parameter(rtn.bias.detach().float(), requires_grad=False)
        self.register_buffer("s_rtn", rtn.weight_scale.detach().float())
        self.log_scale = nn.Parameter(torch.zeros_like(self.s_rtn))
        self.group_size = rtn.group_size
        self.method = method
        x = w / quant_math.expand_weight_scale(self.s_rtn, w.shape, self.group_size)
        if method == "signround":  # round(x + V), V in [-0.5, 0.5] from 0: RTN's grid point or a neighbour
            self.register_buffer("w_grid", x)
            self.rounding = nn.Parameter(torch.zeros_like(x))
        else:
            self.register_buffer("w_floor", torch.floor(x))
            frac = (x - self.w_floor).clamp(0.01, 0.99)
            self.rounding = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1))
        self.qmin, self.qmax = quant_math.int_range(num_bits)
        self.quantize_input = rtn.quantize_input
        self.log_act_scale: nn.Parameter | None = None
        if rtn.quantize_input and rtn.input_scale is not None:
            self.register_buffer("a_rtn", rtn.input_scale.detach().float().reshape(()))
            self.log_act_scale = nn.Parameter(torch.zeros(()))
        self.rtn = rtn
        self.hard = False

    def soft_rounding(self) -> torch.Tensor:
        return (torch.sigmoid(self.rounding) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)

    def weight_scale(self) -> torch.Tensor:
        return self.s_rtn * torch.exp(self.log_scale)

    def int_weight(self) -> torch.Tensor:
        """The weight on the int grid (float dtype) and, when hard, exactly what is frozen."""
        if self.method == "signround":  # always hard; the gradient passes the rounding straight through
            x = self.w_grid + self.rounding
            return torch.clamp(x + (torch.round(x) - x).detach(), self.qmin, self.qmax)
        up = (self.rounding >= 0).float() if self.hard else self.soft_rounding()
        return torch.clamp(self.w_floor + up, self.qmin, self.qmax)

    def act_scale(self) -> torch.Tensor | None:
        if self.log_act_scale is None:
            return None
        return self.a_rtn * torch.exp(self.log_act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.quantize_input:  # the int8 activation rounding, with gradients straight through it
            q, scale = quant_math.quantize_activation(x, self.act_scale(), torch.float32, ste=True)
            x = q * scale
        s = quant_math.expand_weight_scale(self.weight_scale(), self.w.shape, self.group_size)
        return F.linear(x, self.int_weight() * s, self.bias).to(dtype)

    def rounding_regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound's sum of 1 - |2h - 1|^beta: zero once every h is 0 or 1."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def freeze(self, dtype: torch.dtype) -> FakeQuantLinear:
        self.hard = True
        q = self.int_weight()
        scale = self.weight_scale().detach()
        act = self.act_scale()
        return FakeQuantLinear(
            weight=quant_math.dequantize_weight(q, scale, dtype, self.group_size),
            bias=None if self.rtn.bias is None else self.rtn.bias.detach().clone(),
            weight_scale=scale,
            scheme=self.rtn.scheme,
            source_type=self.rtn.source_type,
            quantize_input=self.quantize_input,
            input_scale=None if act is None else act.detach().reshape(1),
            group_size=self.group_size,
        )


class HiddenStore:
    """One stream of hidden states, one tensor [batch, seq, hidden] per calibration batch, kept in RAM
    or as one safetensors file per batch in `directory` (read back one batch at a time)."""

    def __init__(self, directory: Path | None = None, prefix: str = "h") -> None:
        self.directory = directory
        self.prefix = prefix
        self._memory: dict[int, torch.Tensor] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{self.prefix}-{index:05d}.safetensors"

    def put(self, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous()
        if self.directory is None:
            self._memory[index] = tensor
        else:
            save_file({"hidden": tensor}, str(self._path(index)))

    def get(self, index: int) -> torch.Tensor:
        if self.directory is None:
            return self._memory[index]
        return load_file(str(self._path(index)))["hidden"]

    def discard(self, count: int) -> None:
        """Forget batches 0 .. count - 1 (a scratch stream's files are deleted)."""
        for i in range(count):
            if self.directory is None:
                self._memory.pop(i, None)
            else:
                self._path(i).unlink(missing_ok=True)

    def save_to(self, directory: Path, count: int) -> None:
        """Write every batch into `directory` (the resume point of the next block)."""
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            target = directory / f"{self.prefix}-{i:05d}.safetensors"
            if self.directory is not None:
                shutil.copyfile(self._path(i), target)
            else:
                save_file({"hidden": self._memory[i]}, str(target))


def _fingerprint(steps: BlockSteps, samples: list[torch.Tensor]) -> str:
    """What a resumed run must share with the first one: the recipe (every step's config, in order),
    the linears it quantizes, model structure, the float weights and calibration data.

    The weights are hashed by content (every parameter's name, dtype, shape and bytes, as the model
    holds them before any block is tuned): two checkpoints with one config but other weights must not
    share a work directory. Out of core (`--stream`) a block's parameters are still on `meta` here and
    are read from the checkpoint one tensor at a time, as the block loader will read them, so both
    paths hash the same bytes. Cost: one sha256 pass over the weights (about 1 GB/s with SHA-NI; 0.3 s
    for SmolLM2-135M), small beside tuning a single block.
    """
    digest = hashlib.sha256()
    for step in steps.ptq.recipe:
        digest.update(json.dumps([step.name, step.model_dump(mode="json")], sort_keys=True).encode())
    digest.update(json.dumps([sorted(steps.targets), sorted(steps.state.rotated)]).encode())
    digest.update(type(steps.model).__name__.encode())
    config = getattr(steps.model, "config", None)
    if config is not None:  # not its path: the same model may be read from another place
        digest.update(
            json.dumps(
                {k: v for k, v in config.to_dict().items() if k != "_name_or_path"},
                sort_keys=True,
                default=str,
            ).encode()
        )
    for sample in samples:
        digest.update(sample.to(torch.int64).numpy().tobytes())
    source = getattr(
        steps.loader, "source", None
    )  # out of core: see `quantmint.algorithms.streaming.BlockLoader`
    for name, param in steps.model.named_parameters():
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}".encode())
        tensor = param.detach()
        if tensor.is_meta:
            if source is None:
                raise ConfigError(f"parameter {name!r} has no data (meta): load the model's weights first")
            tensor = source.read(name, param)
        _hash_tensor(digest, tensor)
    return digest.hexdigest()


def block_loss(out: torch.Tensor, ref: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """A block's reconstruction error against its float output `ref` (`BlockPTQArgs.loss`), in float32.

    "mse": the mean squared error over every element. "token_relative": each token's mean squared error
    divided by the mean square of its float output (the last dimension is the hidden size), averaged over
    the tokens: the first-order error that the next normalisation (RMSNorm or LayerNorm) passes on, where
    a token's scale is divided out. "mse+token_relative": the sum of the whole output's relative squared
    error (the mean squared error over the mean square, which the tokens of largest norm decide) and the
    token-relative error. A token's mean square is floored at float32's epsilon times the batch's mean,
    and a batch whose float output is all zeros gets the plain mean squared error, so neither divides by
    zero. Under torchrun each rank divides the whole-output term by its own share's mean square.
    """
    out, ref = out.float(), ref.float()
    if kind == "mse":
        return F.mse_loss(out, ref)
    if kind not in ("token_relative", "mse+token_relative"):
        raise ConfigError(f"block_ptq.loss {kind!r}: use mse, token_relative or mse+token_relative")
    err = (out - ref).pow(2).mean(dim=-1)
    power = ref.pow(2).mean(dim=-1)
    mean = power.mean()
    if not float(mean) > 0:  # a float output of zeros only: no scale to divide out
        return err.mean()
    relative = (err / power.clamp_min(mean * torch.finfo(torch.float32).eps)).mean()
    if kind == "token_relative":
        return relative
    return err.mean() / mean + relative


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Feed a CPU tensor's bytes to `digest` without a copy when it is contiguous."""
    flat = tensor.contiguous().reshape(-1)
    if flat.numel():
        digest.update(memoryview(flat.view(torch.uint8).numpy()))


class BlockPTQ:
    """Runs block-sequential PTQ over a model (see the module docstring)."""

    def __init__(
        self, args: BlockPTQArgs, steps: BlockSteps, work_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.args = args
        self.steps = steps
        self.work_dir = None if work_dir is None else Path(work_dir)
        self.log: list[dict[str, Any]] = []
        self._stop: dict[str, Any] = {}  # the last block's step count and, with early_stop, its checks
        self._loss = args.loss  # the block's measure (`loss: auto` resolved per block, see `_tune_block`)
        self.weights: list[float] = []  # each calibration batch's share on this rank (see `_share`)

    # --- the whole model ------------------------------------------------------------------------
    def run(self, samples: list[torch.Tensor]) -> CalibrationReport:
        start = time.perf_counter()
        args, steps = self.args, self.steps
        batches = batch_samples(samples, args.batch_size)
        if len(batches) > args.n_batches:
            batches = batches[: args.n_batches]
        calls = capture_block_inputs(steps.model, steps.layout, self._share(batches))
        for i, call in enumerate(calls):
            call.index = i
            call.weight = self.weights[i]
        streams = 3 if args.inputs == "quantized" else 2
        cache_bytes = streams * sum(c.hidden.numel() * c.hidden.element_size() for c in calls)
        on_disk = args.cache == "disk" or (
            args.cache == "auto" and cache_bytes > available_memory_bytes() // 4
        )
        report = CalibrationReport(
            samples=sum(len(b) for b in batches), tokens=sum(b.numel() for b in batches)
        )

        with contextlib.ExitStack() as stack:
            scratch = self.work_dir
            if scratch is None and on_disk:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quantmint-ptq-")))
            first = self._resume(samples, calls) if self.work_dir is not None else 0
            first_dir = None if scratch is None or not on_disk else scratch / f"inputs-{first:05d}"
            fp_in = HiddenStore(first_dir, "fp")
            q_in = HiddenStore(first_dir, "q") if args.inputs == "quantized" else fp_in
            if first == 0:
                for i, call in enumerate(calls):
                    fp_in.put(i, call.hidden)
                    if q_in is not fp_in:
                        q_in.put(i, call.hidden)
            else:
                assert self.work_dir is not None
                fp_in = HiddenStore(self.work_dir / f"inputs-{first:05d}", "fp")
                q_in = fp_in if args.inputs == "float" else HiddenStore(fp_in.directory, "q")
            for call in calls:
                call.hidden = torch.empty(0)  # the stores own the hidden states from here on

            blocks = steps.layout.blocks
            bar = tqdm(blocks, desc="block PTQ", unit="block", initial=first, disable=None)
            for block in blocks[first:]:
                t0 = time.perf_counter()
                out_dir = None if scratch is None else scratch / f".inputs-{block.index + 1:05d}.tmp"
                if out_dir is not None:
                    shutil.rmtree(out_dir, ignore_errors=True)
                fp_out = HiddenStore(out_dir if on_disk else None, "fp")
                q_out = fp_out if q_in is fp_in else HiddenStore(out_dir if on_disk else None, "q")
                entry = self._tune_block(block, calls, fp_in, q_in, fp_out, q_out)
                entry["seconds"] = round(time.perf_counter() - t0, 2)
                self.log.append(entry)
                report.block_seconds.append(entry["seconds"])
                bar.set_postfix(
                    rtn=f"{entry['rtn_mse']:.3g}", ptq=f"{entry['ptq_mse']:.3g}", kept=entry["kept"]
                )
                bar.update(1)
                if self.work_dir is not None:
                    assert out_dir is not None
                    saved = self._checkpoint(block, fp_out, q_out, len(calls), out_dir, on_disk)
                    if on_disk:  # the files moved: read them from their new place
                        fp_out = HiddenStore(saved, "fp")
                        q_out = fp_out if q_out is fp_out else HiddenStore(saved, "q")
                elif on_disk and fp_in.directory is not None:
                    shutil.rmtree(fp_in.directory, ignore_errors=True)
                steps.done(block)
                fp_in, q_in = fp_out, q_out
            bar.close()
        report.blocks = len(steps.layout.blocks)
        report.seconds = round(time.perf_counter() - start, 2)
        steps.extra["block_ptq"] = {
            "inputs": args.inputs,
            "cache": "disk" if on_disk else "memory",
            "cache_bytes": cache_bytes,
            "batches": len(calls),
            "steps_per_block": args.n_outer_loops,  # with early_stop a ceiling: each block logs its steps
            "resumed_at_block": first if first else None,
            "blocks": self.log,
        }
        if args.early_stop:  # logged only when on: the records of runs without it keep their bytes
            steps.extra["block_ptq"]["early_stop"] = True
        return report

    def _share(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's part of every batch. One process: the batches. N ranks (data-parallel, under
        torchrun): samples r, r + N, ... of every batch, so that each tuning step takes the batch that
        one process takes, its loss and gradient summed over the ranks weighted by their shares
        (`self.weights`), and the ranks tune the same block, equal to one process's up to float sums."""
        world = self.steps.world
        self.weights = [1.0] * len(batches)
        if not world.distributed:
            return batches
        small = min(len(batch) for batch in batches)
        if small < world.size:
            raise ConfigError(
                f"block_ptq on {world.size} ranks shares every calibration batch's samples among them, and a "
                f"batch holds {small}: set block_ptq.batch_size to at least {world.size} and give a multiple "
                "of it as calibration samples, or start fewer ranks"
            )
        if self.work_dir is not None:
            if world.is_main:
                message = f"block PTQ: {world.size} ranks keep no resume state in {self.work_dir}"
                print(message, file=sys.stderr)
            self.work_dir = None
        self.weights = [len(batch[world.rank :: world.size]) / len(batch) for batch in batches]
        return [batch[world.rank :: world.size] for batch in batches]

    def _all_sum(self, values: list[float]) -> list[float]:
        """`values` summed over the ranks (float64; as they are in one process)."""
        if not self.steps.world.distributed:
            return values
        return self.steps.world.sum_(torch.tensor(values, dtype=torch.float64)).tolist()

    # --- one block ------------------------------------------------------------------------------
    def _tune_block(
        self,
        block: BlockLayout,
        calls: list[BlockCall],
        fp_in: HiddenStore,
        q_in: HiddenStore,
        fp_out: HiddenStore,
        q_out: HiddenStore,
    ) -> dict[str, Any]:
        steps = self.steps
        n = len(calls)

        def call_with(i: int, hidden: torch.Tensor) -> BlockCall:
            call = calls[i]
            return BlockCall(hidden, call.args, call.kwargs, index=call.index, weight=call.weight)

        # 1. float pass: targets, and the statistics smoothing / static ranges / C8 need.
        attached = steps.attach(block)
        for i in range(n):
            fp_out.put(i, call_with(i, fp_in.get(i)).run(block.module))
        wanted = steps.calibration_calls  # what the recipe's `before_round` steps read (None: all)
        search = n if wanted is None else min(n, wanted)
        search_calls = [call_with(i, fp_in.get(i)) for i in range(search)]
        # 2. smoothing, RTN fake-quantization, kv scales.
        steps.finish(block, attached, search_calls, [fp_out.get(i) for i in range(search)], observed=n)
        del search_calls

        rel = {name: name[len(block.name) + 1 :] for name in block.linears if name in steps.targets}
        rtn = {name: block.module.get_submodule(r) for name, r in rel.items()}
        self._loss = self.block_loss_kind(self.args.loss, rtn.values())
        # RTN's and the tuned block's MSE (which decide the block kept) on the first `compared` batches;
        # with `inputs: quantized` the outputs they compute are the kept block's outputs there, so they
        # are stored (RTN's straight into q_out) and not computed again.
        compared = min(n, self.args.compare_batches) if self.args.compare_batches else n
        writing = q_out is not fp_out
        rtn_mse = self._mse(block, call_with, q_in, fp_out, compared, q_out if writing else None)
        entry: dict[str, Any] = {"block": block.index, "name": block.name, "rtn_mse": rtn_mse}
        if self.args.loss == "auto":
            entry["loss"] = self._loss
        if not rel:
            entry.update(ptq_mse=rtn_mse, kept="rtn", loss_start=None, loss_end=None)
            self._write_outputs(block, call_with, q_in, q_out, fp_out, n, compared)
            return entry

        # 3. learnable twins of the RTN layers, tuned against the float outputs.
        dtype = next(iter(rtn.values())).weight.dtype
        rounding = steps.ptq.rounding
        assert rounding is not None  # the recipe rounds weights: the targets are not empty
        num_bits = rounding.num_bits
        adapter = steps.family.adapter
        learnables = {
            name: LearnableQuantLinear(
                adapter.weight(block.linears[name]), rtn[name], num_bits, self.args.rounding_method
            )
            for name in rel
        }
        for name, module in learnables.items():
            block.module.set_submodule(rel[name], carry_rotation(block.linears[name], module))
        losses = self._optimise(block, learnables, call_with, q_in, fp_out, n, rtn_mse)

        # 4. freeze, compare with RTN, keep the better block.
        for name, module in learnables.items():
            block.module.set_submodule(rel[name], carry_rotation(module, module.freeze(dtype)))
        tuned = HiddenStore(q_out.directory, "tuned") if writing else None
        ptq_mse = self._mse(block, call_with, q_in, fp_out, compared, tuned)
        kept = "ptq"
        if not ptq_mse < rtn_mse:
            kept = "rtn"
            for name, module in rtn.items():
                block.module.set_submodule(rel[name], module)
        if tuned is not None:
            if kept == "ptq":
                for i in range(compared):
                    q_out.put(i, tuned.get(i))
            tuned.discard(compared)
        entry.update(ptq_mse=ptq_mse, kept=kept, loss_start=losses[0], loss_end=losses[-1], **self._stop)
        self._write_outputs(block, call_with, q_in, q_out, fp_out, n, compared)
        return entry

    @staticmethod
    def block_loss_kind(loss: str, linears: Iterable[nn.Module]) -> str:
        """The measure a block is tuned and kept by: `loss`, or for "auto" "token_relative" where one of
        the block's linears has its input rotated (`algorithm_args.hadamard`) and "mse+token_relative"
        where none has. Measured on SmolLM2 W8A8 (docs/benchmarks.md, "The w8a8-ptq preset"): with the
        rotation the token-relative error alone tunes best (+0.02%); without it, the attention-sink
        token's error that only the whole-output term counts must stay in the loss (+0.23% against
        token_relative's +0.72%)."""
        if loss != "auto":
            return loss
        return "token_relative" if any(is_rotated(m) for m in linears) else "mse+token_relative"

    def _optimise(
        self,
        block: BlockLayout,
        learnables: dict[str, LearnableQuantLinear],
        call_with: Any,
        q_in: HiddenStore,
        fp_out: HiddenStore,
        n: int,
        rtn_mse: float,
    ) -> list[float]:
        args = self.args
        total = args.n_outer_loops
        groups = [
            ("W", [m.rounding for m in learnables.values()], args.lr_weight),
            ("W", [m.log_scale for m in learnables.values()], args.lr_weight_clip),
            (
                "A",
                [m.log_act_scale for m in learnables.values() if m.log_act_scale is not None],
                args.lr_act_clip,
            ),
        ]
        groups = [(kind, params, lr) for kind, params, lr in groups if params and lr > 0]
        frozen = [p for p in block.module.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for _, params, _ in groups:
            for p in params:
                p.requires_grad_(True)
        signround = args.rounding_method == "signround"
        if signround:  # the rounding offsets take signed steps; the scales keep Adam
            step_size = args.sign_lr or 1.0 / total
            groups[0] = (groups[0][0], groups[0][1], step_size)
        world = self.steps.world
        trained = [p for _, params, _ in groups for p in params]
        warmup = int(args.warmup_ratio * total)

        def schedule(kind: str) -> Any:
            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                if kind not in args.cosine_lr:
                    return 1.0
                return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

            return factor

        # One optimizer, or with SignRound two: signed steps for the rounding group (always first), Adam
        # for the scales (when any scale learns).
        parts = [part for part in ([groups[:1], groups[1:]] if signround else [groups]) if part]
        optimizers = [
            (_SignRoundSGD if signround and k == 0 else torch.optim.Adam)(
                [{"params": params, "lr": lr} for _, params, lr in part]
            )
            for k, part in enumerate(parts)
        ]
        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(kind) for kind, _, _ in part])
            for optimizer, part in zip(optimizers, parts, strict=True)
        ]
        generator = torch.Generator().manual_seed(args.seed * 100_003 + block.index)
        # Early stop: train on the first batches, check the hardened block on the last `held` ones (on
        # every batch when there is only one: then the check is not held out, and the log says so).
        held = min(args.holdout_batches, n - 1) if args.early_stop else 0
        train = n - held
        check = list(range(train, n)) if held else list(range(n))
        order: list[int] = []
        reg_start = int(args.round_reg_warmup * total)
        n_round = sum(m.rounding.numel() for m in learnables.values())
        norm = rtn_mse if rtn_mse > 0 else 1.0
        losses: list[float] = []
        stop: dict[str, Any] = {}
        if args.early_stop:
            best_mse = self._hard_mse(block, learnables, call_with, q_in, fp_out, check)
            best_state = self._learned_state(learnables)
            stop = {"holdout": held, "best_step": 0, "checks": [round(best_mse / norm, 6)]}
            since_best = 0
        with (
            torch.enable_grad(),
            tqdm(range(total), desc=f"  {block.name}", leave=False, disable=None) as bar,
        ):
            for step in bar:
                if not order:
                    order = torch.randperm(train, generator=generator).tolist()
                i = order.pop()
                out = call_with(i, q_in.get(i)).run(block.module)
                rec = block_loss(out, fp_out.get(i), self._loss) / norm
                loss = rec
                if world.distributed:  # this rank's share of the batch's loss (its gradients are summed)
                    rec = rec * self.weights[i]
                    loss = rec
                if step >= reg_start and args.round_reg > 0 and not signround:
                    progress = (step - reg_start) / max(1, total - reg_start)
                    beta = args.beta_end + (args.beta_start - args.beta_end) * (1 - progress)
                    reg = sum(m.rounding_regulariser(beta) for m in learnables.values()) / n_round
                    loss = rec + args.round_reg * reg / world.size  # once over the ranks' sum
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                rec_value = float(rec.detach())
                if world.distributed:
                    rec_value = _sum_gradients(world, trained, rec_value)
                for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                    optimizer.step()
                    scheduler.step()
                losses.append(round(rec_value, 6))
                if step % 10 == 0:
                    bar.set_postfix(rec=f"{losses[-1]:.4f}")
                if args.early_stop and ((step + 1) % args.eval_every == 0 or step + 1 == total):
                    mse = self._hard_mse(block, learnables, call_with, q_in, fp_out, check)
                    stop["checks"].append(round(mse / norm, 6))
                    if mse < best_mse:
                        best_mse, best_state, since_best = mse, self._learned_state(learnables), 0
                        stop["best_step"] = step + 1
                    else:
                        since_best += 1
                        if since_best >= args.patience:
                            break
        if args.early_stop:  # the best state seen, step 0 (RTN's rounding and scales) included
            with torch.no_grad():
                for (module, attr), value in best_state.items():
                    getattr(module, attr).copy_(value)
        for _, params, _ in groups:
            for p in params:
                p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        # Each block's steps, best step and checks; nothing new without early stop (the log keeps its bytes).
        self._stop = stop | {"steps": len(losses)} if args.early_stop else {}
        return losses

    @staticmethod
    def _learned_state(
        learnables: dict[str, LearnableQuantLinear],
    ) -> dict[tuple[nn.Module, str], torch.Tensor]:
        """A copy of what tuning changes: the rounding variables and the weight and activation scales."""
        state = {}
        for module in learnables.values():
            for attr in ("rounding", "log_scale", "log_act_scale"):
                value = getattr(module, attr)
                if value is not None:
                    state[(module, attr)] = value.detach().clone()
        return state

    @torch.no_grad()
    def _hard_mse(
        self,
        block: BlockLayout,
        learnables: dict[str, LearnableQuantLinear],
        call_with: Any,
        q_in: HiddenStore,
        fp_out: HiddenStore,
        batches: list[int],
    ) -> float:
        """Mean output MSE over `batches` of the block with its rounding hardened, as `freeze` will."""
        for module in learnables.values():
            module.hard = True
        try:
            total = 0.0
            for i in batches:
                out = call_with(i, q_in.get(i)).run(block.module)
                total += self.weights[i] * float(block_loss(out, fp_out.get(i), self._loss))
        finally:
            for module in learnables.values():
                module.hard = False
        return self._all_sum([total])[0] / len(batches)

    @torch.no_grad()
    def _mse(
        self,
        block: BlockLayout,
        call_with: Any,
        q_in: HiddenStore,
        fp_out: HiddenStore,
        n: int,
        outputs: HiddenStore | None = None,
    ) -> float:
        """Mean over the first `n` calibration batches of the block output's MSE against the float output;
        the block's outputs go into `outputs` when given."""
        total = 0.0
        for i in range(n):
            out = call_with(i, q_in.get(i)).run(block.module)
            total += self.weights[i] * float(block_loss(out, fp_out.get(i), self._loss))
            if outputs is not None:
                outputs.put(i, out)
        return self._all_sum([total])[0] / n

    @torch.no_grad()
    def _write_outputs(
        self,
        block: BlockLayout,
        call_with: Any,
        q_in: HiddenStore,
        q_out: HiddenStore,
        fp_out: HiddenStore,
        n: int,
        first: int = 0,
    ) -> None:
        """The quantized block's outputs: the next block's inputs when `inputs: quantized` (from batch
        `first` on: the comparison stored the ones before)."""
        if q_out is fp_out:
            return
        for i in range(first, n):
            q_out.put(i, call_with(i, q_in.get(i)).run(block.module))

    # --- resuming -------------------------------------------------------------------------------
    def _checkpoint(
        self,
        block: BlockLayout,
        fp_out: HiddenStore,
        q_out: HiddenStore,
        count: int,
        out_dir: Path | None,
        on_disk: bool,
    ) -> Path:
        """Save the tuned block and the next block's inputs, then move the resume point past it;
        returns the directory that now holds those inputs."""
        assert self.work_dir is not None and out_dir is not None
        work = self.work_dir
        state = {k: v.detach().contiguous() for k, v in block.module.state_dict().items()}
        block_file = work / f"block-{block.index:05d}.safetensors"
        save_file(state, str(block_file.with_suffix(".tmp")))
        os.replace(block_file.with_suffix(".tmp"), block_file)
        if not on_disk:
            fp_out.save_to(out_dir, count)
            if q_out is not fp_out:
                q_out.save_to(out_dir, count)
        next_inputs = work / f"inputs-{block.index + 1:05d}"
        shutil.rmtree(next_inputs, ignore_errors=True)
        os.replace(out_dir, next_inputs)
        # From here a restart resumes at the next block: the progress file is the commit point.
        progress = self._read_progress()
        progress.update(
            next_block=block.index + 1,
            log=self.log,
            modules={
                name: _linear_record(block.module.get_submodule(name[len(block.name) + 1 :]))
                for name in block.linears
                if name in self.steps.targets
            }
            | progress.get("modules", {}),
            kv_modules=list(self.steps.state.kv_modules),
            alphas=list(self.steps.alphas),
        )
        _write_json(work / PROGRESS_NAME, progress)
        shutil.rmtree(work / f"inputs-{block.index:05d}", ignore_errors=True)
        return next_inputs

    def _read_progress(self) -> dict[str, Any]:
        assert self.work_dir is not None
        path = self.work_dir / PROGRESS_NAME
        return json.loads(path.read_text()) if path.exists() else {}

    def _clear_work_dir(self) -> None:
        """Remove what a block-PTQ run writes in its work directory, and nothing else."""
        assert self.work_dir is not None
        for entry in self.work_dir.iterdir():
            name = entry.name
            ours = name in (PROGRESS_NAME, "progress.tmp") or name.startswith(
                ("block-", "inputs-", ".inputs-")
            )
            if not ours:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _resume(self, samples: list[torch.Tensor], calls: list[BlockCall]) -> int:
        """Load the blocks a previous run finished; returns the index of the first block left to tune."""
        assert self.work_dir is not None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(self.steps, samples)
        progress = self._read_progress()
        if not progress:
            _write_json(self.work_dir / PROGRESS_NAME, {"fingerprint": fingerprint, "next_block": 0})
            return 0
        if progress.get("fingerprint") != fingerprint:
            # A stale run of another model, config or calibration set (the CLI's default work directory
            # follows -o, so a new model quantized to the same output lands here): nothing of it can be
            # used, and the user asked for this run. Start afresh, and say so; never resume it.
            print(
                f"block PTQ: {self.work_dir} holds a run of another model, config or calibration set; "
                "discarding it and starting from block 0",
                file=sys.stderr,
            )
            self._clear_work_dir()
            _write_json(self.work_dir / PROGRESS_NAME, {"fingerprint": fingerprint, "next_block": 0})
            return 0
        first = int(progress.get("next_block", 0))
        if first == 0:
            return 0
        steps = self.steps
        records = progress["modules"]
        for block in steps.layout.blocks[:first]:
            tensors = load_file(str(self.work_dir / f"block-{block.index:05d}.safetensors"))
            for name in block.linears:
                if name not in steps.targets:
                    continue
                rel = name[len(block.name) + 1 :]
                linear = _linear_from_record(records[name], tensors, rel)
                block.module.set_submodule(
                    rel, mark_rotated(linear) if name in steps.ptq._rotated else linear
                )
                steps.state.modules[name] = records[name]["scheme"]
            for key in [k for k in tensors if k.endswith((".k_scale", ".v_scale"))]:
                owner, buffer = key.rsplit(".", 1)
                block.module.get_submodule(owner).register_buffer(buffer, tensors[key])
            block.module.load_state_dict(tensors, strict=True, assign=True)
            steps.done(block)
        steps.state.kv_modules[:] = progress.get("kv_modules", [])
        steps.alphas[:] = progress.get("alphas", [])
        self.log = list(progress.get("log", []))
        tqdm.write(
            f"block PTQ: resuming at block {first} of {len(steps.layout.blocks)} from {self.work_dir}",
            file=sys.stderr,
        )
        return first


class _SignRoundSGD(torch.optim.Optimizer):
    """SignRound's update of the rounding offsets: `V -= lr * sign(grad)`, then V clamped to
    [-0.5, 0.5], so that round(x + V) stays on RTN's grid point or its neighbour towards x."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"]).clamp_(-0.5, 0.5)


def _sum_gradients(world: Any, params: list[nn.Parameter], value: float) -> float:
    """Data-parallel tuning: every rank's gradients of `params` summed into each rank's, in one
    all-reduce that also sums `value` (the ranks' shares of the step's loss); returns that sum."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([value])])
    world.sum_(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].reshape(g.shape).to(g.dtype)
        offset += g.numel()
    return float(flat[-1])


def _linear_record(module: nn.Module) -> dict[str, Any]:
    assert isinstance(module, FakeQuantLinear)
    return {
        "scheme": module.scheme,
        "source_type": module.source_type,
        "quantize_input": module.quantize_input,
        "group_size": module.group_size,
    }


def _linear_from_record(
    record: dict[str, Any], tensors: dict[str, torch.Tensor], rel: str
) -> FakeQuantLinear:
    return FakeQuantLinear(
        weight=tensors[f"{rel}.weight"],
        bias=tensors.get(f"{rel}.bias"),
        weight_scale=tensors[f"{rel}.weight_scale"],
        scheme=record["scheme"],
        source_type=record["source_type"],
        quantize_input=record["quantize_input"],
        input_scale=tensors.get(f"{rel}.input_scale"),
        group_size=record["group_size"],
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
