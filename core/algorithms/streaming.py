"""Quantizing a checkpoint without ever holding the model: for checkpoints larger than memory.

Two paths, chosen by the config, both reading the float checkpoint's safetensors files one tensor
at a time (`quantmint.formats.safetensors_io`) and writing the same checkpoint, byte for byte, as
`quantize` + `save_quantized` on the loaded model:

- **Streaming RTN** (configs that need no calibration data): the model's structure is built on the
  `meta` device (no weights), the output tensors are planned from it, and each output shard is
  written as its tensors are produced: a quantized linear is read, rounded and converted on its own
  (a plain per-channel weight is rounded a chunk of rows at a time as it is read:
  `native_rtn.quantize_weight_from_file`); every other tensor is copied. Peak memory is the largest
  linear plus a constant. Under torchrun the ranks share the output shards, rank 0 writing the index
  and manifest (`quantmint.algorithms.distributed`).
- **Out-of-core calibration** (SmoothQuant, static activations, C8, block PTQ): the skeleton's
  embeddings, final norm and head are read in, every block stays on `meta`, and the sequential
  engine (`quantmint.algorithms.calibration`, or block PTQ's) reads one block's weights when it reaches it.
  A finished block is converted to its int8 cells, written to a block store on disk and moved back
  to `meta`. Peak memory is one block, the non-block weights and the calibration activations (which
  block PTQ can keep on disk: `block_ptq.cache`).

`quantize_checkpoint` is the entry point (CLI: `quantmint quantize --stream`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantmint.algorithms.base import per_block_steps
from quantmint.algorithms.distributed import World, current_world
from quantmint.algorithms.ptq import PTQ, as_config, cell_class, quant_state
from quantmint.algorithms.rotation import carry_rotation
from quantmint.config import PTQConfig
from quantmint.errors import CheckpointError, ConfigError, NotSupportedError, QuantmintError
from quantmint.extension.family import BlockLayout
from quantmint.formats import checkpoint
from quantmint.formats.checkpoint import write_shard
from quantmint.formats.hf import build_skeleton, model_class, read_config_json, staged_directory
from quantmint.formats.safetensors_io import (
    CheckpointFiles,
    ReadArena,
    SafetensorsFile,
    ShardWriter,
    TensorSpec,
)
from quantmint.io.outdir import output_errors, prepare_output, staging_prefix
from quantmint.numerics import native_rtn
from quantmint.tools.memory import peak_rss_mb

__all__ = ["BlockLoader", "BlockStore", "TensorSource", "empty_model", "quantize_checkpoint"]


# --- the skeleton -------------------------------------------------------------------------------------
def _checkpoint_dtype(config: dict[str, Any], files: CheckpointFiles) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` would load: config.json's, else the first float tensor's."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    for tensor in files:
        dtype = files.spec(tensor).dtype
        if dtype.is_floating_point:
            return dtype
    return torch.float32


def empty_model(path: str | os.PathLike[str]) -> tuple[nn.Module, CheckpointFiles]:
    """The float model of a Hugging Face directory with every parameter on `meta`, and its weights.

    The skeleton is the class, config, dtype and generation config that `load_float_model` would give,
    with no weight in memory.
    """
    import transformers

    path = Path(path)
    raw = read_config_json(path)
    if raw.get("quantization_config"):
        raise QuantmintError(
            f"{path} is already quantized (quant_method={raw['quantization_config'].get('quant_method')!r}); "
            "quantmint quantizes float checkpoints"
        )
    files = CheckpointFiles(path)
    model_cls = model_class(raw.get("architectures"), path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises several types for a bad config
        raise QuantmintError(f"{path}/config.json cannot be read by transformers: {exc}") from None
    dtype = _checkpoint_dtype(raw, files)
    model = build_skeleton(model_cls, config, dtype, on_meta=True, tie_weights=True)
    config.name_or_path = str(path)
    if getattr(model, "can_generate", lambda: False)() and (path / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    model.requires_grad_(False)
    return model.eval(), files


class TensorSource:
    """Finds a model tensor in the checkpoint, allowing for the base-model prefix that Hugging Face
    checkpoints add or drop (`bert.encoder...` vs `encoder...`), and reads it in the model's dtype."""

    def __init__(self, model: nn.Module, files: CheckpointFiles) -> None:
        self.files = files
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        # Tied parameters (an untied head is stored, a tied one often not): every name of one tensor.
        self._names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(param), []).append(name)

    def locate(self, name: str) -> str | None:
        candidates = [name]
        if self.prefix:
            candidates += [f"{self.prefix}.{name}", name.removeprefix(f"{self.prefix}.")]
        return next((c for c in candidates if c in self.files), None)

    def read(self, name: str, like: torch.Tensor, arena: ReadArena | None = None) -> torch.Tensor:
        """The checkpoint's tensor for model tensor `name` (or a tied twin), cast to `like`'s dtype
        (read into `arena` when one is given; see `ReadArena`)."""
        names = self._names.get(id(like), [name]) if isinstance(like, nn.Parameter) else [name]
        found = next((n for n in (self.locate(c) for c in [name, *names]) if n is not None), None)
        if found is None:
            raise CheckpointError(
                f"{self.files.directory} holds no tensor {name!r} (nor a prefixed or tied variant): its "
                "tensor names do not match the model class its config.json names; quantize it without "
                "--stream, which lets transformers rename the weights"
            )
        spec = self.files.spec(found)
        if spec.shape != tuple(like.shape):
            raise CheckpointError(
                f"tensor {found!r} in {self.files.directory} has shape {list(spec.shape)}, the model "
                f"expects {list(like.shape)}: config.json and the weights do not belong together"
            )
        return self.files.read(found, arena).to(like.dtype)


