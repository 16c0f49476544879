"""vLLM linear methods for quantmint's int8 layers (tensor names as in the checkpoint: `weight` int8
[out, in], `weight_scale` float32 [out, 1], `input_scale` float32 [1] for static activations)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import init_int8_linear_kernel
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)
from vllm.model_executor.utils import replace_parameter

from quantmint.algorithms.rotation import apply_hadamard, hadamard_factors_for
from quantmint.backends.torch.int8_linear import int8_linear
from quantmint.backends.torch.int8_weight_only import (
    amx_woq_linear,
    amx_woq_supported,
    int8_weight_only_linear,
    pack_weight_for_amx,
)

__all__ = ["W8A8LinearMethod", "W8A16LinearMethod", "vllm_int8_kernel_is_exact"]

logger = init_logger(f"vllm.{__name__}")  # under vLLM's "vllm" logger, whose handler prints info lines


def _transposing(weight_loader: Callable[..., Any]) -> Callable[..., Any]:
    """Undo the transpose vLLM's GPT2 applies to Conv1D weights: quantmint stores them [out, in]."""

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return weight_loader(param, loaded_weight.t(), *args, **kwargs)

    return load


def _create_int8_weights(
    layer: torch.nn.Module,
    input_size_per_partition: int,
    output_partition_sizes: list[int],
    weight_loader: Callable[..., Any],
    transposed: bool,
) -> None:
    layer.logical_widths = output_partition_sizes
    out = sum(output_partition_sizes)
    weight = ModelWeightParameter(
        data=torch.empty(out, input_size_per_partition, dtype=torch.int8),
        input_dim=1,
        output_dim=0,
        weight_loader=_transposing(weight_loader) if transposed else weight_loader,
    )
    layer.register_parameter("weight", weight)
    scale = ChannelQuantScaleParameter(
        data=torch.empty(out, 1, dtype=torch.float32), output_dim=0, weight_loader=weight_loader
    )
    layer.register_parameter("weight_scale", scale)


class _Int8WeightsMethod(LinearMethodBase):
    """Creates the int8 `weight` [out, in] and float32 `weight_scale` [out, 1] of every int8 scheme."""

    def __init__(self, transposed: bool = False, rotate_input: bool = False) -> None:
        self.transposed = transposed
        # Called before the weights are processed (the quantization config checks there that every
        # quantized checkpoint module found its layer, for model classes that never ask it earlier).
        self.before_processing: Callable[[], None] = lambda: None
        # The checkpoint folded a Hadamard matrix into this layer's weight (`quantmint.algorithms.rotation`):
        # its input is rotated the same way before the int8 matmul.
        self.rotate_input = rotate_input

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        if self.rotate_input and input_size_per_partition != input_size:
            raise ValueError(
                f"a quantmint layer with a Hadamard-rotated input ({input_size} features) cannot be split "
                f"over tensor-parallel ranks ({input_size_per_partition} per rank): the rotation mixes all "
                "features. Serve with tensor_parallel_size=1, or quantize without algorithm_args.hadamard"
            )
        if self.rotate_input:  # kept on the layer: no cache lookup inside a compiled forward
            layer.quantmint_hadamard = hadamard_factors_for(input_size)
        weight_loader = extra_weight_attrs["weight_loader"]
        _create_int8_weights(
            layer, input_size_per_partition, output_partition_sizes, weight_loader, self.transposed
        )
        layer.quantmint_dtype = params_dtype
        self.create_extra_weights(layer, output_partition_sizes, weight_loader)

    def create_extra_weights(
        self, layer: torch.nn.Module, output_partition_sizes: list[int], weight_loader: Callable[..., Any]
    ) -> None:
        """More tensors of the scheme (none by default)."""


# ---------------------------------------------------------------- W8A8


def _new_kernel(static_input: bool) -> Any:
    return init_int8_linear_kernel(
        is_channelwise=True,
        is_static_input_scheme=static_input,
        input_symmetric=True,
        module_name="quantmint W8A8",
    )


