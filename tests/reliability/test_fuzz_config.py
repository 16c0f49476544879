"""Hypothesis fuzzing of config input: YAML text, dicts and MindFormers `quantization_config` blocks.

Property, for every generated input: loading it either gives a valid `PTQConfig` that round-trips
through YAML (`from_yaml(to_yaml())` has the same fields), or raises `ConfigError` whose message is one
line of at most 1,000 characters. Any other exception is a crash, and a failure.

Inputs are both random structure (random YAML text, random nested data) and mutations of valid configs
(every preset in our schema and in MindFormers form): a valid key given a value of the wrong type or out
of range, an unknown key, nested junk, big integers, inf/nan, unicode, YAML anchors, tags, duplicate keys.
Runs are derandomized, so CI sees the same cases every time. `test_fuzz_counts` prints the totals
(run with `-s`) and asserts that nothing crashed.
"""

from __future__ import annotations

import collections
import contextlib
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantmint.config import PRESETS, PTQConfig
from quantmint.errors import ConfigError

MAX_MESSAGE = 1000
COUNTS: collections.Counter[str] = collections.Counter()
CRASHES: list[str] = []
FUZZ_TESTS = {"yaml_text", "structured_yaml", "mutated_dicts", "mutated_mindformers", "random_data"}
FINISHED: set[str] = set()


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _check(load: Any, what: str) -> None:
    """Run one case: a valid config that round-trips, or a one-line ConfigError; count which."""
    COUNTS["tried"] += 1
    try:
        config = load()
    except ConfigError as exc:
        message = str(exc)
        if "\n" in message or len(message) > MAX_MESSAGE or len(message.splitlines()) != 1:
            COUNTS["crashes"] += 1
            CRASHES.append(f"{what}: ConfigError message not one short line: {message[:300]!r}")
            raise AssertionError(CRASHES[-1]) from None
        COUNTS["refused"] += 1
        return
    except Exception as exc:  # anything but ConfigError is a crash
        COUNTS["crashes"] += 1
        CRASHES.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        raise
    if not isinstance(config, PTQConfig):
        COUNTS["crashes"] += 1
        raise AssertionError(f"{what}: loading returned {type(config).__name__}")
    again = PTQConfig.from_yaml(config.to_yaml())
    if again.to_dict() != config.to_dict():
        COUNTS["crashes"] += 1
        CRASHES.append(f"{what}: does not round-trip: {config.to_dict()} -> {again.to_dict()}")
        raise AssertionError(CRASHES[-1])
    COUNTS["accepted"] += 1


# --- strategies ------------------------------------------------------------------------------------------

VALID_DICTS = [p.to_dict() for p in PRESETS.values()]
VALID_MF: list[dict[str, Any]] = []
for _preset in PRESETS.values():
    with contextlib.suppress(ConfigError):  # W8A8 without smoothing has no MindFormers quant_method
        VALID_MF.append(_preset.to_mindformers())
VALID_MF.append({"quant_method": "rtn", "weight_dtype": "int4", "algorithm_args": {"group_size": 64}})
VALID_MF.append({"quant_method": "smooth_quant", "algorithm_args": {"alpha": 0.7}, "kvcache_dtype": "int8"})

KEYS = sorted(
    {
        *PTQConfig.model_fields,
        *PRESETS["w8a16"].weights.model_dump(),
        *PRESETS["w8a16"].algorithm_args.model_dump(),
        *PRESETS["w8a16-ptq"].block_ptq.model_dump(),  # type: ignore[union-attr]
        *PTQConfig._MF_KEYS,
        "alpha",
        "quantization_config",
    }
)

big_ints = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    # (sign, base, exponent): built lazily, as a 4,300-digit int cannot even be repr()-ed
    st.sampled_from([(1, 2, 31), (1, 2, 63), (1, 2, 64), (-1, 2, 63), (1, 10, 4300), (-1, 10, 5000)]).map(
        lambda t: t[0] * t[1] ** t[2]
    ),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e12, 1e308, -0.0, 5e-324, 0.5, 1.5]),
)
texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["int8", "int4", "None", "none", "null", "", "smooth", "group", "channel", "token",
                     "tensor", "head", "re:(", "re:.*", "re:" + "(" * 300, "lm_head", "ptq", "rtn",
                     "smooth_quant", "WA", "quantized", "disk", "\u2028", "é", "\x00", "a\nb"]),
)  # fmt: skip
scalars = st.one_of(st.none(), st.booleans(), big_ints, floats, texts)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)
# Values a field might plausibly be given: of its type, of another, in range or not.
plausible = st.one_of(
    st.integers(0, 1024),
    st.floats(0, 1),
    st.floats(1, 1000),
    st.booleans(),
    st.sampled_from(["int8", "int4", "channel", "tensor", "head", "group", "minmax", "percentile", "float"]),
    st.lists(st.sampled_from(["lm_head", "down_proj", "re:.*\\.0\\..*", "model.layers.1.mlp"]), max_size=3),
    st.lists(st.floats(0, 1), max_size=4),
)
field_values = st.one_of(
    plausible, plausible, scalars, junk, st.lists(texts, max_size=3), st.lists(floats, max_size=3)
)


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value} if depth % 2 else [value]
    return value


