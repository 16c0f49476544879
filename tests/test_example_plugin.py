"""The examples/ plugin, installed as its own package, is discovered and used with no change to core."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import install_example, plugin_env

SCRIPT = """
import torch, transformers, quantmint
from quantmint.extension import registry
from quantmint.numerics.quant_math import sqnr_db
assert "opt" in registry.model_families(), registry.model_families()
owner = dict(registry.get_plugin_manager().list_name_plugin())["opt"]
assert owner.__name__ == "quantmint_opt", owner
torch.manual_seed(0)
cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=256, max_position_embeddings=64, word_embed_proj_dim=64)
model = transformers.OPTForCausalLM(cfg).eval()
ids = torch.randint(0, 256, (2, 16))
ref = model(ids).logits
quantmint.quantize(model, "w8a16")
print("modules", len(quantmint.quant_state(model).modules))
print("sqnr", sqnr_db(ref, model(ids).logits))
"""


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example("quantmint-opt", tmp_path_factory.mktemp("site"))


def test_example_plugin_is_discovered_and_used(installed_example: Path) -> None:
    env = plugin_env(installed_example)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split() for line in result.stdout.splitlines())
    assert int(lines["modules"]) == 12  # 6 linears x 2 blocks
    assert float(lines["sqnr"]) >= 35.0


def test_without_the_example_opt_is_unknown() -> None:
    code = "from quantmint import registry; print('opt' in registry.model_families())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


CHECK = """
import sys, torch, transformers
from quantmint.tools.cli import main
torch.manual_seed(0)
cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=256, max_position_embeddings=64, word_embed_proj_dim=64)
transformers.OPTForCausalLM(cfg).eval().save_pretrained(sys.argv[1])
sys.exit(main(["check-family", sys.argv[1], "--skip-vllm"]))  # vLLM CPU takes no head size 16
"""


def test_example_plugin_passes_check_family(installed_example: Path, tmp_path: Path) -> None:
    env = plugin_env(installed_example)
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path / "opt")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    status = [line.split()[0] for line in result.stdout.splitlines() if line]
    assert status == ["ok", "ok", "ok", "skip"], result.stdout
    assert "family 'opt': 2 blocks, 6 linears per block" in result.stdout
    assert "kv capture: model.decoder.layers.0 hands its K/V to the cache" in result.stdout
