"""Bad input ends in one line and exit status 2, never a traceback, a hang or a huge message.

Each test is named after the input it guards against (issue 16, "Clear errors instead of tracebacks").
Config files are read through `PTQConfig.load` and through `quantmint quantize --config`; command lines
through `quantmint.tools.cli.main` in this process (usage errors raise SystemExit(2), other errors return 2).
"""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest
import torch
import transformers

from quantmint.config import PTQConfig
from quantmint.errors import ConfigError, QuantmintError
from quantmint.tools.cli import main

MAX_MESSAGE = 1000


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit status and stderr of `quantmint ARGV` run in this process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    """The error line of stderr (after argparse's usage or progress bars), checked to be short and alone."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("quantmint ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    assert len(errors[0]) <= MAX_MESSAGE + 100 and "Traceback" not in err, err[-3000:]
    return errors[0]


def _refused(text: str | bytes, tmp_path: Path) -> str:
    """The one-line ConfigError that PTQConfig.load raises for a config file with this content."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        PTQConfig.load(path)
    message = str(info.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message[:2000]
    return message


# --- YAML / config files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["weight_dtype: int8\n1: x\n", "weight_dtype: int8\n? [a, b]\n: 1\n", "true: 1\n", "null: 1\n"],
    ids=["int-key", "list-key", "bool-key", "null-key"],
)
def test_yaml_non_string_and_mixed_type_keys_are_refused(text: str, tmp_path: Path) -> None:
    assert "not a string" in _refused(text, tmp_path)


def test_non_utf8_config_file_is_refused(tmp_path: Path) -> None:
    assert "not UTF-8" in _refused(b"weight_dtype: int8\nignore: [\xff\xfe\xc3]\n", tmp_path)


def test_4300_digit_integer_is_refused(tmp_path: Path) -> None:
    message = _refused(
        "weight_dtype: int4\nweights: {strategy: group, group_size: " + "9" * 4300 + "}\n", tmp_path
    )
    assert "4,300 digits" in message


def test_4300_digit_integer_in_a_dict_gives_a_short_message() -> None:
    with pytest.raises(ConfigError) as info:
        PTQConfig.from_dict({"block_ptq": {"seed": 10**5000}})
    assert len(str(info.value)) <= MAX_MESSAGE and "seed" in str(info.value)


def test_5000_deep_yaml_nesting_is_refused(tmp_path: Path) -> None:
    assert "nested more than 64" in _refused("ignore: " + "[" * 5000 + "]" * 5000 + "\n", tmp_path)


def test_5000_deep_dict_nesting_is_refused_before_pydantic() -> None:
    deep: object = "x"
    for _ in range(5000):
        deep = {"a": deep}
    with pytest.raises(ConfigError, match="nested more than 64"):
        PTQConfig.from_dict({"algorithm_args": deep})


def test_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path: Path) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    start = time.perf_counter()
    message = _refused("\n".join(lines) + "\n", tmp_path)
    assert time.perf_counter() - start < 1.0
    assert "anchor" in message or "alias" in message


