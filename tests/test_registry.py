from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from quantmint import (
    ModelFamily,
    ModelMappingError,
    NotSupportedError,
    PluginError,
    UnknownModelFamilyError,
    hookimpl,
    quantize,
)
from quantmint.backends.torch import Int8Linear, Int8WeightOnlyLinear
from quantmint.extension import registry
from quantmint.extension.family import resolve_layout
from quantmint.extension.runtime import Runtime
from tests.conftest import build_tiny


def test_builtin_families_come_from_entry_points() -> None:
    families = registry.model_families()
    assert {"llama", "gpt2", "bert"} <= set(families)
    pm = registry.get_plugin_manager()
    # registered under their entry-point names, exactly as a third-party package would be
    assert {"llama", "gpt2", "bert", "torch_runtime"} <= {name for name, _ in pm.list_name_plugin()}
    assert "w8a16" in registry.cell_classes()
    assert set(registry.runtimes()["torch"].schemes) == {"w8a16", "w8a8", "w4a16", "w4a8"}


def _runtime_plugin(runtime: Runtime) -> object:
    class Plugin:
        @hookimpl
        def register_runtimes(self, register):
            register(runtime)

    return Plugin()


class FastW8A16(Int8WeightOnlyLinear):
    scheme = "w8a16"


def test_cells_are_chosen_by_scheme_device_and_priority(temporary_plugin) -> None:
    temporary_plugin(
        _runtime_plugin(Runtime(name="fast-cpu", cells=(FastW8A16,), devices=("cpu",), priority=10)), "fast"
    )
    assert registry.cell_class("w8a16", "cpu") is FastW8A16
    assert registry.cell_class("w8a16", torch.device("cpu")) is FastW8A16
    # the torch runtime serves every device
    assert registry.cell_class("w8a16", "cuda") is Int8WeightOnlyLinear
    assert registry.cell_class("w8a8", "cpu") is Int8Linear  # the fast runtime does not serve it
    quantized = quantize(build_tiny("llama"), "w8a16")
    assert isinstance(quantized.model.layers[0].mlp.down_proj, FastW8A16)


def test_two_runtimes_of_one_priority_serving_a_scheme_are_named(temporary_plugin) -> None:
    temporary_plugin(_runtime_plugin(Runtime(name="other", cells=(FastW8A16,))), "other")
    with pytest.raises(PluginError, match="'other', 'torch' both serve scheme 'w8a16'.*QUANTMINT_PLUGINS"):
        registry.cell_class("w8a16")
    assert registry.cell_class("w8a8") is Int8Linear


def test_a_scheme_no_runtime_serves_names_what_is_registered() -> None:
    with pytest.raises(NotSupportedError, match=r"scheme 'w2a2' on device 'cpu' \(registered: torch: w4a16"):
        registry.cell_class("w2a2", "cpu")


def test_a_runtime_must_list_quantized_linear_classes(temporary_plugin) -> None:
    temporary_plugin(_runtime_plugin(Runtime(name="bad", cells=(nn.Linear,))), "bad-runtime")
    with pytest.raises(PluginError, match="'bad-runtime'.*not a QuantizedLinear class"):
        registry.runtimes()


@pytest.mark.parametrize(
    ("family", "arch"),
    [
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("gpt2", "GPT2LMHeadModel"),
        ("bert", "BertModel"),
    ],
)
def test_find_family_by_architecture(family: str, arch: str) -> None:
    model = build_tiny(family)
    found = registry.find_family(model)
    assert arch in found.architectures
    layout = resolve_layout(model, found)
    assert len(layout.blocks) == 2
    assert len(list(layout.linears())) == 2 * len(found.linears)


def test_base_models_share_the_declaration() -> None:
    model = build_tiny("llama").model  # LlamaModel, no LM head
    layout = resolve_layout(model, registry.find_family(model))
    assert layout.blocks[0].name == "layers.0"


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_unknown_model_lists_known_architectures_and_the_guide() -> None:
    with pytest.raises(UnknownModelFamilyError) as err:
        quantize(Unknown(), "w8a16")
    msg = str(err.value)
    assert "Unknown" in msg and "LlamaForCausalLM" in msg and "GPT2LMHeadModel" in msg
    assert "Writing a model-family plugin" in msg


def test_forcing_an_unknown_family_name() -> None:
    with pytest.raises(UnknownModelFamilyError, match="'opt'"):
        registry.find_family(Unknown(), name="opt")