@st.composite
def mutated(draw: st.DrawFn, bases: list[dict[str, Any]]) -> dict[str, Any]:
    """A valid config with 1-3 edits: a value replaced, a key added or removed, at any depth."""
    data = _copy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        # walk to a random mapping inside the config
        target = data
        while True:
            children = [k for k, v in target.items() if isinstance(v, dict)]
            if not children or draw(st.booleans()):
                break
            target = target[draw(st.sampled_from(sorted(children)))]
        action = draw(st.sampled_from(["replace", "replace", "replace", "add", "remove", "deep"]))
        keys = sorted(target)
        if action == "replace" and keys:
            target[draw(st.sampled_from(keys))] = draw(field_values)
        elif action == "remove" and keys:
            del target[draw(st.sampled_from(keys))]
        elif action == "deep":
            target[draw(st.sampled_from(keys or KEYS))] = _deep(draw(st.sampled_from([3, 63, 65, 200, 5000])))
        else:
            target[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)))] = draw(field_values)
    return data


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _label(data: Any) -> str:
    """A short description of a case for failure messages (safe for huge ints and deep nesting)."""
    try:
        return str(data)[:300]
    except (ValueError, RecursionError):
        return f"<a {type(data).__name__} too deep or too large to print>"


def _dump(data: Any) -> str | None:
    """YAML text of `data`, or None where PyYAML cannot write it (deep nesting)."""
    try:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except (RecursionError, yaml.YAMLError, ValueError):
        return None


YAML_SNIPPETS = [
    "&a ", "*a ", "!!python/object:os.system ", "!!binary ", "!!int ", "!!float ", "!!str ", "!!timestamp ",
    "? ", "- ", ": ", "{", "}", "[", "]", ",", "\n", "\t", "'", '"', "#", "|", ">", "<<: ", "%YAML 1.1\n",
    "---\n", "...\n", "\ufeff", "\x85", "\u2028", "\x00", "1e999", ".inf", ".nan", "0x" + "f" * 200,
    "9" * 5000, "~", "yes", "on", "2001-12-14", "2001-13-45", "1:2:3", "0o17", "-.inf", "=",
]  # fmt: skip


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    """YAML text of a valid or mutated config, with YAML syntax spliced in at random places."""
    base = draw(st.one_of(st.sampled_from(VALID_DICTS + VALID_MF), mutated(VALID_DICTS + VALID_MF)))
    text = _dump({"quantization_config": base} if "quant_method" in base and draw(st.booleans()) else base)
    text = text or "weight_dtype: int8\n"
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        piece = draw(st.one_of(st.sampled_from(YAML_SNIPPETS), st.text(max_size=5)))
        text = text[:at] + piece + text[at:]
    if draw(st.booleans()):  # a key written twice
        lines = text.splitlines(keepends=True)
        if lines:
            text += draw(st.sampled_from(lines))
    return text


# --- the fuzz tests --------------------------------------------------------------------------------------


@_settings(400)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_random_yaml_text(text: str) -> None:
    _check(lambda: PTQConfig.from_yaml(text), f"from_yaml({text[:200]!r})")
    FINISHED.add("yaml_text")


@_settings(700)
@given(mutated_text())
def test_structured_and_spliced_yaml(text: str) -> None:
    _check(lambda: PTQConfig.from_yaml(text), f"from_yaml({text[:300]!r})")
    FINISHED.add("structured_yaml")


@_settings(700)
@given(mutated(VALID_DICTS))
def test_mutated_config_dicts(data: dict[str, Any]) -> None:
    _check(lambda: PTQConfig.from_dict(data), f"from_dict({_label(data)})")
    text = _dump(data)
    if text is not None:
        _check(lambda: PTQConfig.from_yaml(text), f"from_yaml(dump of {_label(data)})")
    FINISHED.add("mutated_dicts")