def _materialize(
    root: nn.Module,
    root_name: str,
    source: TensorSource,
    skip: frozenset[str] | set[str] = frozenset(),
    arena: ReadArena | None = None,
) -> None:
    """Read every meta parameter (and checkpointed persistent buffer) under `root` from `source`,
    keeping tied parameters tied; modules named in `skip` (and their children) and parameters named
    there stay as they are. Parameters are read into `arena` when one is given."""
    made: dict[int, nn.Parameter] = {}
    for mod_name, module in root.named_modules(remove_duplicate=False):
        full_mod = ".".join(p for p in (root_name, mod_name) if p)
        if any(full_mod == s or full_mod.startswith(f"{s}.") for s in skip):
            continue
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta or f"{full_mod}.{name}" in skip:
                continue
            if id(param) not in made:
                tensor = source.read(f"{full_mod}.{name}".lstrip("."), param, arena)
                made[id(param)] = nn.Parameter(tensor, requires_grad=False)
            module._parameters[name] = made[id(param)]
        for name, buffer in list(module._buffers.items()):
            full = f"{full_mod}.{name}".lstrip(".")
            if buffer is None or name in module._non_persistent_buffers_set or source.locate(full) is None:
                continue
            module._buffers[name] = source.read(full, buffer)


# --- out-of-core calibration ------------------------------------------------------------------------
class BlockStore:
    """Converted blocks, one safetensors file each, read back tensor by tensor at save time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, SafetensorsFile] = {}

    def put(self, block: BlockLayout) -> None:
        state = {f"{block.name}.{k}": v for k, v in block.module.state_dict().items()}
        specs = [TensorSpec.of(name, t) for name, t in state.items()]
        path = self.directory / f"block-{block.index:05d}.safetensors"
        writer = ShardWriter(path, specs, {"block": block.name})
        for spec in specs:
            writer.write(spec.name, state[spec.name])
        writer.close()
        stored = SafetensorsFile(path)
        for name in stored:
            self._files[name] = stored

    def read(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise CheckpointError(f"tensor {name!r} was never stored: its block was not calibrated")
        return self._files[name].read(name)


class BlockLoader:
    """`BlockSteps.loader` for out-of-core calibration: loads a block's float weights on `attach` and,
    on `done`, converts it to int8 cells, stores it and returns it to `meta`."""

    def __init__(self, model: nn.Module, source: TensorSource, store: BlockStore) -> None:
        self.model = model
        self.source = source
        self.store = store

    def load(self, block: BlockLayout) -> None:
        # Parameters are replaced inside the same modules, so the layout's references stay valid.
        _materialize(block.module, block.name, self.source)

    def release(self, block: BlockLayout) -> None:
        from quantmint.cells.fake_quant import FakeQuantLinear

        for name, module in list(block.module.named_modules()):
            if isinstance(module, FakeQuantLinear):
                cell = carry_rotation(module, cell_class(module.scheme).from_fake_quant(module))
                block.module.set_submodule(name, cell)
        self.store.put(block)
        block.module.to("meta")
        # The float linears the cells replaced are still referenced (the layout, the targets): free them.
        for module in block.linears.values():
            module.to("meta")


def _calibrate_out_of_core(
    path: Path,
    config: PTQConfig,
    family: str | None,
    calibration: list[torch.Tensor],
    scratch: Path,
    work_dir: Path | None,
) -> nn.Module:
    model, files = empty_model(path)
    source = TensorSource(model, files)
    ptq = PTQ(config.with_updates(mode="quantize"), family=family)
    layout = ptq.layout(model)
    _materialize(model, "", source, skip={block.name for block in layout.blocks})
    store = BlockStore(scratch)
    ptq.block_loader = BlockLoader(model, source, store)
    ptq.apply(model, calibration=calibration, work_dir=work_dir)
    ptq.convert(model)
    quant_state(model).block_store = store
    return model


# --- streaming RTN ----------------------------------------------------------------------------------
Planned = list[tuple[str, list[TensorSpec]]]  # (shard file name, its tensors) in file order


class _ReusedMemory:
    """Memory for output tensors, reused once nothing holds them any more.

    Fresh memory costs a page fault, and the kernel zeroing a page, on the first touch of every 4 KiB:
    for the 4.3 GB of integers of an 8 GB checkpoint that was over a second of system time, a third
    of the rounding (measured). The shard writer holds each tensor until written and hashed and then
    drops it; a buffer is free again when no tensor is left on it. Buffers are handed out through
    `torch.from_numpy`, whose tensors keep the array alive, so the array's reference count tells.

    Every buffer has `size` bytes (the largest request expected), so any free one serves any request;
    the pages of a buffer that no request reaches are never touched and cost no memory. Larger requests
    get memory of their own. The writer's bound on pending bytes bounds how many buffers are in use.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._arrays: list[np.ndarray] = []

    def _free(self, i: int) -> bool:
        return sys.getrefcount(self._arrays[i]) == 2  # the list's reference and the argument's

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > self.size:
            return torch.empty(shape, dtype=dtype)
        array = next((self._arrays[i] for i in range(len(self._arrays)) if self._free(i)), None)
        if array is None:
            array = np.empty(self.size, dtype=np.uint8)
            self._arrays.append(array)
        return torch.from_numpy(array[:nbytes]).view(dtype).view(shape)


