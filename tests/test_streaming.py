"""Quantizing checkpoints larger than memory: streaming RTN, out-of-core calibration, safetensors I/O,
the synthetic checkpoint generator. The streamed checkpoint must be the in-memory one, byte for byte."""

from __future__ import annotations

import filecmp
import gc
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_tiny, byte_tokenizer, model_output

from quantmint.algorithms import streaming
from quantmint.algorithms.ptq import quantize
from quantmint.algorithms.streaming import quantize_checkpoint
from quantmint.config import PTQConfig, get_preset
from quantmint.errors import CheckpointError, ConfigError
from quantmint.formats.checkpoint import CALIBRATION_NAME, load_quantized, save_quantized
from quantmint.formats.safetensors_io import (
    CheckpointFiles,
    ReadArena,
    SafetensorsFile,
    ShardWriter,
    TensorSpec,
)
from quantmint.io.models import load_float_model
from quantmint.numerics import native, quant_math
from quantmint.tools.memory import available_memory_bytes
from quantmint.tools.synthetic import make_synthetic_llama, synthetic_llama_config


def _calibration(n: int = 8, length: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (length,), generator=generator) for _ in range(n)]


def _in_memory(src: Path, out: Path, config: PTQConfig | str, calibration=None, shard: str = "40KB") -> None:
    model = load_float_model(src)
    quantize(model, config, calibration=calibration)
    save_quantized(model, out, tokenizer=byte_tokenizer(), max_shard_size=shard)


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        if name == CALIBRATION_NAME:  # timings and peak memory differ; what was measured may not
            left, right = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            for record in (left, right):
                for key in ("seconds", "peak_rss_mb"):
                    record.pop(key)
                for block in record.get("block_ptq", {}).get("blocks", []):
                    block.pop("seconds")
            assert left == right
            continue
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize(
    ("family", "preset"),
    [("llama", "w8a16"), ("llama", "w4a16"), ("llama", "w4a16-asym"), ("gpt2", "w8a16"), ("bert", "w8a16")],
)
def test_streaming_rtn_is_byte_identical_to_in_memory(
    family: str, preset: str, tiny_model_dir, tmp_path: Path
) -> None:
    src = tiny_model_dir(family)
    config = get_preset(preset)
    if config.weights.group_size:
        config = config.with_updates(weights={**config.weights.model_dump(), "group_size": 32})
    _in_memory(src, tmp_path / "memory", config)
    report = quantize_checkpoint(
        src, tmp_path / "stream", config, tokenizer=byte_tokenizer(), max_shard_size="40KB"
    )
    assert report["mode"] == "rtn" and report["ranks"] == 1
    assert len(list((tmp_path / "stream").glob("model-*.safetensors"))) > 1  # sharded
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    assert not list(tmp_path.glob(".stream*")), "no staging file is left behind"


def _fast_block_ptq() -> PTQConfig:
    config = get_preset("w8a8-ptq")
    return config.with_updates(
        block_ptq={**config.block_ptq.model_dump(), "n_outer_loops": 20, "n_batches": 2, "batch_size": 4}
    )


@pytest.mark.parametrize(
    ("family", "preset"),
    [("llama", "w8a8-c8"), ("gpt2", "w8a8"), ("bert", "w8a8"), ("llama", "block-ptq"), ("gpt2", "hadamard")],
)
def test_out_of_core_calibration_is_byte_identical_to_in_memory(
    family: str, preset: str, tiny_model_dir, tmp_path: Path
) -> None:
    src = tiny_model_dir(family)
    config: str | PTQConfig = preset
    if preset == "block-ptq":
        config = _fast_block_ptq()
    elif preset == "hadamard":  # rotated inputs of the MLP output projections (Conv1D), plus smoothing
        config = get_preset("w8a8-c8").with_updates(algorithm_args={"hadamard": True})
    _in_memory(src, tmp_path / "memory", config, _calibration())
    report = quantize_checkpoint(
        src,
        tmp_path / "stream",
        config,
        calibration=_calibration(),
        tokenizer=byte_tokenizer(),
        max_shard_size="40KB",
    )
    assert report["mode"] == "calibrated"
    _assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    assert not list(tmp_path.glob(".stream*")), "the block store is removed"