@_settings(500)
@given(mutated(VALID_MF))
def test_mutated_mindformers_blocks(block: dict[str, Any]) -> None:
    _check(lambda: PTQConfig.from_mindformers(block), f"from_mindformers({_label(block)})")
    text = _dump({"quantization_config": block})
    if text is not None:
        _check(lambda: PTQConfig.from_yaml(text), f"from_yaml(MindFormers {_label(block)})")
    FINISHED.add("mutated_mindformers")


@_settings(300)
@given(junk)
def test_random_data(data: Any) -> None:
    _check(lambda: PTQConfig.from_dict(data), f"from_dict({_label(data)})")
    if isinstance(data, dict):
        _check(lambda: PTQConfig.from_mindformers(data), f"from_mindformers({_label(data)})")
    FINISHED.add("random_data")


def test_fuzz_counts() -> None:
    """The totals of this module's fuzz tests (after them: pytest runs a module's tests in order)."""
    print(
        f"\nconfig fuzz: {COUNTS['tried']} cases tried, {COUNTS['accepted']} accepted (round-trip), "
        f"{COUNTS['refused']} refused cleanly (one-line ConfigError), {COUNTS['crashes']} crashes"
    )
    assert COUNTS["crashes"] == 0, CRASHES[:10]
    if FINISHED != FUZZ_TESTS:
        pytest.skip(f"only {sorted(FINISHED)} of the fuzz tests ran; the 1,000-case floor needs all")
    assert COUNTS["tried"] >= 1000 and COUNTS["tried"] == COUNTS["accepted"] + COUNTS["refused"]
    assert COUNTS["accepted"] > 150 and COUNTS["refused"] > 1000  # both outcomes exercised


# --- the command line: exit 2, one stderr line, no traceback ---------------------------------------------

CLI_CASES = {
    "mixed_keys": "weight_dtype: int8\n1: x\n",
    "list_key": "? [a, b]\n: 1\n",
    "non_utf8": b"weight_dtype: int8\nignore: [\xff\xfe]\n",
    "huge_int": "block_ptq: {seed: " + "9" * 4300 + "}\n",
    "deep": "ignore: " + "[" * 5000 + "]" * 5000 + "\n",
    "alias_bomb": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9)
    ),
    "group_size_1e12": "weight_dtype: int4\nweights: {strategy: group, group_size: 1000000000000}\n",
    "lr_inf": "block_ptq: {lr_weight: .inf}\n",
    "alpha_nan": "weight_dtype: int8\nactivation_dtype: int8\noutliers_suppression: smooth\n"
    "algorithm_args: {smooth_alpha: .nan}\n",
    "duplicate_key": "weight_dtype: int8\nweight_dtype: int4\n",
    "top_level_list": "- weight_dtype: int8\n",
    "empty": "",
    "unknown_key": "frobnicate: 1\n",
    "bad_yaml": "weight_dtype: [int8\n",
    "python_tag": "weight_dtype: !!python/object/apply:os.system [echo hi]\n",
    "bad_regex": "ignore: ['re:(']\n",
    "mf_int_modules": "quantization_config:\n  quant_method: rtn\n  modules_to_not_convert: 5\n",
    "mf_unknown_method": "quantization_config:\n  quant_method: gptq\n",
    "mf_bad_args": "quant_method: ptq\nalgorithm_args: {n_outer_loops: -1, lr_weight: 1e999}\n",
    "timestamp": "weight_dtype: 2001-13-45\n",
    "newline_in_value": 'weight_dtype: "int8\\nint4\\n\\u2028"\n',
}


def test_cli_bad_configs_exit_2_with_one_line(tmp_path: Path) -> None:
    """`quantmint quantize --config BAD` for each representative bad file, two processes at a time."""
    files = {}
    for name, content in CLI_CASES.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_bytes(content if isinstance(content, bytes) else content.encode())

    def run(name: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        argv = [
            "quantize",
            str(tmp_path / "no-model"),
            "-o",
            str(tmp_path / "o"),
            "--config",
            str(files[name]),
        ]
        return name, subprocess.run(
            [sys.executable, "-m", "quantmint.tools.cli", *argv], capture_output=True, text=True, timeout=120
        )

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, CLI_CASES))
    bad = []
    for name, done in results:
        lines = done.stderr.strip().splitlines()
        if done.returncode != 2 or len(lines) != 1 or "Traceback" in done.stderr or len(lines[0]) > 1100:
            bad.append(f"{name}: exit {done.returncode}, stderr {done.stderr[-500:]!r}")
        elif not lines[0].startswith("quantmint quantize: error: "):
            bad.append(f"{name}: {lines[0][:200]}")
    assert not bad, bad
    assert not (tmp_path / "o").exists()