class _RTNProducer:
    """The output tensors of streaming RTN, produced one at a time in any order.

    `model` is the quantized model's skeleton (deploy mode on `meta`): its state dict is the plan of
    the output. A quantized linear's tensors come from reading its float weight, `PTQ._fake_linear`
    and the cell's `from_fake_quant`, the very functions `quantize` uses; other tensors are copied.
    """

    def __init__(self, path: Path, config: PTQConfig, family: str | None) -> None:
        model, files = empty_model(path)
        self.source = TensorSource(model, files)
        self.quant = PTQ(config.with_updates(mode="quantize"), family=family)
        layout = self.quant.layout(model)
        self.family = layout.family
        self.linears = self.quant.targets(layout)  # name -> the float module, kept after the swap below
        self.quant._rotated = self.quant.rotated(layout, self.linears)
        with torch.device("meta"):
            PTQ(config.with_updates(mode="deploy"), family=family).apply(model)
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self._cached: tuple[str | None, dict[str, torch.Tensor]] = (None, {})
        # Float weights are dead once rounded: one reused buffer spares a page fault per 4 KiB read.
        self._arena = ReadArena()
        self._memory = _ReusedMemory(max((m.weight.numel() for m in self.linears.values()), default=0))

    def _quantize_from_file(self, name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight's (q, scale) rounded as it is read (`native_rtn.quantize_weight_from_file`), where
        nothing happens to it between the file and the rounding: stored as the module holds it (no
        transpose, no cast) and not rotated. None elsewhere: then it is read, then rounded."""
        rounding = self.quant.rounding
        file_rounding = getattr(rounding, "file_rounding", None) if rounding is not None else None
        if file_rounding is None:  # the recipe's rounding is not plain per-channel RTN
            return None
        if name in self.quant._rotated or self.family.adapter.weight(module) is not module.weight:
            return None
        found = self.source.locate(f"{name}.weight")
        if found is None:
            return None
        spec = self.source.files.spec(found)
        if spec.shape != tuple(module.weight.shape) or spec.dtype != module.weight.dtype:
            return None
        path, offset = self.source.files.location(found)
        strategy, num_bits = file_rounding
        out = self._memory.take(spec.shape, torch.int8)
        fd = os.open(path, os.O_RDONLY)
        try:
            return native_rtn.quantize_weight_from_file(
                fd, offset, spec.dtype, spec.shape, strategy, num_bits, out=out
            )
        finally:
            os.close(fd)

    def _quantize(self, name: str) -> dict[str, torch.Tensor]:
        module = self.linears[name]
        self._arena.reset()
        quantized = self._quantize_from_file(name, module)
        skip = {f"{name}.weight"} if quantized is not None else set()
        _materialize(module, name, self.source, skip=skip, arena=self._arena)
        if quantized is None:
            self.quant.rotate_if_chosen(name, module, self.family)
        fake = self.quant._fake_linear(
            module, self.family, None, None, convert_only=True, quantized=quantized, name=name
        )
        cell = cell_class(fake.scheme).from_fake_quant(fake)
        module.to("meta")
        # The shard writer keeps these until written, after the arena is reused: nothing may alias it
        # (a cell keeps a float bias as it was read, for one).
        return {
            f"{name}.{key}": tensor.clone() if self._arena.owns(tensor) else tensor
            for key, tensor in cell.state_dict().items()
        }

    def fetch(self, name: str) -> torch.Tensor:
        owner = name.rsplit(".", 1)[0]
        if owner in self.linears:
            if self._cached[0] != owner:
                self._cached = (None, {})  # drop the previous linear before reading the next
                self._cached = (owner, self._quantize(owner))
            return self._cached[1][name]
        tensor = self.state[name]
        if tensor.is_meta or self.source.locate(name) is not None:
            return self.source.read(name, tensor)
        return tensor.detach()  # a persistent buffer the checkpoint does not hold: as built


def _balance(planned: Planned, ranks: int) -> list[Planned]:
    """Shards shared out among ranks, largest first to the least loaded."""
    groups: list[Planned] = [[] for _ in range(min(ranks, len(planned)))]
    loads = [0] * len(groups)
    for job in sorted(planned, key=lambda j: -sum(s.nbytes for s in j[1])):
        i = loads.index(min(loads))
        groups[i].append(job)
        loads[i] += sum(s.nbytes for s in job[1])
    return groups


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """Python's cycle collector leaves alone every object that exists on entry (torch and transformers:
    hundreds of thousands) until exit. Each full collection traverses them all, 0.05-0.12 s apiece, and
    building a model skeleton sets off several (measured)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _write_group(producer: _RTNProducer, out: Path, shards: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Write these shards (file name, tensor names) of the plan into `out`; their manifest entries."""
    return {
        name: write_shard(out / name, [TensorSpec.of(t, producer.state[t]) for t in tensors], producer.fetch)
        for name, tensors in shards
    }


def _stream_rtn_rank(path: Path, config: PTQConfig, family: str | None, world: World) -> None:
    """A rank other than 0 of streaming RTN under torchrun: write the shards `_balance` gives it into
    rank 0's staging directory, and hand rank 0 their manifest entries."""
    producer = _RTNProducer(path, config, family)
    job = world.broadcast(None)  # (staging directory, the plan) from rank 0's `write_shards`
    written: dict[str, Any] | BaseException = {}
    if job is not None:
        tmp, groups = job
        try:
            with _gc_frozen():
                mine = groups[world.rank] if world.rank < len(groups) else []
                written = _write_group(producer, Path(tmp), mine)
        except OSError as exc:  # rank 0 reports it (and removes the staging directory)
            written = exc
    world.gather(written)


def _stream_rtn(
    path: Path, config: PTQConfig, family: str | None, world: World
) -> tuple[nn.Module, checkpoint.ShardsWriter]:
    producer = _RTNProducer(path, config, family)

    def write_shards(out: Path, planned: Planned) -> dict[str, dict[str, Any]]:
        if world.distributed:  # every rank writes its share of the shards (`_stream_rtn_rank`)
            balanced = _balance(planned, world.size)
            groups = [[(name, [s.name for s in specs]) for name, specs in g] for g in balanced]
            world.broadcast((str(out), groups))
            written: dict[str, Any] = {}
            try:
                written = _write_group(producer, out, groups[0])
            finally:
                parts = world.gather(written)
            for part in parts:
                if isinstance(part, BaseException):
                    raise part
                written.update(part)
            return {name: written[name] for name, _ in planned}
        # The shard writer's thread writes and hashes while torch rounds the next tensor: leave it a
        # core (OpenMP threads that lose theirs stall every parallel region; measured).
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))
        try:
            return {name: write_shard(out / name, specs, producer.fetch) for name, specs in planned}
        finally:
            torch.set_num_threads(threads)

    return producer.model, write_shards


