"""vLLM serves a third-party family's checkpoint whichever vLLM model class runs it.

vLLM 0.32 has no GPT-NeoX class of its own: it runs examples/quantmint-gptneox's models through its
Transformers modeling backend, which renames the base model (`gpt_neox.` -> `model.`) and hands that
weight-name mapping to the quantization config (`QuantmintConfig.apply_vllm_mapper`). Marked and skipped
like tests/test_vllm.py (QUANTMINT_REQUIRE_VLLM=1 turns a missing vLLM into a failure); the end-to-end
tests start vLLM in its own process (~30 s each on 2 CPU cores).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_example_gptneox import install_example, make_tiny_gptneox, plugin_env, run_python
from test_vllm import (
    HAVE_VLLM,
    PROMPTS,
    agreement,
    reference_generate,
    run_vllm,
    tiny_checkpoint,  # noqa: F401  (a fixture, used by name)
)

from quantmint.formats.checkpoint import load_quantized

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed: pip install 'quantmint[vllm]'"),
]

# Head size 64 (vLLM's CPU attention takes it), a quarter of each head rotated, parallel residual.
VLLM_TINY = {"hidden_size": 256, "intermediate_size": 512, "max_position_embeddings": 256}

# Quantize (in a process that sees the installed plugin) and write quantmint's own greedy tokens and
# teacher-forced log-probabilities, which the vLLM tests compare with.
QUANTIZE_AND_REFERENCE = """
import sys, json, torch, quantmint
from quantmint.io.models import load_float_model
sys.path.insert(0, sys.argv[4])
from conftest import byte_tokenizer
model_dir, out, preset = sys.argv[1], sys.argv[2], sys.argv[3]
prompts, max_tokens = json.loads(sys.argv[5]), 16
torch.manual_seed(1)
calibration = [torch.randint(0, 256, (64,)) for _ in range(8)]
model = quantmint.quantize(load_float_model(model_dir), preset, calibration=calibration)
path = quantmint.save_quantized(model, out, tokenizer=byte_tokenizer())
model = quantmint.load_quantized(path)
greedy, logprobs = [], []
with torch.no_grad():
    for ids in prompts:
        x = torch.tensor([ids])
        y = model.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        greedy.append(y[0, x.shape[1]:].tolist())
        lp = model(x).logits[0].float().log_softmax(-1)
        logprobs.append(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist())