@functools.cache
def vllm_int8_kernel_is_exact(
    out_features: int, in_features: int, static_input: bool, dtype: torch.dtype
) -> bool:
    """Whether the int8 kernel vLLM selects for this layer shape runs and accumulates exactly (in int32).

    x86 CPUs without VNNI multiply u8 x s8 pairs into saturating int16 (`vpmaddubsw`); oneDNN's s8 x s8
    GEMM then loses up to half of a large dot product. The probe (every activation and weight 127, so
    each pair is 2 * 255 * 127 > 32767 after oneDNN's +128 shift) sees that: the exact output is
    `in_features`; a saturating kernel returns far less. The layer shape matters because vLLM picks its
    CPU kernel (AMX or oneDNN) per shape.
    """
    probe = torch.nn.Module()
    probe.logical_widths = [out_features]
    frozen = functools.partial(torch.nn.Parameter, requires_grad=False)
    probe.register_parameter("weight", frozen(torch.full((out_features, in_features), 127, dtype=torch.int8)))
    probe.register_parameter(
        "weight_scale", frozen(torch.full((out_features, 1), 1 / 127, dtype=torch.float32))
    )
    probe.register_parameter("bias", None)
    probe.register_parameter("input_zero_point", None)
    probe.register_parameter("azp_adj", None)
    input_scale = frozen(torch.full((1,), 1 / 127, dtype=torch.float32)) if static_input else None
    probe.register_parameter("input_scale", input_scale)
    kernel = _new_kernel(static_input)
    x = torch.ones(4, in_features, dtype=dtype)
    try:
        kernel.process_weights_after_loading(probe)
        y = kernel.apply_weights(probe, x, None).float()
    except RuntimeError as exc:  # e.g. vLLM's AMX kernel takes bf16/fp16 activations only
        logger.warning(
            "vLLM's int8 kernel %s cannot run a %dx%d layer with %s activations (%s): quantmint's exact "
            "int32 matmul runs it instead",
            type(kernel).__name__,
            out_features,
            in_features,
            dtype,
            str(exc).splitlines()[0],
        )
        return False
    exact = bool(torch.allclose(y, torch.full_like(y, float(in_features)), rtol=1e-2, atol=0.0))
    if not exact:
        logger.warning(
            "vLLM's int8 kernel %s does not accumulate exactly on this machine (probe: %.0f instead of %d; "
            "x86 without VNNI saturates int16 pair sums): quantmint W8A8 layers of shape %dx%d use "
            "quantmint's exact int32 matmul instead",
            type(kernel).__name__,
            y.min().item(),
            in_features,
            out_features,
            in_features,
        )
    return exact


@register_weight_loader_v2_supported_method
class W8A8LinearMethod(_Int8WeightsMethod):
    """Int8 weights per output channel, int8 activations per token (dynamic) or per tensor (static)."""

    def __init__(
        self, static_input: bool = False, transposed: bool = False, rotate_input: bool = False
    ) -> None:
        super().__init__(transposed, rotate_input)
        self.static_input = static_input
        self.kernel: Any = None

    def create_extra_weights(
        self, layer: torch.nn.Module, output_partition_sizes: list[int], weight_loader: Callable[..., Any]
    ) -> None:
        input_scale = None
        if self.static_input:  # one per fused part; they observed the same input, so they agree
            input_scale = PerTensorScaleParameter(
                data=torch.empty(len(output_partition_sizes), dtype=torch.float32),
                weight_loader=weight_loader,
            )
        layer.register_parameter("input_scale", input_scale)
        layer.register_parameter("input_zero_point", None)
        layer.register_parameter("azp_adj", None)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.before_processing()
        if self.static_input:
            replace_parameter(layer, "input_scale", layer.input_scale.data.max().reshape(1))
        out_features, in_features = layer.weight.shape
        if vllm_int8_kernel_is_exact(out_features, in_features, self.static_input, layer.quantmint_dtype):
            self.kernel = _new_kernel(self.static_input)
            self.kernel.process_weights_after_loading(layer)
        else:
            replace_parameter(layer, "weight", layer.weight.data.contiguous())

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.rotate_input:
            x = apply_hadamard(x, layer.quantmint_hadamard)
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        return int8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, bias)


