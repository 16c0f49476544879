"""A family is checked when its layout is resolved: paths, smoothing-pair shapes and exactness."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from quantmint.errors import ModelMappingError
from quantmint.extension import family as family_mod
from quantmint.extension import registry
from quantmint.extension.family import SmoothPair, resolve_layout
from tests.conftest import build_tiny

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    family_mod._EXACT_CHECKED.clear()


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_builtin_families_pass(name: str) -> None:
    model = build_tiny(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = resolve_layout(model, registry.find_family(model))
    assert layout.blocks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the check changed the model"


def _with_pairs(model: torch.nn.Module, *pairs: SmoothPair) -> family_mod.ModelFamily:
    return dataclasses.replace(registry.find_family(model), name="broken", smooth_pairs=pairs)


@pytest.mark.parametrize(
    ("model_name", "pair", "words"),
    [
        # across SiLU (gate) / GELU: not exact
        ("llama", SmoothPair("mlp.gate_proj", ("mlp.down_proj",)), "is not exact"),
        ("gpt2", SmoothPair("mlp.c_fc", ("mlp.c_proj",)), "is not exact"),
        # the wrong norm: post_attention_layernorm does not feed q/k/v
        ("llama", SmoothPair("post_attention_layernorm", _ATTN), "is not exact"),
        # a pair whose shapes do not match: the MLP's input norm does not feed down_proj's 128 inputs
        ("llama", SmoothPair("post_attention_layernorm", ("mlp.down_proj",)), "64 channels"),
        ("llama", SmoothPair("mlp.up_proj", ("self_attn.o_proj",)), "128 output channels"),
        # a misspelt path
        ("llama", SmoothPair("input_layrnorm", _ATTN), "'input_layrnorm'"),
        ("llama", SmoothPair("input_layernorm", ("self_attn.q_prj",)), "'self_attn.q_prj'"),
    ],
)
def test_broken_pair_is_refused_in_one_line(model_name: str, pair: SmoothPair, words: str) -> None:
    model = build_tiny(model_name)
    family = _with_pairs(model, pair)
    with pytest.raises(ModelMappingError) as err:
        resolve_layout(model, family)
    message = str(err.value)
    assert "\n" not in message
    assert "'broken'" in message and words in message
    assert pair.prev in message or any(rel in message for rel in pair.linears)
    assert "fix" in message or "remove" in message


def test_non_exact_pair_names_the_pair_and_the_fix() -> None:
    model = build_tiny("gpt2")
    family = _with_pairs(model, SmoothPair("ln_1", ("attn.c_attn",)), SmoothPair("mlp.c_fc", ("mlp.c_proj",)))
    with pytest.raises(ModelMappingError, match=r"SmoothPair\('mlp.c_fc', \('mlp.c_proj',\)\).*remove it"):
        resolve_layout(model, family)


def test_the_check_runs_once_per_model_config() -> None:
    model = build_tiny("llama")
    family = registry.find_family(model)
    resolve_layout(model, family)
    assert len(family_mod._EXACT_CHECKED) == 1
    resolve_layout(build_tiny("llama", seed=3), family)
    assert len(family_mod._EXACT_CHECKED) == 1


def test_smooth_quant_refuses_a_mismatched_pair_instead_of_skipping_it() -> None:
    from quantmint.algorithms.smooth_quant import SmoothQuant

    model = build_tiny("llama")
    family = _with_pairs(model, SmoothPair("post_attention_layernorm", ("mlp.down_proj",)))
    block = resolve_layout(model, registry.find_family(model)).blocks[0]
    with pytest.raises(ModelMappingError, match="post_attention_layernorm"):
        SmoothQuant()._smooth_pair(block.module, family.smooth_pairs[0], family.adapter, torch.ones(128))


# --- plugin errors in one line ---------------------------------------------------------------------


def _fake_dist(root: Path, module: str, source: str) -> None:
    """A package 'installed' without pip: its module and a dist-info whose entry point names it."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[quantmint]\n{module} = {module}\n")