def test_a_family_that_does_not_fit_the_model_says_which_path(temporary_plugin) -> None:
    class Broken:
        @hookimpl
        def register_model_families(self, register):
            register(
                ModelFamily(name="broken", architectures=("Unknown",), blocks="layers", linears=("proj",))
            )

    temporary_plugin(Broken(), "broken-plugin")
    with pytest.raises(ModelMappingError, match="'broken'.*'layers'"):
        quantize(Unknown(), "w8a16")


def test_missing_linear_is_named(temporary_plugin) -> None:
    family = ModelFamily(
        name="llama-typo", architectures=("LlamaTypo",), blocks="layers", linears=("self_attn.q_prj",)
    )

    class Plugin:
        @hookimpl
        def register_model_families(self, register):
            register(family)

    temporary_plugin(Plugin(), "typo")
    model = build_tiny("llama")
    with pytest.raises(ModelMappingError, match=r"model\.layers\.0\.self_attn\.q_prj"):
        resolve_layout(model, family)


def test_duplicate_family_names_both_plugins(temporary_plugin) -> None:
    class Dup:
        @hookimpl
        def register_model_families(self, register):
            register(ModelFamily(name="llama", architectures=("Other",), blocks="x", linears=()))

    temporary_plugin(Dup(), "dup-plugin")
    with pytest.raises(PluginError) as err:
        registry.model_families()
    assert "'llama'" in str(err.value) and "'dup-plugin'" in str(err.value)


def test_duplicate_architecture_names_both_families(temporary_plugin) -> None:
    class Dup:
        @hookimpl
        def register_model_families(self, register):
            register(ModelFamily(name="llama2", architectures=("LlamaForCausalLM",), blocks="x", linears=()))

    temporary_plugin(Dup(), "dup-arch")
    with pytest.raises(PluginError, match="'LlamaForCausalLM'.*'llama'.*'llama2'"):
        registry.model_families()


def test_registering_something_else_is_refused(temporary_plugin) -> None:
    class Bad:
        @hookimpl
        def register_model_families(self, register):
            register({"name": "x"})

    temporary_plugin(Bad(), "bad")
    with pytest.raises(PluginError, match="not a quantmint ModelFamily"):
        registry.model_families()


def test_misspelt_hook_fails_loudly() -> None:
    class Misspelt:
        @hookimpl
        def register_model_familes(self, register):  # typo
            pass

    pm = registry.get_plugin_manager()
    plugin = Misspelt()
    pm.register(plugin, name="misspelt")
    try:
        with pytest.raises(Exception, match="register_model_familes"):
            pm.check_pending()
    finally:
        pm.unregister(plugin)


def _families_in_subprocess(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop(registry.PLUGINS_ENV, None)
    if env_value is not None:
        env[registry.PLUGINS_ENV] = env_value
    code = "from quantmint import registry; print(sorted(registry.model_families()))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout


def test_allow_list_environment_variable() -> None:
    assert "'gpt2'" in _families_in_subprocess(None)
    only_llama = _families_in_subprocess("llama,torch_runtime")
    assert "'llama'" in only_llama and "'gpt2'" not in only_llama and "'bert'" not in only_llama
    assert _families_in_subprocess("").strip() == "[]"


def test_gpt2_conv1d_is_transparent() -> None:
    model = build_tiny("gpt2")
    family = registry.find_family(model)
    conv = model.transformer.h[0].attn.c_attn
    w = family.adapter.weight(conv)
    assert w.shape == (conv.nf, conv.weight.shape[0])  # [out, in]
    x = torch.randn(3, conv.weight.shape[0])
    assert torch.allclose(conv(x), x @ w.T + conv.bias, atol=1e-6)


def test_serving_needs_must_name_declared_linears_and_architectures(temporary_plugin) -> None:
    from quantmint.extension.family import ServingNeeds

    family = ModelFamily(
        name="conv",
        architectures=("Conv",),
        blocks="h",
        linears=("attn.c_attn",),
        serving=ServingNeeds(transposed_linears=("attn.c_atn",)),
    )

    class Plugin:
        @hookimpl
        def register_model_families(self, register):
            register(family)

    temporary_plugin(Plugin(), "conv-plugin")
    with pytest.raises(PluginError, match=r"'conv'.*transposed_linears \['attn.c_atn'\]"):
        registry.model_families()
