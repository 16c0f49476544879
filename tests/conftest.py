"""Tiny seeded models built from transformers configs (no downloads), and plugin fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from quantmint.config import PTQConfig, get_preset
from quantmint.extension import registry

VOCAB = 256
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 2-block config of each built-in family; hidden 64 keeps every test fast."""
    common_decoder = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common_decoder, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**common_decoder)
    if family == "qwen2":
        return transformers.Qwen2Config(**common_decoder)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        )
    raise ValueError(family)


TINY_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}


def build_tiny(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model_cls = getattr(transformers, TINY_CLASSES[family])
    return model_cls(tiny_config(family)).eval()


def unrotated(preset: str) -> PTQConfig:
    """`preset` without its Hadamard rotation (`--no-hadamard`): what compressed-tensors export takes."""
    config = get_preset(preset)
    return config.with_updates(algorithm_args={**config.algorithm_args.model_dump(), "hadamard": False})


def model_output(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for LMs, last hidden state for encoders."""
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer made locally (no merges), matching VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


@pytest.fixture
def input_ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 24))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Save each tiny family once per session, with the byte tokenizer, as a float HF directory."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            build_tiny(family).save_pretrained(path)
            byte_tokenizer().save_pretrained(path)
            cache[family] = path
        return cache[family]

    return make


@pytest.fixture
def temporary_plugin() -> Iterator[Callable[[object, str], None]]:
    """Register throw-away plugins for one test; unregister them (and forget registries) afterwards."""
    pm = registry.get_plugin_manager()
    added: list[object] = []

    def add(plugin: object, name: str) -> None:
        pm.register(plugin, name=name)
        added.append(plugin)
        registry.refresh()

    try:
        yield add
    finally:
        for plugin in added:
            pm.unregister(plugin)
        registry.refresh()


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def install_example(name: str, target: Path) -> Path:
    """pip-install the example plugin examples/`name` into `target` (no dependencies, no build isolation),
    as a user installs a third-party plugin; run code that should see it with `plugin_env(target)`."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--target", str(target), str(EXAMPLES / name)],
        check=True,
        capture_output=True,
    )
    return target


def plugin_env(site: Path) -> dict[str, str]:
    """The environment of a subprocess that imports the plugins installed in `site` (all of them)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("QUANTMINT_PLUGINS", None)
    return env
