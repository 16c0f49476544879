from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantmint.config import get_preset
from quantmint.formats import checkpoint
from quantmint.tools.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" = Title = \n the quick brown fox jumps over the lazy dog . \n" * 60)
    return path


def test_quantize_inspect_eval(tmp_path: Path, tiny_model_dir, text_file: Path, capsys) -> None:
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    code, stdout, _ = _run(capsys, "quantize", str(src), "--preset", "w8a16", "-o", str(out))
    assert code == 0
    report = json.loads(stdout)
    assert report["scheme"] == "w8a16" and report["quantized_layers"] == 14
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (out, in) per block
    int8_bytes = 2 * sum(o * i + o * 4 for o, i in shapes)  # int8 weight + float32 scale per row
    assert report["quantized_linear_bytes"] == int8_bytes
    assert report["quantized_linear_bytes_bf16"] == 2 * sum(o * i * 2 for o, i in shapes)
    assert report["peak_rss_mb"] > 0 and report["seconds"]["total"] > 0
    # The tokenizer's files are copied as they are (the CLI does not load a tokenizer to save it).
    copied = [name for name in checkpoint.TOKENIZER_FILES if (src / name).is_file()]
    assert "tokenizer.json" in copied
    assert all((out / name).read_bytes() == (src / name).read_bytes() for name in copied)

    code, stdout, _ = _run(capsys, "inspect", str(out), "--json")
    summary = json.loads(stdout)
    assert {layer["scheme"] for layer in summary["layers"]} == {"w8a16"}
    q_proj = next(
        layer for layer in summary["layers"] if layer["module"] == "model.layers.0.self_attn.q_proj"
    )
    assert q_proj["weight"] == "i8[64, 64]"
    assert q_proj["bytes"] == 64 * 64 + 64 * 4 and q_proj["bytes_bf16"] == 64 * 64 * 2

    code, stdout, _ = _run(capsys, "inspect", str(out))
    assert "model.layers.1.mlp.down_proj" in stdout and "quantized linears: 14 layers" in stdout

    results = {}
    for name, path in (("float", src), ("quant", out)):
        code, stdout, _ = _run(
            capsys, "eval", str(path), "--text", str(text_file), "--max-tokens", "512", "--seq-len", "64"
        )
        assert code == 0
        results[name] = json.loads(stdout)
    assert results["float"]["quantized"] is False and results["quant"]["quantized"] is True
    assert results["quant"]["tokens"] == 512 and results["quant"]["windows"] == 8
    # a random tiny model: perplexity near the vocabulary size, and RTN barely moves it
    assert abs(results["quant"]["ppl"] / results["float"]["ppl"] - 1) < 0.01


