"""Every preset writes the same checkpoint bytes as before the extension-architecture refactor.

`tests/fixtures/preset_sha256.json` holds the sha256 of each preset's whole output directory (every
file, by relative path) for a tiny Llama, GPT2 and BERT whose weights are exactly representable, seeded
integers times a power-of-two step (so the float model is the same bytes on every CPU), quantized through
the CLI with a seeded synthetic calibration text. Refactors of the pipeline, the algorithm registry, the
checkpoint writer or the layout must keep every digest.

Presets that need no calibration are pure elementwise rounding: their digests hold on any CPU. Calibrated
presets multiply matrices, whose float rounding depends on the kernel (ISA, thread count); their digests are
recorded per CPU class and compared where the CPU class matches, and skipped with a reason elsewhere.
Record (only before a refactor, or when a change of the bytes is intended and explained):
`QUANTMINT_RECORD_PRESET_BYTES=1 python -m pytest tests/test_preset_bytes.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, byte_tokenizer

from quantmint.algorithms.ptq import PTQ
from quantmint.config import PRESETS
from quantmint.tools import cli

FIXTURE = Path(__file__).parent / "fixtures" / "preset_sha256.json"
RECORD = os.environ.get("QUANTMINT_RECORD_PRESET_BYTES") == "1"
FAMILIES = ("llama", "gpt2", "bert")
_ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_class() -> str:
    """What a matmul's float rounding depends on: CPU model and caches, ISA extensions, torch, threads."""
    flags: set[str] = set()
    vendor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "model name", "cache size"):
                # blocked GEMMs size their tiles by the caches: one CPU model, one summation order
                vendor = f"{vendor} {value.strip()}" if key.strip() != "vendor_id" else value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = "+".join(f for f in _ISA_FLAGS if f in flags) or "none"
    return f"{vendor}/{isa}/torch-{torch.__version__}/threads-{torch.get_num_threads()}"


def _portable_tiny(family: str, path: Path) -> Path:
    """A tiny model whose every parameter is an integer times 2**-15 (times 0.05 for weights): the same
    bytes from any CPU's torch, unlike values drawn by `normal_`."""
    model = build_tiny(family)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            unit = torch.randint(-(2**15), 2**15, param.shape, generator=generator).float() * 2.0**-15
            is_norm = param.dim() == 1 and any(k in name.lower() for k in ("norm", "ln_", "layernorm"))
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.125 * unit)
            else:
                param.copy_(0.0625 * unit)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _calibration_text(path: Path) -> Path:
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 9))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(300)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _calibrates(preset: str) -> bool:
    return PTQ(PRESETS[preset]).needs_calibration


def _without_timings(record):
    if isinstance(record, dict):
        return {k: _without_timings(v) for k, v in record.items() if k not in ("seconds", "peak_rss_mb")}
    if isinstance(record, list):
        return [_without_timings(v) for v in record]
    return record


def _without_provider_version(config_json: bytes) -> bytes:
    """config.json with the recorded provider's version (`quantization_config.family_provider.version`,
    quantmint's own for the built-in families) replaced by a placeholder: every release bump would change
    every digest otherwise. The distribution name stays in the digest."""
    config = json.loads(config_json)
    provider = config["quantization_config"].get("family_provider")
    if provider is not None:
        provider["version"] = "<version>"
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _dir_digest(out: Path) -> str:
    digest = hashlib.sha256()
    config = _without_provider_version((out / "config.json").read_bytes())
    for file in sorted(p for p in out.rglob("*") if p.is_file()):
        digest.update(file.relative_to(out).as_posix().encode() + b"\0")
        data = file.read_bytes()
        if file.name == "quantmint_calibration.json":  # a run record: its timings and RSS vary by run
            data = json.dumps(_without_timings(json.loads(data)), sort_keys=True).encode()
        elif file.name == "config.json":  # the provider's version left out (see _without_provider_version)
            data = config
        elif file.name == "quantmint_manifest.json":  # its config.json entry follows the normalised file
            manifest = json.loads(data)
            manifest["files"]["config.json"] = {
                "sha256": hashlib.sha256(config).hexdigest(),
                "bytes": len(config),
            }
            data = (json.dumps(manifest, indent=2) + "\n").encode()
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preset-bytes")
    found = {family: _portable_tiny(family, root / family) for family in FAMILIES}
    found["calib"] = _calibration_text(root / "calib.txt")
    return found


def _run(inputs: dict[str, Path], family: str, preset: str, out: Path, capsys, monkeypatch) -> str:
    # Relative paths from the inputs' folder: config.json records the model path (`_name_or_path`).
    monkeypatch.chdir(inputs[family].parent)
    argv = ["quantize", family, "--preset", preset, "-o", str(out)]
    if _calibrates(preset):
        argv += ["--calib", "calib.txt", "--calib-samples", "8", "--calib-seq-len", "32"]
    rc = cli.main(argv)
    captured = capsys.readouterr()
    if rc != 0:
        return "refused"  # a preset the family cannot take (e.g. a KV cache on an encoder) stays refused
    assert out.is_dir(), captured.err
    return _dir_digest(out)


def _load() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {"portable": {}, "by_cpu": {}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_writes_recorded_bytes(family, preset, inputs, tmp_path, capsys, monkeypatch) -> None:
    key = f"{family}/{preset}"
    portable = not _calibrates(preset)
    got = _run(inputs, family, preset, tmp_path / "out", capsys, monkeypatch)
    data = _load()
    table = data["portable"] if portable else data["by_cpu"].setdefault(cpu_class(), {})
    if RECORD:
        table[key] = got
        FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    if key not in table:
        if table:  # this CPU class has digests, not this preset's
            pytest.skip(
                f"{key} calibrates (matmul rounding is CPU-dependent) and has no digest recorded for this "
                f"CPU class ({cpu_class()}); record it with QUANTMINT_RECORD_PRESET_BYTES=1"
            )
        recorded = ", ".join(sorted(c for c, digests in data["by_cpu"].items() if digests)) or "none"
        pytest.skip(
            f"{key} calibrates (matmul rounding is CPU-dependent); digests are recorded for CPU "
            f"classes {recorded}, not for this one ({cpu_class()})"
        )
    assert got == table[key], f"{key}: the checkpoint bytes changed"
