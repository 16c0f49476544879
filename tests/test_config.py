from __future__ import annotations

import pytest
import yaml

from quantmint import PRESETS, ConfigError, PTQConfig, QuantArgs, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_yaml(name: str) -> None:
    config = get_preset(name)
    again = PTQConfig.from_yaml(config.to_yaml())
    assert again == config
    assert again.scheme_name == name


def test_yaml_round_trip_of_a_custom_config() -> None:
    config = PTQConfig(
        weights={"strategy": "tensor"},
        ignore=["lm_head", "re:.*layers\\.0\\..*", "down_proj"],
        algorithm_args={"smooth_alpha": 0.8},
    )
    text = config.to_yaml()
    assert "re:.*layers" in text
    assert PTQConfig.from_yaml(text) == config


def test_preset_combinations_follow_the_seeds() -> None:
    assert PRESETS["w8a16"].activation_dtype is None and PRESETS["w8a16"].kvcache_dtype is None
    assert PRESETS["w8a8"].outliers_suppression == "smooth" and PRESETS["w8a8"].activation_dtype == "int8"
    assert PRESETS["c8"].weight_dtype is None and PRESETS["c8"].kvcache_dtype == "int8"
    assert PRESETS["w8a8-c8"].kvcache_dtype == "int8" and PRESETS["w8a8-c8"].outliers_suppression == "smooth"
    assert all(p.ignore == ["lm_head"] for p in PRESETS.values())


def test_unknown_key_names_the_key_and_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as err:
        PTQConfig.from_yaml("weigth_dtype: int8\n")
    msg = str(err.value)
    assert "'weigth_dtype'" in msg and "weight_dtype" in msg and "kvcache_dtype" in msg


def test_unknown_nested_key_lists_nested_fields() -> None:
    with pytest.raises(ConfigError) as err:
        PTQConfig(weights={"bitz": 8})
    msg = str(err.value)
    assert "weights" in msg and "'bitz'" in msg and "num_bits" in msg