def test_yaml_alias_alone_is_refused(tmp_path: Path) -> None:
    assert "alias *nothing" in _refused("ignore: *nothing\n", tmp_path)
    assert "anchor" in _refused("weights: &w {strategy: channel}\nkvcache: *w\n", tmp_path)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("weights:\n  symmetric: !!timestamp true\n", "a date or time (YAML !!timestamp)"),  # PyYAML crashed
        ("ignore: [2001-12-14]\n", "a date or time (YAML !!timestamp)"),
        ("block_ptq: {seed: !!binary aGVsbG8=}\n", "binary data (YAML !!binary)"),
        ("ignore: !!set {lm_head}\n", "a set (YAML !!set)"),
        ("ignore: !!omap [a: 1]\n", "an ordered map (YAML !!omap)"),
        ("ignore: !!pairs [a: 1]\n", "a list of pairs (YAML !!pairs)"),
    ],
)
def test_yaml_types_no_config_has_are_refused_by_line(text: str, kind: str, tmp_path: Path) -> None:
    message = _refused(text, tmp_path)
    assert "line " in message and kind in message and "quote it for a string" in message
    assert PTQConfig.from_yaml('ignore: ["2001-12-14"]\n').ignore == ["2001-12-14"]  # quoted: a name


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("weight_dtype: int4\nweights: {strategy: group, group_size: 1000000000000}\n", "group_size"),
        ("weight_dtype: int4\nweights: {strategy: group, group_size: 1.0e+12}\n", "group_size"),
        ("block_ptq: {n_outer_loops: 1000000000000}\n", "n_outer_loops"),
        ("block_ptq: {n_batches: 99999999999}\n", "n_batches"),
        ("block_ptq: {batch_size: 10000000}\n", "batch_size"),
        ("block_ptq: {seed: -1}\n", "seed"),
        ("block_ptq: {lr_weight: 1.0e30}\n", "lr_weight"),
        ("algorithm_args: {smooth_search_batches: 1000000000000}\n", "smooth_search_batches"),
        ("algorithm_args: {w8a16_outlier_ratio: 1.0e300}\n", "w8a16_outlier_ratio"),
        ("algorithm_args: {smooth_alpha_grid: [" + ", ".join(["0.5"] * 500) + "]}\n", "smooth_alpha_grid"),
        ("ignore: ['" + "x" * 5000 + "']\n", "ignore"),
    ],
)
def test_numeric_fields_out_of_bounds_are_refused(text: str, key: str, tmp_path: Path) -> None:
    assert key in _refused(text, tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "block_ptq: {lr_weight: .inf}\n",
        "block_ptq: {lr_act_clip: .nan}\n",
        "algorithm_args: {smooth_alpha: .nan}\n",
        "algorithm_args: {smooth_alpha_grid: [.nan]}\n",
        "weights: {percentile: .inf}\n",
        "block_ptq: {round_reg: -.inf}\n",
    ],
)
def test_inf_and_nan_are_refused(text: str, tmp_path: Path) -> None:
    assert "finite" in _refused(text, tmp_path)


def test_duplicate_yaml_keys_are_refused_naming_key_and_line(tmp_path: Path) -> None:
    message = _refused("weight_dtype: int8\nweights: {strategy: channel}\nweight_dtype: int4\n", tmp_path)
    assert "duplicate key 'weight_dtype'" in message and "line 3" in message and "line 1" in message


@pytest.mark.parametrize("text", ["- weight_dtype: int8\n", "int8\n", "42\n"], ids=["list", "str", "int"])
def test_top_level_that_is_not_a_mapping_is_refused(text: str, tmp_path: Path) -> None:
    assert "mapping of keys to values at the top level" in _refused(text, tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"])
def test_empty_config_file_is_refused(text: str, tmp_path: Path) -> None:
    assert "config is empty" in _refused(text, tmp_path)


@pytest.mark.parametrize(
    "block",
    [
        {"quant_method": "rtn", "modules_to_not_convert": 5},
        {"quant_method": "rtn", "weight_dtype": "int4", "algorithm_args": {"group_size": 10**12}},
        {"quant_method": "ptq", "algorithm_args": {"lr_weight": float("inf")}},
        {"quant_method": ["rtn"] * 1000},
    ],
    ids=["int-modules", "huge-group", "inf-lr", "list-method"],
)
def test_mindformers_block_errors_are_one_line(block: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        PTQConfig.from_mindformers(block)
    assert "\n" not in str(info.value) and len(str(info.value)) <= MAX_MESSAGE


def test_bad_config_file_exits_2_with_one_line(tmp_path: Path, tiny_model_dir, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight_dtype: int8\nweight_dtype: int4\n")
    code, err = _cli(capsys, "quantize", tiny_model_dir("llama"), "-o", tmp_path / "o", "--config", bad)
    assert code == 2 and "duplicate key" in _one_line(err)
    assert not (tmp_path / "o").exists()


# --- JSON that parses badly: nested too deep, integers of thousands of digits -----------------------------

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000


@pytest.mark.parametrize("value", [DEEP, HUGE], ids=["deep", "huge-int"])
def test_json_data_files_nested_too_deep_or_with_huge_integers_are_one_line(
    value: str, tmp_path: Path, tiny_model_dir, capsys
) -> None:
    """Calibration and evaluation files (SQuAD JSON, JSON Lines documents, BoolQ): exit 2, one line naming
    the file (and the line), no traceback, nothing written."""
    squad = tmp_path / "dev.json"
    squad.write_text('{"data": ' + value + "}")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a b c"}\n{"text": "d", "n": ' + value + "}\n")
    boolq = tmp_path / "val.jsonl"
    boolq.write_text('{"question": "q", "passage": "p", "answer": ' + value + "}\n")
    model = tiny_model_dir("llama")
    for data, where in ((squad, "dev.json"), (docs, "docs.jsonl, line 2"), (boolq, "val.jsonl, line 1")):
        argv = ["quantize", model, "--preset", "w8a8", "-o", tmp_path / "o", "--calib", data]
        code, err = _cli(capsys, *argv)
        assert code == 2 and where in _one_line(err) and "Traceback" not in err
        assert not (tmp_path / "o").exists()
        code, err = _cli(capsys, "eval", model, "--text", data)
        assert code == 2 and data.name in _one_line(err) and "Traceback" not in err


@pytest.mark.parametrize("value", [DEEP, HUGE], ids=["deep", "huge-int"])
def test_model_json_nested_too_deep_or_with_huge_integers_is_one_line(
    value: str, tmp_path: Path, tiny_model_dir, capsys
) -> None:
    """A model directory's config.json, a safetensors index and a safetensors header."""
    import shutil

    from quantmint.formats.safetensors_io import SafetensorsFile

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "config.json").write_text('{"architectures": ' + value + "}")
    code, err = _cli(capsys, "quantize", model, "-o", tmp_path / "o")
    assert code == 2 and "config.json is not valid JSON" in _one_line(err)
    header = ('{"x": ' + value + "}").encode()
    shard = tmp_path / "bad.safetensors"
    shard.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(QuantmintError, match="cannot be read") as info:
        SafetensorsFile(shard)
    assert "\n" not in str(info.value) and len(str(info.value)) <= MAX_MESSAGE


@pytest.mark.parametrize(
    "content",
    ['{"version": "1.0", "truncation": ', '{"a": 1}', "[" * 100_000 + "]" * 100_000],
    ids=["invalid-json", "not-a-tokenizer", "deep"],
)
def test_a_broken_tokenizer_file_is_one_line(content: str, tmp_path: Path, tiny_model_dir, capsys) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "tokenizer.json").write_text(content)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 200)
    argv = ["quantize", model, "--preset", "w8a8", "-o", tmp_path / "o", "--calib", text]
    code, err = _cli(capsys, *argv, "--calib-samples", "2", "--calib-seq-len", "16")
    assert code == 2 and "no usable tokenizer in" in _one_line(err)
    assert not (tmp_path / "o").exists()


