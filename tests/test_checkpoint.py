from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantmint import PTQ, CheckpointError, ConfigError, load_quantized, quant_state, quantize, save_quantized
from quantmint.errors import QuantmintError
from quantmint.formats import checkpoint
from quantmint.formats.checkpoint import MANIFEST_NAME, _sha256, parse_size
from tests.conftest import build_tiny, byte_tokenizer, model_output


def _quantized(family: str = "llama") -> torch.nn.Module:
    return quantize(build_tiny(family), "w8a16")


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_save_load_gives_identical_outputs(family: str, tmp_path: Path, input_ids: torch.Tensor) -> None:
    model = _quantized(family)
    out = model_output(model, input_ids)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert torch.equal(model_output(loaded, input_ids), out)
    assert quant_state(loaded).modules == quant_state(model).modules
    assert quant_state(loaded).config.mode == "deploy"


def test_checkpoint_layout(tmp_path: Path) -> None:
    model = _quantized()
    save_quantized(model, tmp_path / "ckpt", tokenizer=byte_tokenizer())
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", MANIFEST_NAME, "tokenizer.json"} <= files
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    block = config["quantization_config"]
    assert block["quant_method"] == "quantmint" and block["scheme"] == "w8a16" and block["family"] == "llama"
    assert block["config"]["mode"] == "deploy"
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
    assert "lm_head.weight" not in tensors  # tied to the embedding: stored once
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_NAME).read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_sharding(tmp_path: Path, input_ids: torch.Tensor) -> None:
    model = _quantized()
    save_quantized(model, tmp_path / "ckpt", max_shard_size="20KB")
    shards = sorted((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert torch.equal(
        model_output(load_quantized(tmp_path / "ckpt"), input_ids), model_output(model, input_ids)
    )


def test_refuses_existing_dir_and_overwrites_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        save_quantized(_quantized(), target)
    assert (target / "keep.txt").exists()
    # --overwrite replaces only a directory quantmint wrote (tests/reliability/test_overwrite_safety.py)
    with pytest.raises(QuantmintError, match="remove it by hand"):
        save_quantized(_quantized(), target, overwrite=True)
    assert (target / "keep.txt").exists()
    (target / "keep.txt").unlink()
    save_quantized(_quantized(), target, overwrite=True)
    (target / "keep.txt").write_text("x")  # beside quantmint's own files: replaced with them
    save_quantized(_quantized(), target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert _siblings(target) == ["ckpt"]


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    class ExplodingTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(_quantized(), tmp_path / "ckpt", tokenizer=ExplodingTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_saving_needs_a_converted_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quantmint.quantize"):
        save_quantized(build_tiny("llama"), tmp_path / "a")
    model = build_tiny("llama")
    PTQ("w8a16").apply(model)
    with pytest.raises(ConfigError, match="convert"):
        save_quantized(model, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    save_quantized(_quantized(), path)
    return path


def _rewrite(path: Path, edit) -> None:
    """Change the tensors of a saved checkpoint and fix the manifest, as a careless tool would."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["shards"]["model.safetensors"] = {"sha256": _sha256(file), "bytes": file.stat().st_size}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_truncated_shard(saved: Path) -> None:
    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_quantized(saved)


def test_truncated_shard_with_a_matching_manifest(saved: Path) -> None:
    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    manifest["shards"]["model.safetensors"]["bytes"] = file.stat().st_size
    (saved / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(saved)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_quantized(saved, verify=False)


def test_flipped_bytes_fail_the_checksum(saved: Path) -> None:
    file = saved / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(saved)


def test_missing_tensor_is_named(saved: Path) -> None:
    _rewrite(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight_scale"):
        load_quantized(saved)


def test_extra_tensor_is_named(saved: Path) -> None:
    _rewrite(saved, lambda t: t.__setitem__("model.layers.0.stray", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="model.layers.0.stray"):
        load_quantized(saved)


def test_wrong_dtype_is_named(saved: Path) -> None:
    def to_float(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].float()

    _rewrite(saved, to_float)
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*torch.float32.*torch.int8"):
        load_quantized(saved)


def test_wrong_shape_is_named(saved: Path) -> None:
    def reshape(t):
        t["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(63, 1)

    _rewrite(saved, reshape)
    with pytest.raises(CheckpointError, match=r"q_proj.weight_scale.*\(63, 1\).*\(64, 1\)"):
        load_quantized(saved)


def test_missing_shard_and_manifest(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_quantized(saved)
    (saved / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_quantized(saved)


def test_edited_module_list_is_refused(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["modules"].pop("model.layers.0.mlp.down_proj")
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json has .* bytes, the manifest says"):
        load_quantized(saved)  # the manifest covers config.json
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    file = saved / "config.json"
    manifest["files"]["config.json"] = {"sha256": _sha256(file), "bytes": file.stat().st_size}
    (saved / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not match"):
        load_quantized(saved)  # and with the manifest fixed up, the module list does not match the model


def test_not_a_quantmint_checkpoint(tmp_path: Path) -> None:
    build_tiny("llama").save_pretrained(tmp_path / "float")
    with pytest.raises(CheckpointError, match="not a quantmint checkpoint"):
        load_quantized(tmp_path / "float")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(123) == 123
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size("2 parsecs")


def test_a_loaded_checkpoint_saves_again_identically(tmp_path: Path, input_ids: torch.Tensor) -> None:
    save_quantized(_quantized("gpt2"), tmp_path / "a")
    first = load_quantized(tmp_path / "a")
    save_quantized(first, tmp_path / "b")
    second = load_quantized(tmp_path / "b")
    assert torch.equal(model_output(second, input_ids), model_output(first, input_ids))
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_copying_tokenizer_files_from_a_directory_without_any_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(CheckpointError, match="holds no tokenizer files"):
        checkpoint.copy_tokenizer_files(tmp_path / "src", tmp_path / "dst")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    assert checkpoint.copy_tokenizer_files(tmp_path / "src", tmp_path / "dst") == ["tokenizer.json"]