def test_bad_value_names_value_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        PTQConfig.from_yaml("weight_dtype: int2\n")
    msg = str(err.value)
    assert "'int2'" in msg and "weight_dtype" in msg and "'int8'" in msg and "'int4'" in msg


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"weight_dtype": None}, "nothing to quantize"),
        ({"weight_dtype": None, "activation_dtype": "int8"}, "need int8 weights"),
        ({"outliers_suppression": "smooth"}, "activation_dtype: int8"),
        ({"weights": {"strategy": "token", "dynamic": True}}, "per 'channel', 'group' or 'tensor'"),
        ({"weights": {"symmetric": False}}, "symmetric"),
        ({"activations": {"strategy": "token", "dynamic": False}}, "dynamic: true"),
        ({"ignore": ["re:("]}, "not a valid regex"),
        ({"algorithm_args": {"smooth_alpha": 1.5}}, "smooth_alpha"),
        ({"mode": "train"}, "'quantize'"),
    ],
)
def test_invalid_combinations_are_explained(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        PTQConfig.from_dict(data)
    assert fragment in str(err.value)


def test_unknown_preset_lists_known_presets() -> None:
    with pytest.raises(ConfigError, match="w8a8-c8"):
        get_preset("w2a16")


def test_quant_args_defaults() -> None:
    args = QuantArgs()
    assert (args.num_bits, args.symmetric, args.strategy, args.dynamic) == (8, True, "channel", False)


MINDFORMERS_RTN = """
quantization_config:
  quant_method: 'rtn'
  weight_dtype: 'int8'
  activation_dtype: None
  kvcache_dtype: None
  outliers_suppression: None
  modules_to_not_convert: ['lm_head']
  algorithm_args: {}
"""


def test_mindformers_rtn_block_is_accepted_as_is() -> None:
    config = PTQConfig.from_yaml(MINDFORMERS_RTN)
    assert config == PRESETS["w8a16"]


def test_mindformers_smooth_quant_maps_alpha_and_blacklist() -> None:
    block = {
        "quant_method": "smooth_quant",
        "weight_dtype": "int8",
        "activation_dtype": "int8",
        "kvcache_dtype": "int8",
        "outliers_suppression": "smooth",
        "modules_to_not_convert": ["lm_head", "w2"],
        "algorithm_args": {"alpha": 0.8},
    }
    config = PTQConfig.from_mindformers(block)
    assert config.scheme_name == "w8a8-c8"
    assert config.algorithm_args.smooth_alpha == 0.8
    assert config.ignore == ["lm_head", "w2"]
    assert PTQConfig.from_mindformers(config.to_mindformers()) == config


# MindFormers' quant_method (rtn / smooth_quant / ptq) has no GPTQ: those presets are refused (test_gptq.py),
# nor a Hadamard rotation (w8a8-ptq's hadamard: auto): refused below.
@pytest.mark.parametrize(
    "preset",
    [name for name in PRESETS if PRESETS[name].gptq is None and not PRESETS[name].algorithm_args.hadamard],
)
def test_mindformers_round_trip_of_presets(preset: str) -> None:
    config = get_preset(preset)
    block = config.to_mindformers()
    assert PTQConfig.from_yaml(yaml.safe_dump({"quantization_config": block})) == config


def test_mindformers_refuses_a_rotating_preset_and_takes_it_without() -> None:
    config = get_preset("w8a8-ptq")
    with pytest.raises(ConfigError, match="cannot name the recipe's step.s. hadamard"):
        config.to_mindformers()
    plain = config.with_updates(algorithm_args={**config.algorithm_args.model_dump(), "hadamard": False})
    assert PTQConfig.from_yaml(yaml.safe_dump({"quantization_config": plain.to_mindformers()})) == plain


def test_mindformers_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="quant_method"):
        PTQConfig.from_mindformers({"quant_method": "gptq"})
    with pytest.raises(ConfigError, match="unknown key"):
        PTQConfig.from_mindformers({"quant_method": "rtn", "weight_dtpye": "int8"})
    with pytest.raises(ConfigError, match="rounds weights"):
        PTQConfig.from_mindformers({"quant_method": "rtn", "activation_dtype": "int8"})
    with pytest.raises(ConfigError, match="algorithm_args"):
        PTQConfig.from_mindformers({"quant_method": "smooth_quant", "algorithm_args": {"beta": 1}})


def test_load_reports_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: deploy\nfoo: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*'foo'"):
        PTQConfig.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        PTQConfig.load(tmp_path / "missing.yaml")


def test_a_recipe_list_stands_for_the_keys_of_its_steps() -> None:
    preset = get_preset("w8a8-c8")
    steps = [{"name": step.name, **step.model_dump(mode="json")} for step in preset.recipe()]
    config = PTQConfig.from_dict({"recipe": steps})
    assert config.recipe() == preset.recipe()
    assert config.scheme_name == preset.scheme_name == "w8a8-c8"
    keys = ("weight_dtype", "activation_dtype", "kvcache_dtype", "outliers_suppression", "algorithm_args")
    for key in keys:
        assert getattr(config, key) == getattr(preset, key), key
    assert set(config.to_dict()) == {"mode", "ignore", "recipe"}
    again = PTQConfig.from_yaml(config.to_yaml())
    assert again == config and again.recipe() == preset.recipe()
    assert config.with_updates(mode="deploy").recipe() == preset.recipe()
    assert "recipe" not in preset.to_dict()  # a config of keys is written as before
    assert config.to_mindformers() == preset.to_mindformers()


def test_mindformers_cannot_name_the_hadamard_step() -> None:
    config = get_preset("w8a8").with_updates(algorithm_args={"hadamard": True})
    with pytest.raises(ConfigError, match="cannot name the recipe's step\\(s\\) hadamard"):
        config.to_mindformers()