# --- the CLI's error contract ----------------------------------------------------------------------------


def test_quantmint_error_exits_2_not_1(tmp_path: Path, capsys) -> None:
    code, err = _cli(capsys, "inspect", tmp_path / "missing")
    assert code == 2 and _one_line(err).startswith("quantmint inspect: error:")


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_os_error_escaping_a_command_is_one_line_exit_2(
    number: int, words: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    import quantmint.tools.cli as cli

    def fail(args: object) -> None:
        raise OSError(number, words, str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(cli, "cmd_inspect", fail)
    code, err = _cli(capsys, "inspect", tmp_path)
    line = _one_line(err)
    assert code == 2 and line.startswith("quantmint inspect: error: ") and words in line
    assert "model.safetensors" in line


def test_huge_multi_line_error_message_is_capped_to_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    import quantmint.tools.cli as cli

    def fail(args: object) -> None:
        raise QuantmintError("bad\nvalue " * 2_000_000)  # 20 MB over 2 million lines

    monkeypatch.setattr(cli, "cmd_inspect", fail)
    code, err = _cli(capsys, "inspect", tmp_path)
    assert code == 2 and len(_one_line(err)) <= MAX_MESSAGE


# --- data and command-line counts -----------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog; PACK MY BOX WITH FIVE DOZEN JUGS. " * 400)
    return path


def test_calib_seq_len_beyond_model_positions_is_refused_up_front(
    tmp_path: Path, tiny_model_dir, text_file: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import quantmint.io.models

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the sequence length was checked")

    monkeypatch.setattr(quantmint.io.models, "load_float_model", never)
    argv = ["quantize", tiny_model_dir("llama"), "-o", tmp_path / "o", "--preset", "w8a8"]
    code, err = _cli(capsys, *argv, "--calib", text_file, "--calib-seq-len", "4096")
    line = _one_line(err)
    assert code == 2 and "--calib-seq-len 4096" in line and "128 positions" in line
    assert not (tmp_path / "o").exists()


@pytest.fixture
def small_vocab_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama with 64 embeddings, saved with the 256-token byte tokenizer: ids beyond its vocab."""
    from conftest import byte_tokenizer, tiny_config

    config = tiny_config("llama")
    config.vocab_size = 64
    torch.manual_seed(0)
    path = tmp_path / "small-vocab"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_calibration_tokenizer_ids_beyond_model_vocab_are_refused(
    tmp_path: Path, small_vocab_model_dir: Path, text_file: Path, capsys
) -> None:
    argv = ["quantize", small_vocab_model_dir, "-o", tmp_path / "o", "--preset", "w8a8"]
    code, err = _cli(capsys, *argv, "--calib", text_file, "--calib-samples", "2", "--calib-seq-len", "16")
    line = _one_line(err)
    assert code == 2 and "vocabulary has 64 entries" in line and "256 tokens" in line, line
    assert not (tmp_path / "o").exists()


def test_eval_tokenizer_beyond_model_vocab_is_refused(
    small_vocab_model_dir: Path, text_file: Path, capsys
) -> None:
    code, err = _cli(capsys, "eval", small_vocab_model_dir, "--text", text_file, "--max-tokens", "64")
    line = _one_line(err)
    assert code == 2 and "256 tokens" in line and "64 rows" in line, line


def test_calibration_samples_beyond_vocab_are_refused_by_the_library(small_vocab_model_dir: Path) -> None:
    from quantmint.algorithms.ptq import quantize
    from quantmint.config import get_preset
    from quantmint.io.models import load_float_model

    model = load_float_model(small_vocab_model_dir)
    samples = [torch.arange(100, 116), torch.arange(0, 16)]
    with pytest.raises(QuantmintError, match="outside the model's vocabulary of 64"):
        quantize(model, get_preset("w8a8"), calibration=samples)


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "{model}", "-o", "{out}", "--calib-samples", "0"],
        ["quantize", "{model}", "-o", "{out}", "--calib-samples", "-5"],
        ["quantize", "{model}", "-o", "{out}", "--calib-seq-len", "0"],
        ["quantize", "{model}", "-o", "{out}", "--calib-seq-len", "-1"],
        ["quantize", "{model}", "-o", "{out}", "--calib-seed", "-1"],
        ["eval", "{model}", "--text", "{model}/config.json", "--max-tokens", "0"],
        ["eval", "{model}", "--text", "{model}/config.json", "--max-tokens", "-100"],
        ["eval", "{model}", "--text", "{model}/config.json", "--seq-len", "0"],
        ["eval", "{model}", "--text", "{model}/config.json", "--seq-len", "-512"],
        ["eval", "{model}", "--text", "{model}/config.json", "--batch-size", "0"],
        ["eval", "{model}", "--text", "{model}/config.json", "--batch-size", "-4"],
        ["eval", "{model}", "--squad", "x.json", "--squad-n", "0"],
        ["report", "{model}", "{model}", "-o", "{out}", "--max-tokens", "0"],
        ["serve", "--port", "0", "{model}"],  # options first: after MODEL they pass through to vLLM
        ["serve", "--port", "70000", "{model}"],
        ["serve", "--max-model-len", "0", "{model}"],
    ],
)
def test_non_positive_counts_are_refused_by_the_command_line(
    argv: list[str], tmp_path: Path, tiny_model_dir, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    def no_exec(*args: object) -> None:
        raise AssertionError(f"the command line was accepted and would exec {args[0]}")

    monkeypatch.setattr(os, "execve", no_exec)
    values = {"model": str(tiny_model_dir("llama")), "out": str(tmp_path / "o")}
    code, err = _cli(capsys, *[a.format(**values) for a in argv])
    assert code == 2 and "error: argument" in _one_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"caf\xe9 \xff\xfe text\n" * 50, "not UTF-8"), (b"", "empty"), (b"   \n\n  ", "empty")],
    ids=["latin-1", "empty", "whitespace"],
)
def test_calibration_file_not_utf8_or_empty_is_refused(
    content: bytes, words: str, tmp_path: Path, tiny_model_dir, capsys
) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    argv = ["quantize", tiny_model_dir("llama"), "-o", tmp_path / "o", "--preset", "w8a8", "--calib", calib]
    code, err = _cli(capsys, *argv)
    assert code == 2 and words in _one_line(err)


@pytest.mark.parametrize("name", ["pipeline", "AutoModelForCausalLM", "LlamaConfig", "os", "__class__"])
def test_architecture_that_is_not_a_transformers_model_class_is_refused(
    name: str, tmp_path: Path, tiny_model_dir, capsys
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = [name]
    (model / "config.json").write_text(json.dumps(config))
    code, err = _cli(capsys, "quantize", model, "-o", tmp_path / "o")
    assert code == 2 and "architecture" in _one_line(err)
