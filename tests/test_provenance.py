"""Provenance: a checkpoint records the distribution that provided its family, and loading it without that
package installed says, in one line, which package to install (docs/checkpoint-format.md, Provenance)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import build_tiny

import quantmint
from quantmint import hookimpl
from quantmint.errors import CheckpointError, UnknownModelFamilyError
from quantmint.extension import registry
from quantmint.formats.checkpoint_format import QuantizationConfigBlock

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quantmint-opt"


@pytest.fixture(autouse=True)
def _forget_recorded_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    """What parsed blocks recorded stays in this test (it only shapes the missing-family message)."""
    monkeypatch.setattr(registry, "_recorded_providers", {})


def _block(family: str, provider: object = None) -> dict:
    block = {
        "quant_method": "quantmint",
        "format_version": 1,
        "scheme": "w8a16",
        "family": family,
        "config": {"mode": "deploy", "weight_dtype": "int8"},
        "modules": {},
    }
    if provider is not None:
        block["family_provider"] = provider
    return block


def _saved_block(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


# --- what is recorded -----------------------------------------------------------------------------------
def test_builtin_family_records_the_quantmint_distribution(tmp_path: Path) -> None:
    assert registry.family_distribution("llama") == ("quantmint", version("quantmint"))
    model = quantmint.quantize(build_tiny("llama"), "w8a16")
    quantmint.save_quantized(model, tmp_path / "ckpt")
    block = _saved_block(tmp_path / "ckpt")
    assert block["family_provider"] == {"distribution": "quantmint", "version": version("quantmint")}
    parsed = QuantizationConfigBlock.from_config_json(tmp_path / "ckpt")
    assert parsed.family_provider is not None and parsed.family_provider.distribution == "quantmint"
    quantmint.load_quantized(tmp_path / "ckpt")


def test_family_registered_in_process_records_nothing(tmp_path: Path, temporary_plugin) -> None:
    llama = registry.family_named("llama")
    family = dataclasses.replace(llama, name="inproc", architectures=("InprocForCausalLM",))

    class Plugin:
        @hookimpl
        def register_model_families(self, register):
            register(family)

    temporary_plugin(Plugin(), "inproc-plugin")
    assert registry.family_distribution("inproc") is None
    assert registry.family_distribution("no-such-family") is None
    model = quantmint.quantize(build_tiny("llama"), "w8a16", family="inproc")
    quantmint.save_quantized(model, tmp_path / "ckpt")
    block = _saved_block(tmp_path / "ckpt")
    assert block["family"] == "inproc" and "family_provider" not in block
    quantmint.load_quantized(tmp_path / "ckpt")


def test_a_block_without_provenance_still_parses_and_writes_none() -> None:
    parsed = QuantizationConfigBlock.from_block(_block("llama"), "old")
    assert parsed.family_provider is None and "family_provider" not in parsed.to_json_dict()
    assert (
        QuantizationConfigBlock.from_block({**_block("llama"), "family_provider": None}, "x").family_provider
        is None
    )


@pytest.mark.parametrize(
    "provider",
    [
        "quantmint-opt",
        {"distribution": "quantmint-opt"},
        {"distribution": "quantmint-opt; rm -rf", "version": "0.1.0"},
        {"distribution": "quantmint-opt", "version": "0.1.0 && curl x"},
        {"distribution": "quantmint-opt", "version": "0.1.0", "url": "x"},
        {"distribution": "quantmint-opt", "version": 1},
    ],
)
def test_a_malformed_provider_is_refused_in_one_line(provider: object) -> None:
    with pytest.raises(CheckpointError, match="family_provider") as info:
        QuantizationConfigBlock.from_block(_block("opt", provider), "ckpt")
    assert "\n" not in str(info.value)


# --- what a missing family says ------------------------------------------------------------------------
def test_missing_family_names_the_recorded_package() -> None:
    provider = {"distribution": "quantmint-nosuch", "version": "0.3.1"}
    QuantizationConfigBlock.from_block(_block("nosuch", provider), "ckpt")
    with pytest.raises(UnknownModelFamilyError) as info:
        registry.family_named("nosuch")
    assert str(info.value).startswith(
        "unknown model family 'nosuch': this checkpoint was made with the family from quantmint-nosuch "
        "0.3.1; pip install quantmint-nosuch"
    )


def test_missing_family_without_provenance_says_what_it_said_before() -> None:
    QuantizationConfigBlock.from_block(_block("nosuch"), "ckpt")
    with pytest.raises(UnknownModelFamilyError) as info:
        registry.family_named("nosuch")
    assert str(info.value) == (
        "unknown model family 'nosuch': it is not registered (registered: bert, gpt2, llama); install the "
        "plugin that declares it, or check QUANTMINT_PLUGINS"
    )


def test_vllm_config_names_the_package_to_install() -> None:
    pytest.importorskip("vllm")
    from quantmint.backends.vllm.config import QuantmintConfig

    provider = {"distribution": "quantmint-nosuch", "version": "0.3.1"}
    with pytest.raises(ValueError, match="pip install quantmint-nosuch") as info:
        QuantmintConfig.from_config(_block("nosuch", provider))
    assert "\n" not in str(info.value)


# --- an outside plugin, installed as its own package (examples/quantmint-opt) -------------------------
MAKE_OPT_CHECKPOINT = """
import sys, torch, transformers, quantmint
torch.manual_seed(0)
cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=256, max_position_embeddings=64, word_embed_proj_dim=64)
model = quantmint.quantize(transformers.OPTForCausalLM(cfg).eval(), "w8a16")
quantmint.save_quantized(model, sys.argv[1])
"""

PIP_INSTALL = (sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation")
LOAD = "import sys, quantmint; quantmint.load_quantized(sys.argv[1]); print('loaded')"


def _env(site: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTMINT_PLUGINS", "PYTHONPATH")}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return {**env, **extra}


def _python(code: str, *args: str, site: Path | None, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=_env(site, **extra), capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def opt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """examples/quantmint-opt installed into a directory of its own, and a checkpoint made with it."""
    root = tmp_path_factory.mktemp("provenance")
    site = root / "site"
    subprocess.run(
        [*PIP_INSTALL, "--target", str(site), str(EXAMPLE)],
        check=True,
        capture_output=True,
    )
    ckpt = root / "opt-w8a16"
    made = _python(MAKE_OPT_CHECKPOINT, str(ckpt), site=site)
    assert made.returncode == 0, made.stderr
    return {"site": site, "ckpt": ckpt, "root": root}


def test_outside_plugin_records_its_distribution(opt: dict[str, Path]) -> None:
    block = _saved_block(opt["ckpt"])
    assert block["family"] == "opt"
    assert block["family_provider"] == {"distribution": "quantmint-opt", "version": "0.1.0"}
    loaded = _python(LOAD, str(opt["ckpt"]), site=opt["site"])
    assert loaded.returncode == 0 and loaded.stdout == "loaded\n", loaded.stderr


def test_cli_without_the_package_says_which_to_install(opt: dict[str, Path]) -> None:
    text = opt["root"] / "text.txt"
    text.write_text("hello world\n" * 20)
    result = subprocess.run(
        [sys.executable, "-m", "quantmint.tools.cli", "eval", str(opt["ckpt"]), "--text", str(text)],
        env=_env(None),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert (
        "unknown model family 'opt': this checkpoint was made with the family from quantmint-opt 0.1.0; "
        "pip install quantmint-opt" in result.stderr
    ), result.stderr


def test_installed_but_excluded_says_so(opt: dict[str, Path]) -> None:
    result = _python(LOAD, str(opt["ckpt"]), site=opt["site"], QUANTMINT_PLUGINS="llama,torch_runtime")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "quantmint-opt 0.1.0 is installed but registers no family 'opt'" in last, last
    assert last.endswith("check QUANTMINT_PLUGINS"), last  # the installed version is the recorded one


def test_another_installed_version_loads_silently(opt: dict[str, Path]) -> None:
    site = opt["root"] / "site-0.2.0"
    shutil.copytree(opt["site"], site)
    (info,) = site.glob("quantmint_opt-*.dist-info")
    metadata = info / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 0.1.0", "Version: 0.2.0"))
    check = _python("from importlib.metadata import version; print(version('quantmint-opt'))", site=site)
    assert check.stdout == "0.2.0\n", check.stderr
    result = _python(
        "import sys, warnings; warnings.simplefilter('error', UserWarning)\n" + LOAD,
        str(opt["ckpt"]),
        site=site,
    )
    assert result.returncode == 0 and result.stdout == "loaded\n", result.stderr
    excluded = _python(LOAD, str(opt["ckpt"]), site=site, QUANTMINT_PLUGINS="llama,torch_runtime")
    last = excluded.stderr.strip().splitlines()[-1]
    assert "quantmint-opt 0.2.0 is installed but registers no family 'opt'" in last, last
    assert last.endswith("check QUANTMINT_PLUGINS, or pip install 'quantmint-opt==0.1.0'"), last


def test_a_release_that_selects_other_modules_is_named(opt: dict[str, Path]) -> None:
    """quantmint-opt 0.2.0 that no longer quantizes fc2: the checkpoint made with 0.1.0 is refused in one
    line naming both versions and the one to install, not called corrupt."""
    site = opt["root"] / "site-0.2.0-nofc2"
    shutil.copytree(opt["site"], site)
    (info,) = site.glob("quantmint_opt-*.dist-info")
    metadata = info / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 0.1.0", "Version: 0.2.0"))
    module = site / "quantmint_opt.py"
    source = module.read_text()
    edited = source.replace('"self_attn.out_proj", "fc1", "fc2")', '"self_attn.out_proj", "fc1")')
    edited = edited.replace('hadamard_linears=("fc2",),', "")
    assert edited.count("fc2") == 0, edited
    module.write_text(edited)
    result = _python(LOAD, str(opt["ckpt"]), site=site)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "the quantized modules listed in config.json do not match" in last, last
    assert (
        "it was made with the family from quantmint-opt 0.1.0 and family 'opt' now comes from quantmint-opt "
        "0.2.0, whose declaration selects other modules: pip install 'quantmint-opt==0.1.0'" in last
    ), last
