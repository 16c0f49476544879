"""vLLM backend: serve quantmint checkpoints with vLLM, no flags and no conversion.

vLLM calls `register` (entry point group `vllm.general_plugins`, name `quantmint`) once in every vLLM
process. It registers the quantization method `quantmint`, which vLLM then picks from the checkpoint's
`config.json` (`quantization_config.quant_method: quantmint`):

- W8A8 layers run on vLLM's own int8 kernel selection (`init_int8_linear_kernel`: oneDNN or AMX on CPU,
  CUTLASS or Triton on CUDA), after a probe that the selected kernel accumulates exactly in int32; where it
  does not (x86 CPUs without VNNI add pairs of int8 products in saturating int16), the layer runs
  quantmint's exact int8 x int8 -> int32 matmul instead (there: the W8A16 SIMD kernel on the int8
  activations, over input chunks whose sums float32 holds exactly; `int8_linear.int8_matmul_path`).
- W8A16 layers run on quantmint's int8-weight matmul (vLLM has no int8 weight-only kernel on CPU).
- W4A16 layers run on vLLM's mixed-precision kernel selection (`choose_mp_linear_kernel`: CPUWNA16 on CPU,
  Machete or Marlin on CUDA); where the selected kernel cannot run the activation dtype (vLLM 0.32's
  CPUWNA16 in float32), on quantmint's int4 matmul. W4A8 is refused with the alternatives.
- Layers the checkpoint left float stay float.
- C8 (int8 KV cache) checkpoints get vLLM's fp8 KV cache (the same byte per element; vLLM keeps no int8
  cache on CPU) with per-tensor scales from the calibrated K/V ranges (`kv_cache`), unless
  `QUANTMINT_VLLM_KV_CACHE=float` asks for a float cache.

Importing quantmint never imports vLLM: only `register` does. This module is also a quantmint plugin
(entry point `vllm_backend` of the `quantmint` group): it adds `quantmint serve` to the CLI through the
`register_commands` hook, whether vLLM is installed or not.
"""

from __future__ import annotations

from typing import Any

from quantmint.extension.hookspecs import hookimpl

__all__ = ["KV_CACHE_ENV", "SUPPORTED_VLLM", "register", "register_commands"]

SUPPORTED_VLLM = "0.32"
"""The vLLM release series this backend is tested against (it uses vLLM's internal layer APIs)."""

KV_CACHE_ENV = "QUANTMINT_VLLM_KV_CACHE"
"""Set to `float` to serve a C8 checkpoint with vLLM's float KV cache (its K/V scales unused)."""


def register() -> None:
    """Register the `quantmint` quantization method with vLLM. Cheap and idempotent."""
    from quantmint.backends.vllm import config  # noqa: F401  (importing registers it, once per process)


@hookimpl
def register_commands(subparsers: Any) -> None:
    """Add `quantmint serve` (see `quantmint.backends.vllm.cli`)."""
    from quantmint.backends.vllm.cli import add_commands

    add_commands(subparsers)