print(json.dumps({"greedy": greedy, "logprobs": logprobs}))
"""


@pytest.fixture(scope="module")
def gptneox_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def gptneox_checkpoint(
    gptneox_site: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:  # (preset) -> (checkpoint dir, quantmint's reference)
    root = tmp_path_factory.mktemp("vllm-gptneox")
    model = make_tiny_gptneox(gptneox_site, root / "float", **VLLM_TINY)
    cache: dict[str, tuple[Path, dict[str, Any]]] = {}

    def make(preset: str) -> tuple[Path, dict[str, Any]]:
        if preset not in cache:
            out = root / preset
            tests = str(Path(__file__).resolve().parent)
            result = run_python(
                gptneox_site, QUANTIZE_AND_REFERENCE, str(model), str(out), preset, tests, json.dumps(PROMPTS)
            )
            assert result.returncode == 0, result.stderr[-3000:]
            cache[preset] = out, json.loads(result.stdout.strip().splitlines()[-1])
        return cache[preset]

    return make


def _vllm_env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": plugin_env(site)["PYTHONPATH"]}  # vLLM's processes must see the plugin too


# ---------------------------------------------------------------- the name mapping, without an engine


def _config(modules: dict[str, str], **extra: Any) -> Any:
    from quantmint.backends.vllm.config import QuantmintConfig
    from quantmint.config import get_preset

    block = {
        "quant_method": "quantmint",
        "format_version": 1,
        "scheme": "w8a8",
        "family": "gpt2",  # a built-in family: the mapping is the same for every family
        "config": get_preset("w8a8").with_updates(mode="deploy").to_dict(),
        "modules": modules,
        "kv_cache_modules": [],
        **extra,
    }
    return QuantmintConfig.from_config(block)


def _transformers_backend_mapper(base_model_prefix: str) -> Any:
    """The rename vLLM's Transformers backend builds for a base model saved under another prefix
    (`Base._create_hf_to_vllm_mapper`), as `apply_vllm_mapper` receives it."""
    from vllm.model_executor.models.utils import WeightsMapper

    return WeightsMapper(
        orig_to_new_regex={re.compile(rf"^{base_model_prefix}\.(.+)"): r"model.\1"}
    ).get_rename_mapper()


def test_checkpoint_names_are_mapped_to_the_engines_names() -> None:
    modules = {
        f"transformer.h.0.{n}": "w8a8" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    config = _config(modules, rotated_modules=["transformer.h.0.mlp.c_proj"])
    # before the mapping, the Transformers backend's layer names do not end in the checkpoint's
    assert config.scheme_for("model.h.0.attn.c_attn") is None
    config = _config(modules, rotated_modules=["transformer.h.0.mlp.c_proj"])
    config.apply_vllm_mapper(_transformers_backend_mapper("transformer"))
    assert set(config.modules) == {name.replace("transformer.", "model.", 1) for name in modules}
    assert config.checkpoint_names["model.h.0.attn.c_attn"] == "transformer.h.0.attn.c_attn"
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert config.scheme_for(f"model.h.0.{name}") == "w8a8"
    assert config.is_rotated("model.h.0.mlp.c_proj") and not config.is_rotated("model.h.0.mlp.c_fc")
    assert config.scheme_for("model.h.1.mlp.c_fc") is None  # block 1 stays float
    config.check_every_module_served()  # every quantized module found its layer


def test_a_quantized_module_no_layer_matches_is_refused_in_one_line() -> None:
    from quantmint.errors import CheckpointError

    modules = {"transformer.h.0.mlp.c_fc": "w8a8", "transformer.h.0.mlp.fc_out": "w8a8"}
    config = _config(modules)
    config.apply_vllm_mapper(_transformers_backend_mapper("transformer"))
    assert config.scheme_for("model.h.0.mlp.c_fc") == "w8a8"
    assert config.scheme_for("model.h.0.mlp.c_proj") is None  # the layer the checkpoint misnamed
    with pytest.raises(CheckpointError) as refused:
        config.check_every_module_served()
    message = str(refused.value)
    assert "\n" not in message
    assert "'transformer.h.0.mlp.fc_out' (looked for as 'model.h.0.mlp.fc_out')" in message
    assert "c_fc" not in message and "match no linear layer of the vLLM model" in message
    config.check_every_module_served()  # checked once per engine process


def test_a_name_the_mapper_drops_is_still_looked_for() -> None:
    from vllm.model_executor.models.utils import WeightsMapper

    config = _config({"transformer.h.0.mlp.c_fc": "w8a8"})
    config.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"transformer.": None}))
    assert config.scheme_for("transformer.h.0.mlp.c_fc") == "w8a8"


# ---------------------------------------------------------------- end to end: GPT-NeoX through vLLM


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8a8", "w8a16"])
def test_gptneox_greedy_tokens_from_vllm_equal_the_torch_runtimes(
    preset: str, gptneox_checkpoint: Any, gptneox_site: Path, tmp_path: Path
) -> None:
    """vLLM's Transformers backend runs GPT-NeoX with quantmint's int8 layers: the fused, head-interleaved
    `query_key_value` keeps its rows (the backend does not fuse it: it is viewed per head, not split into
    q, k, v widths), so greedy tokens and teacher-forced log-probabilities agree with quantmint's runtime.
    As in test_vllm.py: first tokens equal, free-running agreement and a log-probability drift bound
    that holds on any x86 CPU (W8A8's per-token rounding may flip on an ulp of float noise)."""
    path, want = gptneox_checkpoint(preset)
    tasks = [
        {"kind": "generate", "prompts": PROMPTS, "max_tokens": 16},
        {"kind": "prompt_logprobs", "prompts": PROMPTS},
    ]
    out = run_vllm({"model": str(path), "tasks": tasks}, tmp_path, env=_vllm_env(gptneox_site))
    assert "error" not in out, out.get("traceback", out)
    got = out["results"][0]["value"]
    assert [g[0] for g in got] == [w[0] for w in want["greedy"]], (got, want["greedy"])
    assert agreement(got, want["greedy"]) >= 0.75, (got, want["greedy"])
    served = [x for row in out["results"][1]["value"] for x in row]
    exact = [x for row in want["logprobs"] for x in row]
    drift = sorted(abs(a - b) for a, b in zip(served, exact, strict=True))
    assert drift[len(drift) // 2] <= 2e-3 and drift[-1] <= 0.1, drift


@pytest.mark.slow
def test_llama_through_vllms_transformers_backend_agrees(
    tiny_checkpoint: Any,  # noqa: F811  (test_vllm.py's fixture)
    tmp_path: Path,
) -> None:
    """The same W8A8 Llama checkpoint that vLLM's own LlamaForCausalLM serves (tests/test_vllm.py), served
    by the Transformers backend instead: it fuses q/k/v and gate/up (QKVParallelLinear,
    MergedColumnParallelLinear) and loads each part's int8 rows and scales into the fused layer."""
    path = tiny_checkpoint("llama", "w8a8")
    tasks = [
        {"kind": "generate", "prompts": PROMPTS, "max_tokens": 16},
        {"kind": "prompt_logprobs", "prompts": PROMPTS},
    ]
    out = run_vllm({"model": str(path), "model_impl": "transformers", "tasks": tasks}, tmp_path)
    assert "error" not in out, out.get("traceback", out)
    model = load_quantized(path)
    want = reference_generate(model, PROMPTS, 16)
    got = out["results"][0]["value"]
    assert [g[0] for g in got] == [w[0] for w in want] and agreement(got, want) >= 0.75, (got, want)
    drift = []
    for ids, served in zip(PROMPTS, out["results"][1]["value"], strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        exact = logits[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        drift += (torch.tensor(served) - exact).abs().tolist()
    drift.sort()
    assert drift[len(drift) // 2] <= 2e-3 and drift[-1] <= 0.1, drift


@pytest.mark.slow
def test_a_checkpoint_module_vllm_does_not_have_is_refused_in_quantmints_words(
    gptneox_checkpoint: Any, gptneox_site: Path, tmp_path: Path
) -> None:
    """A module name no vLLM layer has (here: misspelt in the checkpoint's config) is refused before vLLM
    loads its int8 weights into a float layer and fails with its own 'no module or parameter named'."""
    path, _ = gptneox_checkpoint("w8a16")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    modules["gpt_neox.layers.1.mlp.fc_out"] = modules.pop("gpt_neox.layers.1.mlp.dense_4h_to_h")
    (bad / "config.json").write_text(json.dumps(config))
    job = {"model": str(bad), "tasks": [{"kind": "generate", "prompts": PROMPTS[:1], "max_tokens": 2}]}
    out = run_vllm(job, tmp_path, env=_vllm_env(gptneox_site))
    assert "error" in out
    logged = "\n".join(out["quantmint_log"]) + out.get("traceback", "")
    lines = [line for line in logged.splitlines() if "match no linear layer of the vLLM model" in line]
    assert lines, logged[-4000:]
    assert "'gpt_neox.layers.1.mlp.fc_out' (looked for as 'model.layers.1.mlp.fc_out')" in lines[0]
    assert "There is no module or parameter named" not in logged