def test_out_of_core_holds_one_block_at_a_time(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    """Every block but the one being calibrated is on `meta`: the model is never in memory whole."""
    loaded_at_once = []
    load = streaming.BlockLoader.load

    def spy(self, block) -> None:
        load(self, block)
        real = [
            name
            for name, module in self.model.named_modules()
            if name.count(".") == 2 and ".layers." in name and any(not p.is_meta for p in module.parameters())
        ]
        # Replaced float linears must not linger either (the layout still references them).
        linears = [m for m in gc.get_objects() if isinstance(m, torch.nn.Linear) and not m.weight.is_meta]
        loaded_at_once.append((real, len([m for m in linears if m is not self.model.lm_head])))

    monkeypatch.setattr(streaming.BlockLoader, "load", spy)
    quantize_checkpoint(tiny_model_dir("llama"), tmp_path / "out", "w8a8", calibration=_calibration())
    assert loaded_at_once == [(["model.layers.0"], 7), (["model.layers.1"], 7)]


def test_streamed_checkpoint_loads_and_runs(tiny_model_dir, tmp_path: Path, input_ids: torch.Tensor) -> None:
    src = tiny_model_dir("llama")
    quantize_checkpoint(src, tmp_path / "out", "w8a16")
    quantized = load_quantized(tmp_path / "out")
    reference = model_output(load_float_model(src), input_ids)
    assert quant_math.sqnr_db(reference, model_output(quantized, input_ids)) > 25


def test_streaming_refuses_what_it_cannot_read(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    # Pickle weights only: refused, naming the way out.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle files are not read"):
        quantize_checkpoint(pickled, tmp_path / "o1", "w8a16")
    # A truncated shard: named, before anything is written.
    truncated = shutil.copytree(src, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        quantize_checkpoint(truncated, tmp_path / "o2", "w8a16")
    # Weights that do not belong to the model class: the missing tensor is named.
    renamed = shutil.copytree(src, tmp_path / "renamed")
    files = CheckpointFiles(src)
    specs = [files.spec(n) for n in files]
    specs = [TensorSpec(s.name.replace("q_proj", "query"), s.dtype, s.shape) for s in specs]
    writer = ShardWriter(renamed / "model.safetensors", specs, {"format": "pt"})
    for spec, name in zip(specs, files, strict=True):
        writer.write(spec.name, files.read(name))
    writer.close()
    with pytest.raises(CheckpointError, match="q_proj.weight"):
        quantize_checkpoint(renamed, tmp_path / "o3", "w8a16")
    # Calibrating configs need data; nothing is left behind by any of these.
    with pytest.raises(ConfigError, match="calibration"):
        quantize_checkpoint(src, tmp_path / "o4", "w8a8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled", "renamed", "truncated"]


def test_safetensors_writer_reads_back_like_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.randint(-127, 127, (7,), dtype=torch.int8),
        "c": torch.tensor(2.5),
        "d": torch.zeros(0, 4),
        "e": torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),  # not contiguous
    }
    specs = [TensorSpec.of(name, t) for name, t in tensors.items()]
    writer = ShardWriter(tmp_path / "x.safetensors", specs, {"format": "pt"})
    for name, t in tensors.items():
        writer.write(name, t)
    info = writer.close()
    assert info["bytes"] == (tmp_path / "x.safetensors").stat().st_size
    ours = SafetensorsFile(tmp_path / "x.safetensors")
    theirs = load_file(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert torch.equal(theirs[name], t) and torch.equal(ours.read(name), t)
    assert (tmp_path / "x.safetensors").read_bytes()[8:9] == b"{"
    # Out of plan: refused with the expected tensor named.
    writer = ShardWriter(tmp_path / "y.safetensors", specs, {})
    with pytest.raises(CheckpointError, match="expected tensor 'a'"):
        writer.write("b", tensors["b"])
    writer.abort()
    # A header longer than the file is corruption.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="header"):
        SafetensorsFile(bad)


def _takes_o_direct(directory: Path) -> bool:
    import os

    try:
        fd = os.open(directory / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    (directory / ".probe").unlink()
    return True


@pytest.mark.parametrize("direct", ["1", "0"])
def test_direct_and_buffered_writes_give_the_same_file_and_hash(tmp_path: Path, monkeypatch, direct) -> None:
    """O_DIRECT output (staged, padded, truncated) is the very file buffered writes give, at sizes on
    and off the 4 KiB block and across the 16 MiB staging buffer."""
    import hashlib

    from quantmint.formats import safetensors_io

    monkeypatch.setattr(safetensors_io, "_IO_CHUNK", 1 << 16)  # several staging buffers per file
    monkeypatch.setenv("QUANTMINT_DIRECT_IO", direct)
    generator = torch.Generator().manual_seed(0)
    for total in (4096 - 8, 3 * (1 << 16) + 5, 1 << 18):
        tensors = {"x": torch.randint(-127, 127, (total,), dtype=torch.int8, generator=generator)}
        specs = [TensorSpec.of("x", tensors["x"])]
        path = tmp_path / f"{direct}-{total}.safetensors"
        writer = ShardWriter(path, specs, {})
        assert writer._file.direct == (direct == "1" and _takes_o_direct(tmp_path))
        writer.write("x", tensors["x"])
        info = writer.close()
        data = path.read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        assert torch.equal(SafetensorsFile(path).read("x"), tensors["x"])
        assert data[-total:] == tensors["x"].numpy().tobytes()


def test_direct_writes_a_filesystem_refuses_go_on_buffered(tmp_path: Path, monkeypatch) -> None:
    import errno
    import fcntl
    import os

    from quantmint.formats import safetensors_io

    real_write, refused = os.write, []

    def write(fd: int, data) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(safetensors_io.os, "write", write)
    tensor = torch.arange(10_000, dtype=torch.int32)
    if not _takes_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT at open")
    writer = ShardWriter(tmp_path / "x.safetensors", [TensorSpec.of("t", tensor)], {})
    assert writer._file.direct
    writer.write("t", tensor)
    writer.close()
    assert refused, "the direct write was never tried"
    assert torch.equal(SafetensorsFile(tmp_path / "x.safetensors").read("t"), tensor)


def test_reads_into_an_arena_reuse_its_memory(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(33, 17).bfloat16(),
        "b": torch.randn(5),
        "i": torch.arange(3, dtype=torch.int64),
    }
    specs = [TensorSpec.of(name, t) for name, t in tensors.items()]
    writer = ShardWriter(tmp_path / "x.safetensors", specs, {})
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    stored, arena = SafetensorsFile(tmp_path / "x.safetensors"), ReadArena()
    for _ in range(2):  # the first pass grows the buffer (a request that does not fit replaces it)
        arena.reset()
        first = {name: stored.read(name, arena) for name in tensors}  # w (odd byte count), then b and i
    for name, t in tensors.items():
        assert torch.equal(first[name], t) and arena.owns(first[name])
        assert first[name].untyped_storage().data_ptr() == first["w"].untyped_storage().data_ptr()
        assert (first[name].data_ptr() - first["w"].data_ptr()) % ReadArena.ALIGN == 0
    arena.reset()
    again = stored.read("w", arena)
    assert again.data_ptr() == first["w"].data_ptr() and torch.equal(again, tensors["w"])
    assert not arena.owns(stored.read("w"))  # no arena: memory of its own


@pytest.mark.parametrize(("family", "preset"), [("gpt2", "w8a16"), ("bert", "w8a8"), ("gpt2", "w4a16")])
def test_streamed_tensors_never_alias_the_reused_read_buffer(
    family: str, preset: str, tiny_model_dir, monkeypatch
) -> None:
    # The shard writer holds a linear's tensors until its thread writes them, after the next linear's
    # read has reused the arena: a tensor left in it would be overwritten. quantmint's fake-quant layer
    # and cells copy the float bias; layers that keep it as read must not break the checkpoint either.
    cell_class = streaming.cell_class
    fake_linear = streaming.PTQ._fake_linear

    def fake_keeping_bias(self, module, *args, **kwargs):
        fake = fake_linear(self, module, *args, **kwargs)
        if module.bias is not None:
            fake.bias.data = module.bias.data
        return fake

    def keeping_bias(scheme):
        base = cell_class(scheme)

        class KeepsBias(base):
            @classmethod
            def from_fake_quant(cls, layer):
                cell = base.from_fake_quant(layer)
                if layer.bias is not None:
                    cell.bias.data = layer.bias.data  # the tensor as read, no copy
                return cell

        return KeepsBias

    monkeypatch.setattr(streaming, "cell_class", keeping_bias)
    monkeypatch.setattr(streaming.PTQ, "_fake_linear", fake_keeping_bias)
    producer = streaming._RTNProducer(tiny_model_dir(family), get_preset(preset), None)
    names = list(producer.linears)
    outputs = [(name, producer._quantize(name)) for name in names]
    reference = streaming._RTNProducer(tiny_model_dir(family), get_preset(preset), None)
    for name, tensors in outputs:
        assert not any(producer._arena.owns(t) for t in tensors.values())
        expected = reference._quantize(name)  # read into the arena last: equal if nothing was overwritten
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[k], expected[k]) for k in tensors), name
    assert any(k.endswith(".bias") for _, tensors in outputs for k in tensors), "a bias was streamed"


@pytest.mark.parametrize("compiled", [True, False], ids=["native", "no-compiler"])
def test_streaming_rtn_rounds_plain_linear_weights_as_they_are_read(
    tiny_model_dir, monkeypatch, compiled: bool
) -> None:
    # Llama's nn.Linear weights go straight from the file to the kernel (same bytes: the test above);
    # GPT2's Conv1D weights are stored transposed, so they are read first and rounded after. Without the
    # native kernel (no C compiler: QUANTMINT_NATIVE=0 stands in for one) every weight takes the read-then-
    # round fallback, and the integers and scales are the same.
    if compiled and native.library("rtn") is None:
        pytest.skip("no C compiler here: the native rtn kernel cannot be built")
    if not compiled:
        monkeypatch.setenv("QUANTMINT_NATIVE", "0")
    calls = {"rounded": 0, "declined": 0}
    from_file = streaming.native_rtn.quantize_weight_from_file

    def counting(*args, **kwargs):
        result = from_file(*args, **kwargs)
        calls["rounded" if result is not None else "declined"] += 1
        return result

    monkeypatch.setattr(streaming.native_rtn, "quantize_weight_from_file", counting)
    for family, direct in (("llama", True), ("gpt2", False)):
        calls.update(rounded=0, declined=0)
        producer = streaming._RTNProducer(tiny_model_dir(family), get_preset("w8a16"), None)
        model = build_tiny(family)  # the float weights of tiny_model_dir(family)
        adapter = producer.family.adapter
        for name in producer.linears:
            tensors = producer._quantize(name)
            q, scale = quant_math.quantize_weight(
                adapter.weight(model.get_submodule(name)).detach(), "channel"
            )
            assert torch.equal(tensors[f"{name}.weight"].reshape(q.shape), q), name
            assert torch.equal(tensors[f"{name}.weight_scale"].reshape(scale.shape), scale), name
        if direct and compiled:
            assert calls == {"rounded": len(producer.linears), "declined": 0}
        elif direct:  # read from the file by the fallback, not by the absent kernel
            assert calls == {"rounded": 0, "declined": len(producer.linears)}
        else:
            assert calls["rounded"] == 0


def test_reused_memory_is_handed_out_again_only_once_released() -> None:
    memory = streaming._ReusedMemory(size=1 << 16)
    first = memory.take((16, 64), torch.int8)
    held = memory.take((8, 8), torch.int8)
    assert first.data_ptr() != held.data_ptr()
    address = first.data_ptr()
    view = first.reshape(-1)[10:]  # a view keeps the buffer in use, as the writer's queue does
    del first
    assert memory.take((4,), torch.int8).data_ptr() not in (address, held.data_ptr())
    del view
    again = memory.take((32, 32), torch.int8)
    assert again.data_ptr() == address and again.shape == (32, 32)
    assert memory.take((1 << 17,), torch.int8).numel() == 1 << 17  # larger than a buffer: its own
    assert len(memory._arrays) == 3


def test_chunked_quantization_matches_whole_tensor() -> None:
    torch.manual_seed(0)
    weight = (torch.randn(1100, 1024) * 0.02).bfloat16()  # above the chunk size, ragged last chunk
    for strategy, bits, group in (("channel", 8, None), ("group", 4, 128), ("tensor", 8, None)):
        q, scale = quant_math.quantize_weight(weight, strategy, bits, group)
        whole_scale = quant_math.qparams_from_absmax(quant_math._weight_absmax(weight, strategy, group), bits)
        expanded = quant_math.expand_weight_scale(whole_scale, weight.shape, group)
        assert torch.equal(scale, whole_scale)
        assert torch.equal(q, quant_math._quantize(weight, expanded, None, bits, torch.int8))
        deq = quant_math.dequantize_weight(q, scale, torch.bfloat16, group)
        assert torch.equal(deq, quant_math._dequantize(q, expanded, None, torch.bfloat16))


def test_synthetic_llama_has_the_asked_size_and_quantizes(tmp_path: Path) -> None:
    for size in (60e6, 500e6, 2e9, 8e9):
        cfg = synthetic_llama_config(int(size))
        params = (
            cfg["num_hidden_layers"]
            * (
                2 * cfg["hidden_size"] ** 2
                + 2 * cfg["hidden_size"] * cfg["num_key_value_heads"] * 128
                + 3 * cfg["hidden_size"] * cfg["intermediate_size"]
            )
            + 2 * cfg["vocab_size"] * cfg["hidden_size"]
        )
        assert abs(2 * params - size) / size < 0.1, (size, cfg)
    info = make_synthetic_llama(tmp_path / "synth", size="60MB", max_shard_size="20MB", tokenizer_dir=None)
    assert info["shards"] > 1 and abs(info["bytes"] - 60e6) / 60e6 < 0.25
    config = transformers.AutoConfig.from_pretrained(tmp_path / "synth")
    assert config.num_hidden_layers == info["num_hidden_layers"]
    make_synthetic_llama(tmp_path / "again", size="60MB", max_shard_size="20MB")
    assert filecmp.cmp(
        tmp_path / "synth" / "model-00001-of-00003.safetensors",
        tmp_path / "again" / "model-00001-of-00003.safetensors",
        shallow=False,
    )
    report = quantize_checkpoint(tmp_path / "synth", tmp_path / "q", "w8a16", max_shard_size="20MB")
    assert report["input_bytes"] > 60e6 * 0.75
    model = load_quantized(tmp_path / "q")
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_cli_streams_when_asked_and_when_memory_is_short(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    from quantmint.tools import cli

    src = tiny_model_dir("gpt2")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantmint.tools.cli",
            "quantize",
            str(src),
            "-o",
            str(tmp_path / "a"),
            "--stream",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["streamed"]["mode"] == "rtn" and report["streamed"]["ranks"] == 1
    assert available_memory_bytes() > 0
    monkeypatch.setattr("quantmint.tools.memory.available_memory_bytes", lambda: 1000)
    assert cli._too_big_for_memory(src)
    monkeypatch.setattr("quantmint.tools.memory.available_memory_bytes", lambda: 10**12)
    assert not cli._too_big_for_memory(src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("strategy", "bits", "group"), [("channel", 8, None), ("group", 4, 32), ("tensor", 8, None)]
)
def test_rounding_the_dequantized_weight_again_gives_the_same_integers(dtype, strategy, bits, group) -> None:
    """Why streaming RTN may keep the integers instead of re-rounding at convert time."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-6, 2 if dtype == torch.float16 else 4, 64).reshape(-1, 1)
    weight = (torch.randn(64, 96, generator=generator) * magnitudes).to(dtype)
    q, scale = quant_math.quantize_weight(weight, strategy, bits, group)
    deq = quant_math.dequantize_weight(q, scale, dtype, group)
    again = quant_math.quantize(deq, quant_math.expand_weight_scale(scale, deq.shape, group), num_bits=bits)
    assert torch.equal(again, q)