# ---------------------------------------------------------------- W8A16


@register_weight_loader_v2_supported_method
class W8A16LinearMethod(_Int8WeightsMethod):
    """Int8 weights per output channel, float activations.

    vLLM 0.32 has no int8 weight-only kernel on CPU (its CPUWNA16 kernel refuses uint8b128), so the layer
    runs quantmint's own:
    - on CPUs with AMX-BF16 serving bf16, `amx_woq_linear` (`csrc/woq.c`): the weight is repacked at
      load (w + 128, in the AMX tile order) and widened to bf16 block by block inside the kernel
      (0.33-0.41× the time of a bf16 F.linear at SmolLM2's decode shapes, benchmarks/int8_matmul.py);
    - elsewhere `int8_weight_only_linear`: `_weight_int8pack_mm` for decode rows, otherwise the int8
      weight cast inside the GEMM with the scale applied to the output.
    Never a dequantized float copy of the weights.
    """

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.before_processing()
        weight = layer.weight.data.contiguous()
        layer.quantmint_amx = amx_woq_supported(weight, layer.quantmint_dtype)
        if layer.quantmint_amx:
            logger.info_once("quantmint W8A16: bf16 layers run the AMX kernel (csrc/woq.c)")
            out_features = weight.shape[0]
            replace_parameter(layer, "weight", pack_weight_for_amx(weight))
            scale = layer.weight_scale.data.float().reshape(-1).expand(out_features).contiguous()
            replace_parameter(layer, "weight_scale", scale)
            layer.quantmint_bias = None  # (bias, its float32 copy), made on first use
            return
        logger.info_once(
            f"quantmint W8A16: {layer.quantmint_dtype} layers run torch's int8-weight matmul "
            "(the AMX kernel takes bf16 on CPUs with AMX-BF16)"
        )
        replace_parameter(layer, "weight", weight)
        scale = layer.weight_scale.data.reshape(-1).to(layer.quantmint_dtype)
        replace_parameter(layer, "weight_scale", scale)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.rotate_input:
            x = apply_hadamard(x, layer.quantmint_hadamard)
        if layer.quantmint_amx:
            bias32 = None
            if bias is not None:
                cached = layer.quantmint_bias
                if cached is None or cached[0] is not bias:
                    cached = layer.quantmint_bias = (bias, bias.float().contiguous())
                bias32 = cached[1]
            return amx_woq_linear(x, layer.weight, layer.weight_scale, bias32)
        return int8_weight_only_linear(x, layer.weight, layer.weight_scale, bias)


# ---------------------------------------------------------------- timing, for benchmarks
def _time_applies(prefix: str) -> None:
    """Time every quantmint linear's `apply` in this process and write {"Method:rows x out x in":
    [calls, seconds]} to PREFIX-PID.json at exit: where a served model's time goes, per layer shape
    (QUANTMINT_VLLM_TIME_LINEARS=PREFIX; benchmarks/vllm_serving.py --time-linears sets it)."""
    import atexit
    import json
    import time

    stats: dict[str, list[float]] = {}

    def timed(cls: type) -> None:
        apply = cls.apply

        def timed_apply(self: Any, layer: torch.nn.Module, x: torch.Tensor, bias: Any = None) -> torch.Tensor:
            start = time.perf_counter()
            y = apply(self, layer, x, bias)
            seconds = time.perf_counter() - start
            rows = x.numel() // max(1, x.shape[-1])
            entry = stats.setdefault(f"{cls.__name__}:{rows}x{y.shape[-1]}x{x.shape[-1]}", [0, 0.0])
            entry[0] += 1
            entry[1] += seconds
            return y

        cls.apply = timed_apply  # type: ignore[method-assign]

    def dump() -> None:
        if stats:
            with open(f"{prefix}-{os.getpid()}.json", "w") as f:
                json.dump(stats, f)

    timed(W8A8LinearMethod)
    timed(W8A16LinearMethod)
    atexit.register(dump)


if os.environ.get("QUANTMINT_VLLM_TIME_LINEARS"):
    _time_applies(os.environ["QUANTMINT_VLLM_TIME_LINEARS"])