def test_eval_squad_and_boolq(tmp_path: Path, tiny_model_dir, capsys) -> None:
    squad = tmp_path / "squad.json"
    squad.write_text(
        json.dumps(
            {
                "version": "1.1",
                "data": [
                    {
                        "title": "t",
                        "paragraphs": [
                            {
                                "context": "The sky is blue.",
                                "qas": [
                                    {
                                        "id": "1",
                                        "question": "What colour is the sky?",
                                        "answers": [{"text": "blue", "answer_start": 11}],
                                    }
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    )
    boolq = tmp_path / "boolq.jsonl"
    boolq.write_text(
        json.dumps(
            {"question": "is the sky blue", "passage": "Sky -- The sky is blue.", "idx": 0, "label": "true"}
        )
        + "\n"
    )
    code, stdout, _ = _run(
        capsys,
        "eval",
        str(tiny_model_dir("llama")),
        "--squad",
        str(squad),
        "--squad-n",
        "1",
        "--boolq",
        str(boolq),
    )
    assert code == 0
    result = json.loads(stdout)
    assert result["squad_n"] == 1 and 0 <= result["squad_f1"] <= 100
    assert result["boolq_n"] == 1 and result["boolq_accuracy"] in (0.0, 100.0)


def test_config_file_and_extra_ignore(tmp_path: Path, tiny_model_dir, capsys) -> None:
    config = tmp_path / "mf.yaml"
    config.write_text(
        "quantization_config:\n  quant_method: rtn\n  weight_dtype: int8\n"
        "  activation_dtype: None\n  modules_to_not_convert: [lm_head]\n  algorithm_args: {}\n"
    )
    code, stdout, _ = _run(
        capsys,
        "quantize",
        str(tiny_model_dir("llama")),
        "--config",
        str(config),
        "--ignore",
        "down_proj",
        "-o",
        str(tmp_path / "q"),
    )
    assert code == 0 and json.loads(stdout)["quantized_layers"] == 12


def test_eval_refuses_an_embedding_comparison_of_a_causal_lm_before_any_work(
    tmp_path: Path, tiny_model_dir, text_file: Path, capsys
) -> None:
    """--docs and --lee pool an encoder's last hidden state; a causal LM has none (an AttributeError
    deep in the forward pass before): one line, before the perplexity it was also asked for."""
    llama = str(tiny_model_dir("llama"))
    docs = tmp_path / "docs.cor"
    docs.write_text("one document\nanother document\n")

    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["eval", *argv])
        out, err = capsys.readouterr()
        assert exc.value.code == 2 and out == ""
        return err.strip().splitlines()[-1]

    for extra in (["--docs", str(docs), "--reference", llama], ["--lee", str(tmp_path)]):
        err = refused(llama, "--text", str(text_file), *extra)
        assert "compare sentence embeddings of an encoder" in err and "LlamaForCausalLM" in err
    err = refused(str(tiny_model_dir("bert")), "--docs", str(docs), "--reference", llama)
    assert "is a causal LM (LlamaForCausalLM)" in err


def test_json_lines_documents_calibrate_and_evaluate_as_their_joined_text(
    tmp_path: Path, tiny_model_dir, text_file: Path, capsys
) -> None:
    """`--calib` and `--text` take C4-style JSON Lines (`{"text": ...}` per line) as the documents joined by
    a blank line: the same calibration and perplexity as that plain text."""
    docs = [f" = Title {i} = \n the quick brown fox jumps over the lazy dog . \n" * 12 for i in range(5)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "url": f"u{i}"}) + "\n" for i, d in enumerate(docs)))
    joined = tmp_path / "joined.txt"
    joined.write_text("\n\n".join(docs))
    model = str(tiny_model_dir("llama"))
    results = []
    for data in (jsonl, joined):
        out = tmp_path / data.stem
        argv = ["quantize", model, "--preset", "w8a8", "--calib", str(data), "--calib-samples", "4"]
        code, _, _ = _run(capsys, *argv, "--calib-seq-len", "32", "-o", str(out))
        assert code == 0
        code, stdout, _ = _run(capsys, "eval", str(out), "--text", str(data), "--seq-len", "64")
        assert code == 0
        calibration = json.loads((out / "quantmint_calibration.json").read_text())
        results.append((json.loads(stdout)["ppl"], calibration["smooth_alpha_per_block"]))
    assert results[0] == results[1]


def test_calib_kind_reads_a_file_whose_name_does_not_say_its_format(
    tmp_path: Path, tiny_model_dir, capsys
) -> None:
    """BoolQ lines saved as `.json` are refused by name (auto reads `.json` as SQuAD) with the switch that
    reads them; `--calib-kind boolq` then calibrates exactly as the same lines named `.jsonl` do."""
    record = {
        "question": "is the sky blue",
        "passage": "Sky -- The sky is blue on a clear day.",
        "label": "true",
    }
    lines = "".join(json.dumps({**record, "idx": i}) + "\n" for i in range(6))
    (tmp_path / "boolq.json").write_text(lines)
    (tmp_path / "boolq.jsonl").write_text(lines)
    model = str(tiny_model_dir("llama"))

    def quantize(data: str, *kind: str) -> tuple[int, str, Path]:
        out = tmp_path / f"out-{data}-{len(kind)}"
        argv = ["quantize", model, "--preset", "w8a8", "--calib", str(tmp_path / data), *kind]
        code, _, err = _run(capsys, *argv, "--calib-samples", "4", "--calib-seq-len", "32", "-o", str(out))
        return code, err, out

    code, err, out = quantize("boolq.json")
    assert code != 0 and not out.exists()
    assert "boolq.json, line 2 column 1: a second JSON value" in err and "--calib-kind boolq" in err
    assert "Traceback" not in err
    alphas = []
    for data, kind in (("boolq.json", ["--calib-kind", "boolq"]), ("boolq.jsonl", [])):
        code, _, out = quantize(data, *kind)
        assert code == 0
        alphas.append(json.loads((out / "quantmint_calibration.json").read_text())["smooth_alpha_per_block"])
    assert alphas[0] == alphas[1]


def test_hadamard_flag_keeps_the_preset_and_rotates_down_proj(
    tmp_path: Path, tiny_model_dir, text_file: Path, capsys
) -> None:
    model = str(tiny_model_dir("llama"))
    argv = [
        "quantize",
        model,
        "--preset",
        "w8a8",
        "--hadamard",
        "--calib",
        str(text_file),
        "--calib-samples",
        "4",
    ]
    code, _, _ = _run(capsys, *argv, "--calib-seq-len", "32", "-o", str(tmp_path / "q"))
    assert code == 0
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block["config"]["algorithm_args"]["hadamard"] is True
    assert block["config"]["algorithm_args"]["smooth_alpha_grid"] == [0.5, 0.6, 0.7, 0.8]  # the preset's
    assert block["rotated_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # --smooth-alpha fixes alpha (no search) and keeps the rest, the rotation included.
    argv += ["--smooth-alpha", "0.6", "--calib-seq-len", "32", "-o", str(tmp_path / "fixed")]
    code, _, _ = _run(capsys, *argv)
    assert code == 0
    args = json.loads((tmp_path / "fixed" / "config.json").read_text())["quantization_config"]["config"]
    assert args["algorithm_args"]["smooth_alpha"] == 0.6 and args["algorithm_args"]["smooth_alpha_grid"] == []
    assert args["algorithm_args"]["hadamard"] is True and args["kvcache_dtype"] is None
    calibration = json.loads((tmp_path / "fixed" / "quantmint_calibration.json").read_text())
    assert set(calibration["smooth_alpha_per_block"]) == {0.6}
    # --no-hadamard turns off a preset's rotation (w8a8-ptq's hadamard: auto); not both flags at once
    config = tmp_path / "short.yaml"
    config.write_text(get_preset("w8a8-ptq").with_updates(block_ptq={"n_outer_loops": 2}).to_yaml())
    argv = ["quantize", model, "--config", str(config), "--calib", str(text_file), "--calib-samples", "4"]
    code, _, _ = _run(capsys, *argv, "--calib-seq-len", "32", "--no-hadamard", "-o", str(tmp_path / "plain"))
    assert code == 0
    block = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert block["config"]["algorithm_args"]["hadamard"] is False and block["rotated_modules"] == []
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--hadamard", "--no-hadamard", "-o", str(tmp_path / "both")])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["quantize", "{missing}", "-o", "{out}"], "does not exist"),
        (["quantize", "{model}", "-o", "{out}", "--preset", "w8a8"], "needs calibration data"),
        (
            ["quantize", "{model}", "-o", "{out}", "--preset", "w8a8", "--calib", "{missing}"],
            "does not exist",
        ),
        (["quantize", "{model}", "-o", "{out}", "--family", "opt"], "unknown model family 'opt'"),
        (["quantize", "{model}", "-o", "{out}", "--config", "{badconfig}"], "unknown key 'frobnicate'"),
        (["eval", "{model}"], "--text"),
        (["quantize", "{model}", "-o", "{out}", "--hadamard"], "activation_dtype: int8, or hadamard: false"),
        (["quantize", "{model}", "-o", "{out}", "--smooth-alpha", "0.5"], "does no SmoothQuant"),
        (
            ["quantize", "{model}", "-o", "{out}", "--preset", "w8a8", "--smooth-alpha", "1.5"],
            "--smooth-alpha: PTQConfig: algorithm_args: AlgorithmArgs: invalid value 1.5 for 'smooth_alpha'",
        ),
        (["inspect", "{model}"], "not a quantmint checkpoint"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path: Path, tiny_model_dir, argv, fragment) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("frobnicate: 1\n")
    values = {
        "missing": str(tmp_path / "nope"),
        "out": str(tmp_path / "o"),
        "model": str(tiny_model_dir("llama")),
        "badconfig": str(bad),
    }
    result = subprocess.run(
        [sys.executable, "-m", "quantmint.tools.cli", *[a.format(**values) for a in argv]],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert fragment in last and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path: Path, tiny_model_dir, capsys) -> None:
    (tmp_path / "o").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tiny_model_dir("llama")), "-o", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- commands added by plugins


def test_core_cli_imports_no_backend_and_serve_comes_from_the_vllm_backend_plugin() -> None:
    from quantmint.extension import registry
    from quantmint.tools import cli

    assert "quantmint.backends" not in Path(cli.__file__).read_text()
    owners = [i.plugin_name for i in registry.get_plugin_manager().hook.register_commands.get_hookimpls()]
    assert owners == ["vllm_backend"]
    assert "serve" in cli.build_parser()._subparsers._group_actions[0].choices


def test_serve_without_vllm_says_in_one_line_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    code, _, err = _run(capsys, "serve", "some/dir")
    assert code == 2
    assert err.strip() == (
        "quantmint serve: error: vLLM is not installed: pip install 'quantmint[vllm]' (see docs/serving.md)"
    )


def test_a_plugin_adds_a_command(capsys: pytest.CaptureFixture[str], temporary_plugin) -> None:
    from quantmint import hookimpl

    class Hello:
        @hookimpl
        def register_commands(self, subparsers):
            p = subparsers.add_parser("hello", help="say hello")
            p.add_argument("name")
            p.set_defaults(func=lambda args: print(f"hello {args.name}"))

    temporary_plugin(Hello(), "hello-plugin")
    assert _run(capsys, "hello", "you")[:2] == (0, "hello you\n")


def test_a_plugin_command_that_takes_a_core_name_is_refused(
    capsys: pytest.CaptureFixture[str], temporary_plugin
) -> None:
    from quantmint import hookimpl

    class Clash:
        @hookimpl
        def register_commands(self, subparsers):
            subparsers.add_parser("export")

    temporary_plugin(Clash(), "clash-plugin")
    code, _, err = _run(capsys, "export", "x", "-o", "y")
    assert code == 2 and "plugin 'clash-plugin' adds a command the CLI has already" in err
    assert len(err.strip().splitlines()) == 1


def test_quantize_with_an_asymmetric_yaml_config_and_inspect(tmp_path: Path, tiny_model_dir, capsys) -> None:
    """`--config` with `weights.symmetric: false` (W4A16, groups of 32): the checkpoint has zero points
    and `inspect` says so; an 8-bit asymmetric config is refused in one line naming the fix."""
    config = tmp_path / "asym.yaml"
    config.write_text(
        "weight_dtype: int4\nweights: {num_bits: 4, symmetric: false, strategy: group, group_size: 32}\n"
    )
    out = tmp_path / "q"
    code, stdout, _ = _run(
        capsys, "quantize", str(tiny_model_dir("llama")), "--config", str(config), "-o", str(out)
    )
    assert code == 0 and json.loads(stdout)["scheme"] == "w4a16-asym"
    code, stdout, _ = _run(capsys, "inspect", str(out))
    assert "scheme w4a16-asym" in stdout and "uint4+zp[64, 64]" in stdout
    config.write_text("weight_dtype: int8\nweights: {symmetric: false}\n")
    code, _, stderr = _run(
        capsys, "quantize", str(tiny_model_dir("llama")), "--config", str(config), "-o", str(tmp_path / "r")
    )
    assert code == 2 and "4-bit only" in stderr and "symmetric: true" in stderr
    assert len(stderr.strip().splitlines()) == 1
