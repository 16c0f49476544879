"""`transformers.AutoModel*.from_pretrained` on quantmint checkpoints, once `import quantmint` has run:
the same int8 model as `load_quantized`, with the same checks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

import quantmint
from quantmint import CheckpointError, ConfigError, load_quantized, quant_state, quantize, save_quantized
from quantmint.backends.torch.int4_linear import Int4WeightOnlyLinear
from quantmint.backends.torch.int8_linear import Int8Linear
from quantmint.backends.torch.int8_weight_only import Int8WeightOnlyLinear
from quantmint.backends.torch.kv_cache import Int8KVCache
from quantmint.formats.transformers_quantizer import QuantmintConfig
from tests.conftest import VOCAB, build_tiny, model_output

CELLS = {
    "w8a16": Int8WeightOnlyLinear,
    "w8a8": Int8Linear,
    "w8a8-c8": Int8Linear,
    "w4a16": Int4WeightOnlyLinear,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each tiny model quantized once per preset and saved: {(family, preset): directory}."""
    torch.manual_seed(3)
    calibration = [torch.randint(0, VOCAB, (48,)) for _ in range(8)]
    out = {}
    for family, preset in [
        ("llama", "w8a16"),
        ("llama", "w8a8"),
        ("llama", "w8a8-c8"),
        ("llama", "w4a16"),
        ("gpt2", "w8a8-c8"),
        ("bert", "w8a16"),
        ("bert", "w8a8"),
    ]:
        calibrate = preset not in ("w8a16", "w4a16")
        model = quantize(build_tiny(family), preset, calibration=calibration if calibrate else None)
        out[family, preset] = save_quantized(model, tmp_path_factory.mktemp(f"{family}-{preset}") / "q")
    return out


