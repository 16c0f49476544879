"""quantmint never runs Python from a model directory.

A model directory whose config.json or tokenizer_config.json has an `auto_map` names Python files in
the directory for transformers to import. Without `trust_remote_code=False`, transformers asks "Do you
wish to run the custom code? [y/N]" on stdin, and a `y` runs the directory's code. Here every such
file writes a marker when imported; each command is run with `y` on stdin, must refuse the directory
with one line and exit 2, and the marker must never appear.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
{body}
"""
CONFIG_BODY = """
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil"
"""
MODEL_BODY = """
from transformers import LlamaForCausalLM
class EvilForCausalLM(LlamaForCausalLM):
    pass
"""
TOKENIZER_BODY = """
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _write_code(path: Path, marker: Path) -> None:
    for name, body in (
        ("configuration_evil", CONFIG_BODY),
        ("modeling_evil", MODEL_BODY),
        ("tokenization_evil", TOKENIZER_BODY),
    ):
        (path / f"{name}.py").write_text(EVIL.format(marker=str(marker), body=body))


def _edit_json(file: Path, **updates: object) -> None:
    data = json.loads(file.read_text())
    data.update(updates)
    file.write_text(json.dumps(data, indent=2))


def _custom_config(path: Path) -> None:
    """config.json: a model type transformers does not know, with its config and model in the directory."""
    _edit_json(
        path / "config.json",
        model_type="evil",
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )


def _custom_tokenizer(path: Path) -> None:
    """tokenizer_config.json: a tokenizer class from the directory."""
    _edit_json(
        path / "tokenizer_config.json",
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]},
    )


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> dict[str, Path]:
    """Float model dirs with custom code in config.json / tokenizer_config.json, and a quantmint
    checkpoint whose config.json was given an auto_map afterwards."""
    root = tmp_path_factory.mktemp("remote-code")
    marker = root / "MARKER"
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out: dict[str, Path] = {"marker": marker, "text": text}
    for name, edit in (("config", _custom_config), ("tokenizer", _custom_tokenizer)):
        path = root / name
        shutil.copytree(tiny_model_dir("llama"), path)
        _write_code(path, marker)
        edit(path)
        out[name] = path
    checkpoint = root / "checkpoint"
    done = _quantmint("quantize", str(tiny_model_dir("llama")), "-o", str(checkpoint))
    assert done.returncode == 0, done.stderr
    shutil.copytree(checkpoint, root / "clean-checkpoint")
    out["clean"] = root / "clean-checkpoint"
    _write_code(checkpoint, marker)
    _custom_config(checkpoint)
    out["checkpoint"] = checkpoint
    return out


def _quantmint(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quantmint.tools.cli", *argv],
        input="y\ny\ny\n",  # yes to every "Do you wish to run the custom code?"
        capture_output=True,
        text=True,
        timeout=300,
    )


CASES = {
    "quantize_custom_config_streamed": ["quantize", "{config}", "-o", "{out}", "--stream"],
    "quantize_custom_config": ["quantize", "{config}", "-o", "{out}"],
    "quantize_custom_tokenizer_calibrating": [
        "quantize",
        "{tokenizer}",
        "-o",
        "{out}",
        "--preset",
        "w8a8",
        "--calib",
        "{text}",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "16",
    ],
    "eval_custom_tokenizer": ["eval", "{tokenizer}", "--text", "{text}", "--max-tokens", "64"],
    "eval_custom_config": ["eval", "{config}", "--text", "{text}", "--max-tokens", "64"],
    "eval_checkpoint_with_custom_config": ["eval", "{checkpoint}", "--text", "{text}", "--max-tokens", "64"],
    "inspect_checkpoint_with_custom_config": ["inspect", "{checkpoint}"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_dir_with_custom_code_is_refused_and_its_code_never_runs(
    case: str, dirs: dict[str, Path], tmp_path: Path
) -> None:
    dirs["marker"].unlink(missing_ok=True)
    values = {k: str(v) for k, v in dirs.items()} | {"out": str(tmp_path / "out")}
    done = _quantmint(*[a.format(**values) for a in CASES[case]])
    ran = dirs["marker"].exists()
    dirs["marker"].unlink(missing_ok=True)
    assert not ran, f"{case}: the model directory's code ran; stderr: {done.stderr[-2000:]}"
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "custom code" in lines[0] and "auto_map" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_serve_refuses_trust_remote_code_and_pins_it_off(dirs: dict[str, Path]) -> None:
    from quantmint.backends.vllm.serve import serve_command
    from quantmint.errors import QuantmintError

    checkpoint = dirs["clean"]
    cmd, _ = serve_command(checkpoint, environ={})
    assert "--no-trust-remote-code" in cmd and "--trust-remote-code" not in cmd
    for extra in (["--trust-remote-code"], ["--trust-remote-code=true"]):
        with pytest.raises(QuantmintError, match="never runs code"):
            serve_command(checkpoint, extra=extra, environ={})
    with pytest.raises(QuantmintError, match="custom code"):
        serve_command(dirs["checkpoint"], environ={})


def test_every_transformers_load_pins_trust_remote_code_off() -> None:
    """A source audit: each from_pretrained / AutoConfig / AutoTokenizer / vLLM LLM call in the package
    passes trust_remote_code=False (GenerationConfig and _from_config import no code)."""
    import re

    root = Path(__file__).resolve().parents[2]
    calls = re.compile(r"(Auto\w+\.from_pretrained|\w+_cls\.from_pretrained|\bLLM)\(")
    missing = []
    for folder in ("core", "plugins", "backends"):
        for file in (root / folder).rglob("*.py"):
            text = file.read_text()
            for match in calls.finditer(text):
                call = text[match.start() : text.find(")", match.end()) + 1]
                if "trust_remote_code=False" not in call and "**kwargs" not in call:
                    missing.append(f"{file.relative_to(root)}: {call}")
    assert not missing, missing
    offline = (root / "backends" / "vllm" / "offline.py").read_text()
    assert '"trust_remote_code": False' in offline