def _run(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("QUANTMINT_PLUGINS", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


_FAMILY = (
    "from quantmint import ModelFamily, hookimpl\n"
    "F = ModelFamily(name='fam', architectures=('FamModel',), blocks='layers', linears=('fc',))\n"
)
_LOAD_FAMILIES = (
    "from quantmint.extension import registry\n"
    "from quantmint.errors import PluginError\n"
    "try:\n    registry.model_families()\n"
    "except PluginError as exc:\n    print('PluginError:', exc)\n"
)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        # misspelt hook name
        (_FAMILY + "@hookimpl\ndef register_model_familes(register):\n    register(F)\n", "misspelt"),
        # wrong argument name
        (_FAMILY + "@hookimpl\ndef register_model_families(reg):\n    reg(F)\n", "register_model_families("),
        # no @hookimpl
        (_FAMILY + "def register_model_families(register):\n    register(F)\n", "missing @hookimpl?"),
        # the hook itself fails
        (_FAMILY + "@hookimpl\ndef register_model_families(register):\n    1 / 0\n", "ZeroDivisionError"),
    ],
    ids=["misspelt-hook", "wrong-argument", "no-hookimpl", "hook-raises"],
)
def test_plugin_errors_are_one_line_naming_the_plugin(tmp_path: Path, source: str, words: str) -> None:
    _fake_dist(tmp_path, "broken_family", source)
    result = _run(tmp_path, _LOAD_FAMILIES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PluginError: plugin 'broken_family'"), result.stdout
    assert words in result.stdout
    assert result.stdout.count("\n") == 1


# --- quantmint plugins --------------------------------------------------------------------------------


def test_plugins_command_lists_packages_and_registrations(capsys: pytest.CaptureFixture[str]) -> None:
    from quantmint.tools.cli import main

    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["llama"]["module"] == "quantmint.plugins.llama"
    assert rows["llama"]["distribution"] == "quantmint" and rows["llama"]["version"]
    assert rows["llama"]["families"] == ["llama"]
    assert "rtn" in rows["builtin_algorithms"]["algorithms"]
    assert rows["torch_runtime"]["runtimes"] == ["torch"]
    assert rows["vllm_backend"]["commands"] == ["serve"]
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "llama  (quantmint.plugins.llama, quantmint " in text and "  families: llama" in text


# --- check-family -------------------------------------------------------------------------------------


def test_check_family_command_passes_a_builtin_family(
    tiny_model_dir: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from quantmint.tools.cli import main

    assert main(["check-family", str(tiny_model_dir("llama")), "--skip-vllm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["ok", "ok", "ok", "skip"]
    assert "kv capture: model.layers.0 hands its K/V to the cache (32 channels" in lines[1]
    assert lines[-1].endswith("vllm round trip: not asked for")


@pytest.mark.slow
@pytest.mark.vllm
def test_check_family_serves_the_checkpoint_with_vllm() -> None:
    """With vLLM installed, check-family serves its w8a16 checkpoint and compares greedy tokens with the
    torch runtime (a model with vLLM CPU's head size, 64)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("QUANTMINT_REQUIRE_VLLM") == "1":
            raise
        pytest.skip("vLLM is not installed: pip install 'quantmint[vllm]'")
    from quantmint.testing import check_family

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=256,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    results = check_family(transformers.LlamaForCausalLM(config).eval())
    assert [r.status for r in results] == ["ok"] * 4, [r.line() for r in results]
    assert "greedy tokens served by vLLM agree" in results[-1].detail


def test_check_family_refuses_a_broken_family(
    temporary_plugin: Callable[[object, str], None], capsys: pytest.CaptureFixture[str]
) -> None:
    from quantmint.extension.hookspecs import hookimpl
    from quantmint.testing import check_family

    model = build_tiny("gpt2")
    broken = dataclasses.replace(
        registry.find_family(model),
        name="broken_gpt2",
        architectures=("NoSuchModel",),
        smooth_pairs=(SmoothPair("mlp.c_fc", ("mlp.c_proj",)),),
    )

    class Plugin:
        @staticmethod
        @hookimpl
        def register_model_families(register: Callable[[object], None]) -> None:
            register(broken)

    temporary_plugin(Plugin, "broken_gpt2")
    results = check_family(model, family="broken_gpt2")
    assert [(r.name, r.status) for r in results] == [("resolve", "fail")]
    assert "SmoothPair('mlp.c_fc'" in results[0].detail and "not exact" in results[0].detail