# --- entry point ------------------------------------------------------------------------------------
def quantize_checkpoint(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: PTQConfig | str | dict[str, Any] = "w8a16",
    family: str | None = None,
    calibration: list[torch.Tensor] | None = None,
    tokenizer: Any = None,
    work_dir: str | os.PathLike[str] | None = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Quantize the float checkpoint in `model_dir` into `out_dir` without loading the model.

    The result is the checkpoint that `quantize` + `save_quantized` write for the same config and
    calibration, byte for byte (see the module docstring for how).

    Args:
        config: a `PTQConfig`, a preset name or a mapping. Configs that calibrate need `calibration`.
        work_dir: block PTQ's resume directory (see `PTQ.apply`).
        Others as in `save_quantized`.
    Returns:
        What was done: `mode` (`rtn` or `calibrated`), the ranks (1 outside torchrun), input bytes,
        seconds, this process's peak RSS (MB) and, when calibrated, the calibration report.
    """
    start = time.perf_counter()
    path = Path(model_dir)
    out = Path(out_dir)
    config = as_config(config).with_updates(mode="quantize")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; remove it or pass overwrite=True")
    world = current_world()  # under torchrun the ranks share the work and rank 0 writes `out`
    if world.is_main:
        prepare_output(out, [path], overwrite)
    max_bytes = checkpoint.parse_size(max_shard_size)
    ptq = PTQ(config, family=family)
    calibrated = ptq.needs_calibration
    per_block = per_block_steps(ptq.algorithms)
    if not calibrated and per_block:
        raise NotSupportedError(
            f"step(s) {', '.join(per_block)} of this recipe run block by block without calibration data, "
            "which streamed RTN does not do: quantize in memory (without --stream), or give the step "
            "calibration data"
        )
    if calibrated and not calibration:
        raise ConfigError(
            f"{config.scheme_name} calibrates (smoothing, static activations, C8 or block PTQ): pass "
            "calibration=quantmint.io.data.calibration_samples(...) (CLI: --calib FILE)"
        )
    with contextlib.ExitStack() as stack:
        stack.enter_context(output_errors(out))  # a full disk while writing blocks: one line
        stack.enter_context(_gc_frozen())
        if calibrated:
            out.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=staging_prefix(out, "blocks"), dir=out.parent))
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
            assert calibration is not None
            model = _calibrate_out_of_core(
                path, config, family, calibration, scratch, None if work_dir is None else Path(work_dir)
            )
            write_shards = None
        elif not world.is_main:
            _stream_rtn_rank(path, config, family, world)
            model = None
        else:
            model, write_shards = _stream_rtn(path, config, family, world)
        if world.is_main:
            with staged_directory(out, overwrite=overwrite, inputs=[path]) as tmp:
                checkpoint.write_checkpoint(model, tmp, tokenizer, max_bytes, write_shards)
    state = quant_state(model)
    return {
        "mode": "calibrated" if calibrated else "rtn",
        "ranks": world.size,
        "input_bytes": sum(f.stat().st_size for f in CheckpointFiles(path).files),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": peak_rss_mb(),
        "calibration": state.calibration if state is not None else None,
    }
