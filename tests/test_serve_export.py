"""`quantmint serve`'s command line and `quantmint export`'s refusals, without vLLM installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, byte_tokenizer, unrotated

from quantmint.algorithms.ptq import quantize
from quantmint.backends.vllm.serve import serve_command
from quantmint.errors import QuantmintError
from quantmint.formats.checkpoint import save_quantized
from quantmint.tools.cli import main


def _checkpoint(tmp_path: Path, family: str, preset: str) -> Path:
    """A tiny `family` checkpoint of `preset`; "w8a8" without its rotation (export cannot describe it)."""
    torch.manual_seed(0)
    calibration = [torch.randint(0, 256, (32,)) for _ in range(4)]
    config = unrotated(preset) if preset == "w8a8" else preset
    model = quantize(build_tiny(family), config, calibration=calibration)
    return save_quantized(model, tmp_path / f"{family}-{preset}", tokenizer=byte_tokenizer())


def test_serve_command_has_cpu_defaults_and_keeps_the_callers_settings(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, "llama", "w8a16")
    cmd, env = serve_command(path, port=8123, max_model_len=256, environ={"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == str(path) and cmd[cmd.index("--port") + 1] == "8123"
    assert "--enforce-eager" in cmd and "--runner" not in cmd
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    cmd, _ = serve_command(path, eager=False, extra=["--seed", "3"], environ={})
    assert "--enforce-eager" not in cmd and cmd[-2:] == ["--seed", "3"]


def test_serve_command_runs_bert_as_a_pooling_model(tmp_path: Path) -> None:
    cmd, _ = serve_command(_checkpoint(tmp_path, "bert", "w8a16"), environ={})
    assert cmd[cmd.index("--runner") + 1] == "pooling"


def test_serving_c8_gets_the_fp8_cache_where_vllm_keeps_one(tmp_path: Path, monkeypatch) -> None:
    """C8 serves with no flag where vLLM keeps an fp8 cache (AVX-512 / AMX CPUs, CUDA); elsewhere it is
    refused in one line naming --kv-cache float, which serves it with a float cache."""
    from quantmint.backends.vllm import serve

    path = _checkpoint(tmp_path, "llama", "w8a8-c8")
    monkeypatch.setattr(serve, "_fp8_cache_here", lambda: True)
    _, env = serve_command(path, environ={})
    assert "QUANTMINT_VLLM_KV_CACHE" not in env
    monkeypatch.setattr(serve, "_fp8_cache_here", lambda: False)
    with pytest.raises(QuantmintError, match="AVX-512 or AMX.*--kv-cache float"):
        serve_command(path, environ={})
    _, env = serve_command(path, kv_cache="float", environ={})
    assert env["QUANTMINT_VLLM_KV_CACHE"] == "float"


def test_cli_serve_of_a_directory_that_is_no_model_says_so(tmp_path: Path, capsys) -> None:
    pytest.importorskip("vllm", reason="quantmint serve checks for vLLM first")
    assert main(["serve", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_export_writes_compressed_tensors_config(tmp_path: Path, capsys) -> None:
    src = _checkpoint(tmp_path, "llama", "w8a8")
    assert main(["export", str(src), "-o", str(tmp_path / "ct")]) == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"
    assert config["ignore"] == ["lm_head"]
    assert sorted(p.name for p in (tmp_path / "ct").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "ct" / "quantmint_manifest.json").exists()
    assert main(["export", str(src), "-o", str(tmp_path / "ct")]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_cli_export_refuses_w8a16_with_the_reason(tmp_path: Path, capsys) -> None:
    src = _checkpoint(tmp_path, "llama", "w8a16")
    assert main(["export", str(src), "-o", str(tmp_path / "ct")]) == 2
    assert "w8a16 layers" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()


def test_export_refuses_a_corrupt_shard(tmp_path: Path) -> None:
    from quantmint.formats.export import export_checkpoint

    src = _checkpoint(tmp_path, "llama", "w8a8")
    shard = src / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(QuantmintError):
        export_checkpoint(src, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_export_writes_w4a16_as_pack_quantized(tmp_path: Path) -> None:
    from safetensors import safe_open

    from quantmint.config import get_preset
    from quantmint.formats.export import export_checkpoint

    torch.manual_seed(0)
    # groups of 32 divide the tiny Llama's 64 and 128 input features
    config = get_preset("w4a16").with_updates(weights={"strategy": "group", "group_size": 32})
    src = save_quantized(quantize(build_tiny("llama"), config), tmp_path / "w4", tokenizer=byte_tokenizer())
    out = export_checkpoint(src, tmp_path / "ct")
    ct = json.loads((out / "config.json").read_text())["quantization_config"]
    assert ct["format"] == "pack-quantized" and ct["ignore"] == ["lm_head"]
    weights = ct["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (
        4, "group", 32, True,
    )  # fmt: skip
    assert ct["config_groups"]["group_0"]["input_activations"] is None
    with safe_open(out / "model.safetensors", "pt") as f:
        name = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{name}.weight_packed").shape == (64, 16)  # [out, in / 8] int32
        assert f.get_tensor(f"{name}.weight_scale").shape == (64, 4)  # [out, in / 32]
        assert f.get_tensor(f"{name}.weight_shape").tolist() == [64, 128]


def test_export_refuses_ragged_four_bit_groups_and_w4a8(tmp_path: Path) -> None:
    from quantmint.formats.export import export_checkpoint

    src = _checkpoint(tmp_path, "llama", "w4a16")  # groups of 128 over 64 input features
    with pytest.raises(QuantmintError, match=r"with 64 input features, end in a group shorter than "
                       r"group_size 128.*group_size that divides") as refused:  # fmt: skip
        export_checkpoint(src, tmp_path / "ct")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "ct").exists()


def test_export_refuses_a_family_that_declares_transposed_linears(tmp_path: Path) -> None:
    from quantmint.formats.export import export_checkpoint

    src = _checkpoint(tmp_path, "gpt2", "w8a8")  # GPT2 declares its Conv1D linears in ServingNeeds
    with pytest.raises(QuantmintError, match=r"'gpt2' declares that its linears attn\.c_attn.*Conv1D"):
        export_checkpoint(src, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_pooling_is_what_a_family_declares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from quantmint.extension import registry
    from quantmint.extension.family import ServingNeeds

    path = _checkpoint(tmp_path, "llama", "w8a16")
    assert "--runner" not in serve_command(path, environ={})[0]
    llama = registry.model_families()["llama"]
    embedding = dataclasses.replace(llama, serving=ServingNeeds(pooling_architectures=("LlamaForCausalLM",)))
    monkeypatch.setattr(registry, "model_families", lambda: {"llama": embedding})
    cmd, _ = serve_command(path, environ={})
    assert cmd[cmd.index("--runner") + 1] == "pooling"


def test_export_writes_asymmetric_w4a16_as_compressed_tensors_reads_it(tmp_path: Path) -> None:
    """Asymmetric groups: `symmetric: false` and `weight_zero_point` [ceil(out / 8), groups] int32, which
    compressed-tensors' own unpacking turns into the weight quantmint's runtime computes with."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    from quantmint.config import get_preset
    from quantmint.formats.export import export_checkpoint

    torch.manual_seed(0)
    config = get_preset("w4a16").with_updates(
        weights={"symmetric": False, "strategy": "group", "group_size": 32}
    )
    model = quantize(build_tiny("llama"), config)
    src = save_quantized(model, tmp_path / "w4", tokenizer=byte_tokenizer())
    out = export_checkpoint(src, tmp_path / "ct")
    ct = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = ct["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, False)
    name = "model.layers.0.mlp.down_proj"
    with safe_open(out / "model.safetensors", "pt") as f:
        packed, scale = f.get_tensor(f"{name}.weight_packed"), f.get_tensor(f"{name}.weight_scale")
        zp_packed = f.get_tensor(f"{name}.weight_zero_point")
    assert zp_packed.dtype == torch.int32 and zp_packed.shape == (8, 4)  # [64 / 8, 128 / 32]
    q = unpack_from_int32(packed, 4, torch.Size([64, 128])).float()  # signed: code - 8
    zp = unpack_from_int32(zp_packed, 4, torch.Size([64, 4]), packed_dim=0).float()
    theirs = (q - zp.repeat_interleave(32, dim=1)) * scale.repeat_interleave(32, dim=1)
    assert torch.equal(theirs, model.get_submodule(name).dequantized_weight())


def test_tensor_parallel_serving_splits_the_cores_on_one_socket(tmp_path: Path, monkeypatch) -> None:
    """vLLM's CPU workers bind one rank per NUMA node and refuse to start with fewer nodes than ranks; on
    such a machine `quantmint serve --tensor-parallel-size N` splits the cores this process may use."""
    from quantmint.backends.vllm import serve

    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4}, raising=False)
    monkeypatch.setattr(serve, "_numa_nodes", lambda: 1)
    assert serve.cpu_thread_binding(1, {}) is None
    assert serve.cpu_thread_binding(2, {}) == "0,1,2|3,4"
    assert serve.cpu_thread_binding(5, {}) == "0|1|2|3|4"
    assert serve.cpu_thread_binding(2, {"VLLM_CPU_OMP_THREADS_BIND": "0|4"}) is None  # the user's binding
    with pytest.raises(QuantmintError, match="a CPU core per rank.*--tensor-parallel-size 5 or less"):
        serve.cpu_thread_binding(6, {})
    monkeypatch.setattr(serve, "_numa_nodes", lambda: 2)
    assert serve.cpu_thread_binding(2, {}) is None  # vLLM binds one rank per node itself

    monkeypatch.setattr(serve, "_numa_nodes", lambda: 1)
    path = _checkpoint(tmp_path, "llama", "w8a8")
    cmd, env = serve_command(path, tensor_parallel_size=2, environ={})
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2|3,4"
    cmd, env = serve_command(path, environ={})
    assert "--tensor-parallel-size" not in cmd and "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_rotated_layers_are_served_with_tensor_parallelism(tmp_path: Path) -> None:
    """Hadamard-rotated layers gather their input across the ranks (tests/test_vllm.py serves one)."""
    from quantmint.config import get_preset

    torch.manual_seed(0)
    calibration = [torch.randint(0, 256, (32,)) for _ in range(4)]
    config = get_preset("w8a8").with_updates(algorithm_args={"hadamard": True})
    model = quantize(build_tiny("llama"), config, calibration=calibration)
    path = save_quantized(model, tmp_path / "rotated", tokenizer=byte_tokenizer())
    cmd, _ = serve_command(path, tensor_parallel_size=2, environ={})
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
