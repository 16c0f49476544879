"""Algorithms are registered extensions: a package outside quantmint adds one (examples/), and
registration and recipe errors are one line."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
import torch
import yaml
from conftest import VOCAB, build_tiny, model_output

from quantmint.algorithms.base import (
    AlgorithmBase,
    algorithm_for,
    algorithms,
    check_recipe,
    recipe_from_data,
)
from quantmint.algorithms.builtin import RTN
from quantmint.algorithms.ptq import PTQ, quant_state, quantize
from quantmint.config import PRESETS, AlgorithmConfig, get_preset
from quantmint.errors import ConfigError, PluginError
from quantmint.extension.hookspecs import hookimpl
from quantmint.numerics.quant_math import sqnr_db

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quantmint-toy-algorithm"


@pytest.fixture
def toy() -> Iterator[ModuleType]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        import quantmint_toy_algorithm

        yield quantmint_toy_algorithm
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("quantmint_toy_algorithm", None)


def _samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (16,), generator=g) for _ in range(4)]


def test_builtins_are_registered_by_entry_point() -> None:
    assert {"hadamard", "smooth_quant", "rtn", "block_ptq", "kv_cache", "gptq"} <= set(algorithms())
    for name, config in PRESETS.items():
        assert [step for step, _ in check_recipe(config.recipe())] == config.recipe(), name


@pytest.mark.parametrize(
    ("preset", "calibrates"),
    [("w8a16", False), ("w4a16", False), ("w8a8", True), ("c8", True), ("w8a16-ptq", True)],
)
def test_needs_calibration_comes_from_the_recipe(preset: str, calibrates: bool) -> None:
    assert PTQ(preset).needs_calibration is calibrates


def test_toy_algorithm_from_outside_runs_end_to_end(
    toy: ModuleType, temporary_plugin: Callable[[object, str], None]
) -> None:
    temporary_plugin(toy, "percentile_clip")
    config = get_preset("w8a16")
    recipe = [toy.PercentileClipConfig(percentile=95.0), *config.recipe()]
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = model_output(build_tiny("llama"), ids)

    plain = quantize(build_tiny("llama"), config)
    clipped = quantize(build_tiny("llama"), config, calibration=_samples(), recipe=recipe)

    report = quant_state(clipped).calibration
    # the config kept with the model (and written into its checkpoint) records every step
    assert [step.name for step in quant_state(clipped).config.recipe()] == ["percentile_clip", "rtn"]
    assert [r["block"] for r in report["percentile_clip"]] == ["model.layers.0", "model.layers.1"]
    assert all(r["clipped"] > 0 for r in report["percentile_clip"])
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(plain.get_submodule(name).weight_scale, clipped.get_submodule(name).weight_scale)
    assert sqnr_db(reference, model_output(clipped, ids)) > 15.0  # clipped, yet still the same model


def test_toy_algorithm_validates_against_the_recipe(
    toy: ModuleType, temporary_plugin: Callable[[object, str], None]
) -> None:
    temporary_plugin(toy, "percentile_clip")
    with pytest.raises(ConfigError, match="percentile_clip clips weights before they are rounded"):
        PTQ("c8", recipe=[toy.PercentileClipConfig(), *get_preset("c8").recipe()]).algorithms  # noqa: B018


def test_unknown_algorithm_is_one_config_error(toy: ModuleType) -> None:
    with pytest.raises(ConfigError, match="unknown algorithm 'awq'; registered algorithms: ") as exc:
        algorithm_for("awq")
    assert "\n" not in str(exc.value)
    # a step whose plugin is not registered (the toy module is imported, not registered)
    with pytest.raises(ConfigError, match="unknown algorithm 'percentile_clip'"):
        recipe = [toy.PercentileClipConfig(), *get_preset("w8a16").recipe()]
        PTQ("w8a16", recipe=recipe).algorithms  # noqa: B018


def test_recipe_from_yaml_data(toy: ModuleType, temporary_plugin: Callable[[object, str], None]) -> None:
    temporary_plugin(toy, "percentile_clip")
    data = yaml.safe_load(
        "- {name: percentile_clip, percentile: 97.5}\n- {name: rtn, weights: {strategy: channel}}\n"
    )
    recipe = recipe_from_data(data)
    assert recipe == [toy.PercentileClipConfig(percentile=97.5), *get_preset("w8a16").recipe()]
    with pytest.raises(ConfigError, match="unknown algorithm 'awq'"):
        recipe_from_data([{"name": "awq"}])
    with pytest.raises(ConfigError, match="unknown key 'percentil'"):
        recipe_from_data([{"name": "percentile_clip", "percentil": 97.5}])
    with pytest.raises(ConfigError, match="percentile_clip clips weights before they are rounded"):
        recipe_from_data([{"name": "percentile_clip"}])


def test_duplicate_algorithm_is_one_plugin_error(temporary_plugin: Callable[[object, str], None]) -> None:
    class Again:
        @staticmethod
        @hookimpl
        def register_algorithms(register: Callable[[object], None]) -> None:
            register(RTN())

    temporary_plugin(Again, "rtn_again")
    twice = "'rtn' is registered twice, by plugin 'builtin_algorithms' and by plugin 'rtn_again'"
    with pytest.raises(PluginError, match=twice) as exc:
        algorithms()
    assert "\n" not in str(exc.value)


def test_non_algorithm_is_refused(temporary_plugin: Callable[[object, str], None]) -> None:
    class Nameless(AlgorithmBase):
        pass

    class Bad:
        @staticmethod
        @hookimpl
        def register_algorithms(register: Callable[[object], None]) -> None:
            register(Nameless())

    temporary_plugin(Bad, "bad")
    with pytest.raises(PluginError, match="plugin 'bad': AlgorithmConfig has no `name`"):
        algorithms()


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


def test_toy_algorithm_is_found_by_its_entry_point(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE / "quantmint_toy_algorithm.py", tmp_path / "src.py")
    _fake_dist(tmp_path, "quantmint_toy_algorithm", (tmp_path / "src.py").read_text())
    result = _run(tmp_path, "from quantmint.algorithms.base import algorithms; print(sorted(algorithms()))")
    assert result.returncode == 0, result.stderr
    assert "'percentile_clip'" in result.stdout


def test_misspelt_hook_is_one_plugin_error(tmp_path: Path) -> None:
    source = (
        "from quantmint.extension.hookspecs import hookimpl\n"
        "@hookimpl\ndef register_algoritms(register):\n    pass\n"
    )
    _fake_dist(tmp_path, "misspelt_plugin", source)
    code = (
        "from quantmint import registry\n"
        "from quantmint.errors import PluginError\n"
        "try:\n    registry.get_plugin_manager()\n"
        "except PluginError as exc:\n    print('PluginError:', exc)\n"
    )
    result = _run(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PluginError:") and "register_algoritms" in result.stdout
    assert result.stdout.count("\n") == 1


def test_toy_algorithm_runs_from_a_yaml_recipe_through_the_cli(
    toy: ModuleType,
    temporary_plugin: Callable[[object, str], None],
    tiny_model_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from quantmint.config import PTQConfig
    from quantmint.formats.checkpoint import load_quantized
    from quantmint.tools.cli import main

    temporary_plugin(toy, "percentile_clip")
    recipe = tmp_path / "clip.yaml"
    recipe.write_text(
        "recipe:\n"
        "  - {name: percentile_clip, percentile: 95.0}\n"
        "  - {name: rtn, weights: {strategy: channel}}\n"
    )
    config = PTQConfig.load(recipe)
    assert config.scheme_name == "w8a16" and config.weight_dtype == "int8"
    assert [step.name for step in config.recipe()] == ["percentile_clip", "rtn"]
    assert PTQConfig.from_yaml(config.to_yaml()) == config  # round-trips through YAML

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 200)
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--config", str(recipe)]
    code = main([*argv, "--calib", str(text), "--calib-samples", "4", "--calib-seq-len", "32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    calibration = yaml.safe_load((out / "quantmint_calibration.json").read_text())
    assert [r["block"] for r in calibration["percentile_clip"]] == ["model.layers.0", "model.layers.1"]
    assert all(r["clipped"] > 0 for r in calibration["percentile_clip"])
    loaded = load_quantized(out)  # the checkpoint names its recipe; the plugin reads it back
    assert [step.name for step in quant_state(loaded).config.recipe()] == ["percentile_clip", "rtn"]


def test_toy_algorithm_adds_its_own_cli_option(
    toy: ModuleType,
    temporary_plugin: Callable[[object, str], None],
    tiny_model_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An algorithm's options join `quantmint quantize` (the CLI names no algorithm itself)."""
    from quantmint.tools.cli import build_parser, main

    assert "--clip-percentile" not in build_parser().format_help() + _quantize_help()
    temporary_plugin(toy, "percentile_clip")
    assert "--clip-percentile" in _quantize_help()
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 200)
    argv = ["quantize", str(tiny_model_dir("llama")), "--preset", "w8a16", "--calib", str(text)]
    argv += ["--calib-samples", "4", "--calib-seq-len", "32"]
    code = main([*argv, "-o", str(tmp_path / "q"), "--clip-percentile", "95"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    calibration = yaml.safe_load((tmp_path / "q" / "quantmint_calibration.json").read_text())
    assert [r["block"] for r in calibration["percentile_clip"]] == ["model.layers.0", "model.layers.1"]

    with pytest.raises(SystemExit) as exc:  # a bad value: one line naming the option, exit 2
        main([*argv, "-o", str(tmp_path / "bad"), "--clip-percentile", "20"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--clip-percentile" in err
    assert not (tmp_path / "bad").exists()


def _quantize_help() -> str:
    from quantmint.tools.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["quantize"].format_help()


def test_yaml_recipe_errors_are_one_config_error(
    toy: ModuleType, temporary_plugin: Callable[[object, str], None]
) -> None:
    from quantmint.config import PTQConfig

    temporary_plugin(toy, "percentile_clip")
    cases = {
        "recipe: [{name: awq}]": "recipe: unknown algorithm 'awq'; registered algorithms: ",
        "recipe: [{name: percentile_clip, percentil: 90}, {name: rtn, weights: {}}]": (
            r"recipe: step 0 \(percentile_clip\): PercentileClipConfig: unknown key 'percentil'"
        ),
        "recipe: [{name: percentile_clip}]": "percentile_clip clips weights before they are rounded",
        "weight_dtype: int8\nrecipe: [{name: rtn, weights: {}}]": (
            "weight_dtype cannot stand beside 'recipe', whose steps set them: drop them"
        ),
        "recipe: {name: rtn}": "a recipe is a list of steps, got dict",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message) as exc:
            PTQConfig.from_yaml(text)
        assert "\n" not in str(exc.value), text
    config = PTQConfig.from_yaml("recipe: [{name: percentile_clip}, {name: rtn, weights: {}}]")
    with pytest.raises(ConfigError, match="cannot name the recipe's step"):
        config.to_mindformers()


class _DataFreeStepConfig(AlgorithmConfig):
    name: ClassVar[str] = "data_free_step"


class _DataFreeStep(AlgorithmBase):
    """Runs per block without calibration data (halves every weight before rounding)."""

    config_type: ClassVar[type[AlgorithmConfig]] = _DataFreeStepConfig

    def before_round(self, config: AlgorithmConfig, ctx: Any) -> None:
        for module in ctx.block.linears.values():
            ctx.steps.family.adapter.weight(module).data.mul_(0.5)


class _DataFreePlugin:
    @hookimpl
    def register_algorithms(self, register: Any) -> None:
        register(_DataFreeStep())


def test_streamed_rtn_refuses_a_per_block_step_it_would_skip(
    temporary_plugin: Callable[[object, str], None], tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from quantmint.algorithms.streaming import quantize_checkpoint
    from quantmint.config import PTQConfig
    from quantmint.errors import NotSupportedError

    temporary_plugin(_DataFreePlugin(), "data_free_step")
    config = PTQConfig.from_dict({"recipe": [{"name": "data_free_step"}, {"name": "rtn", "weights": {}}]})
    with pytest.raises(NotSupportedError, match="data_free_step .*without --stream"):
        quantize_checkpoint(tiny_model_dir("llama"), tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    model = build_tiny("llama")  # in memory, the step runs on every block
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    quantize(model, config)
    state = quant_state(model)
    assert state is not None
    halved = model.model.layers[0].mlp.down_proj.dequantized_weight().float()
    assert torch.allclose(halved, 0.5 * before, atol=before.abs().max().item() / 100)