def assert_same_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    """Both doors build the same cells from the same safetensors bytes, so outputs are normally equal.
    Vectorized float kernels may still sum in another order on buffers of another alignment (see
    tests/test_kv_cache.py: an ulp, which at a rounding midpoint of a per-token int8 activation moves
    one code and a logit by ~1e-3). A float load of the int8 codes, a lost scale or a float cache
    moves outputs by orders of magnitude more, so: atol 1e-2 on logits of magnitude ~1, rtol 0."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2)


@pytest.mark.parametrize("preset", ["w8a16", "w8a8", "w8a8-c8", "w4a16"])
def test_causal_lm_loads_as_load_quantized(checkpoints, preset: str) -> None:
    path = checkpoints["llama", preset]
    ours = load_quantized(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(theirs) is type(ours)
    assert isinstance(theirs.model.layers[0].mlp.down_proj, CELLS[preset])
    assert not any(t.is_meta for t in [*theirs.parameters(), *theirs.buffers()])
    assert quant_state(theirs).modules == quant_state(ours).modules
    assert not theirs.training
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24))
    assert_same_outputs(model_output(theirs, ids), model_output(ours, ids))
    # the logits are those of the int8 model, not of a float one (the float model differs by far more)
    assert (model_output(theirs, ids) - model_output(build_tiny("llama"), ids)).abs().max() > 0


@pytest.mark.parametrize(
    ("family", "preset"), [("llama", "w8a16"), ("llama", "w8a8-c8"), ("gpt2", "w8a8-c8")]
)
def test_greedy_generation_matches_load_quantized(checkpoints, family: str, preset: str) -> None:
    path = checkpoints[family, preset]
    ours = load_quantized(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 12))
    kv = {"past_key_values": Int8KVCache.for_model(ours)} if quant_state(ours).kv_modules else {}
    want = ours.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, **kv)
    got = theirs.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_c8_generate_uses_the_int8_cache_by_default(checkpoints, family: str) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family, "w8a8-c8"])
    ids = torch.randint(0, VOCAB, (1, 8))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, Int8KVCache)
    assert out.past_key_values.layers[0].q_keys.dtype == torch.int8
    # a cache the caller passes is used as it is
    mine = DynamicCache(config=model.config)
    out = model.generate(
        ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, past_key_values=mine
    )
    assert out.past_key_values is mine


def test_w8a16_generate_keeps_the_float_cache(checkpoints) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama", "w8a16"])
    out = model.generate(
        torch.randint(0, VOCAB, (1, 8)), max_new_tokens=2, do_sample=False, return_dict_in_generate=True
    )
    assert not isinstance(out.past_key_values, Int8KVCache)


@pytest.mark.parametrize("preset", ["w8a16", "w8a8"])
def test_encoder_loads_with_auto_model(checkpoints, preset: str) -> None:
    path = checkpoints["bert", preset]
    ours = load_quantized(path)
    theirs = transformers.AutoModel.from_pretrained(path)
    assert type(theirs) is transformers.BertModel
    assert isinstance(theirs.encoder.layer[0].intermediate.dense, CELLS[preset])
    ids = torch.randint(0, VOCAB, (2, 16))
    assert_same_outputs(model_output(theirs, ids), model_output(ours, ids))


def test_dtype_arguments(checkpoints) -> None:
    path = checkpoints["llama", "w8a16"]
    for kwargs in ({"dtype": "auto"}, {"dtype": torch.float32}, {"torch_dtype": torch.float32}):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        assert model.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match=r"dtype torch.bfloat16 asked for.*saved in torch.float32"):
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def test_device_map(checkpoints) -> None:
    path = checkpoints["llama", "w8a16"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    assert {p.device.type for p in model.state_dict().values()} == {"cpu"}
    with pytest.raises(ConfigError, match="loads onto one device"):
        transformers.AutoModelForCausalLM.from_pretrained(
            path, device_map={"model": "cpu", "lm_head": "meta"}
        )
    with pytest.raises(ConfigError, match="is not one device"):
        transformers.AutoModelForCausalLM.from_pretrained(path, device_map="auto")


def test_tampered_checkpoints_are_refused(checkpoints, tmp_path: Path) -> None:
    import shutil

    shard = tmp_path / "shard"
    shutil.copytree(checkpoints["llama", "w8a16"], shard)
    data = bytearray((shard / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (shard / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors fails its sha256 check"):
        transformers.AutoModelForCausalLM.from_pretrained(shard)

    edited = tmp_path / "edited"
    shutil.copytree(checkpoints["llama", "w8a16"], edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["modules"].popitem()
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json has \d+ bytes, the manifest says"):
        transformers.AutoModelForCausalLM.from_pretrained(edited)
    # the same edit with the manifest updated to cover it: the module check still refuses it
    manifest = json.loads((edited / "quantmint_manifest.json").read_text())
    manifest["files"]["config.json"] = {
        "sha256": hashlib.sha256((edited / "config.json").read_bytes()).hexdigest(),
        "bytes": (edited / "config.json").stat().st_size,
    }
    (edited / "quantmint_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="quantized modules listed in config.json do not match"):
        transformers.AutoModelForCausalLM.from_pretrained(edited)

    unlisted = tmp_path / "no-manifest"
    shutil.copytree(checkpoints["llama", "w8a16"], unlisted)
    (unlisted / "quantmint_manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no quantmint_manifest.json"):
        transformers.AutoModelForCausalLM.from_pretrained(unlisted)


def test_what_cannot_work_is_refused(checkpoints, tiny_model_dir) -> None:
    with pytest.raises(ConfigError, match="holds a quantized LlamaForCausalLM.*asked for a LlamaModel"):
        transformers.AutoModel.from_pretrained(checkpoints["llama", "w8a16"])
    with pytest.raises(ConfigError, match="quantmint does not quantize while loading"):
        transformers.AutoModelForCausalLM.from_pretrained(
            tiny_model_dir("llama"), quantization_config=QuantmintConfig()
        )
    # another method's config for a quantmint checkpoint: transformers' own refusal
    with pytest.raises(ValueError, match="quantized with QuantmintConfig"):
        transformers.AutoModelForCausalLM.from_pretrained(
            checkpoints["llama", "w8a16"], quantization_config=transformers.GPTQConfig(bits=4)
        )


def test_quantmint_never_float_loads_a_checkpoint(checkpoints) -> None:
    from quantmint.io.models import load_float_model, load_model

    path = checkpoints["llama", "w8a16"]
    with pytest.raises(quantmint.QuantmintError, match="already quantized"):
        load_float_model(path)
    assert isinstance(load_model(path).model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)


def test_import_registers_lazily() -> None:
    """`import quantmint` imports neither transformers nor vLLM; transformers' quantizer table knows
    `quantmint` as soon as it is imported, and saving the loaded config gives the block back."""
    code = (
        "import sys, quantmint\n"
        "assert 'transformers' not in sys.modules and 'vllm' not in sys.modules, sorted(sys.modules)\n"
        "from transformers.quantizers import auto\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['quantmint'].__name__ == 'QuantmintHfQuantizer'\n"
        "assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING['quantmint'].__name__ == 'QuantmintConfig'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_config_keeps_the_block(checkpoints) -> None:
    path = checkpoints["llama", "w8a8-c8"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    block = json.loads((path / "config.json").read_text())["quantization_config"]
    assert model.config.quantization_config.to_dict() == block
    assert model.is_quantized


def test_without_import_quantmint_transformers_loads_garbage(checkpoints) -> None:
    """What the README says happens without `import quantmint`: transformers skips the unknown method
    and loads the int8 codes as float weights (so the import is what makes the load right)."""
    code = (
        "import sys, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(checkpoints['llama', 'w8a16'])!r})\n"
        "assert 'quantmint' not in sys.modules\n"
        "layer = m.model.layers[0].mlp.down_proj\n"
        "print(type(layer).__name__, layer.weight.dtype)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Unknown quantization type, got quantmint" in done.stdout + done.stderr
    assert done.stdout.split()[-2:] == ["Linear", "torch.float32"]


def test_a_device_no_runtime_serves_is_refused(checkpoints, monkeypatch) -> None:
    """Before anything is read: the runtime that would serve each scheme on that device is looked up."""
    from quantmint.extension import registry

    def no_gpu(scheme: str, device=None):
        raise quantmint.NotSupportedError(f"no runtime serves scheme {scheme!r} on device 'cuda'")

    monkeypatch.setattr(registry, "cell_class", no_gpu)
    with pytest.raises(
        quantmint.NotSupportedError,
        match=r"device_map puts the model on 'cuda:0': no runtime serves scheme 'w8a8'",
    ):
        transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama", "w8a8"], device_map="cuda:0")
