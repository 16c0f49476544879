"""vLLM linear methods for quantmint's layers (tensor names as in the checkpoint: `weight` int8 [out, in],
`weight_scale` float32 [out, 1], `input_scale` float32 [1] for static activations; 4-bit: `weight_packed`
int32 [out, in / 8], `weight_scale` float32 [out, groups], `weight_shape` int64 [2])."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import (
    MPLinearLayerConfig,
    choose_mp_linear_kernel,
    init_int8_linear_kernel,
)
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)
from vllm.model_executor.utils import replace_parameter
from vllm.scalar_type import scalar_types

from quantmint.algorithms.rotation import apply_hadamard, hadamard_factors_for
from quantmint.backends.torch.int4_linear import int4_linear
from quantmint.backends.torch.int8_linear import (
    Int8Panels,
    int8_int8_matmul,
    int8_linear,
    int8_matmul_path,
    pack_int8_weight,
)
from quantmint.backends.torch.int8_weight_only import (
    amx_woq_linear,
    amx_woq_supported,
    int8_weight_only_linear,
    pack_weight_for_amx,
    pack_weight_for_simd,
    simd_woq_kernel,
    simd_woq_linear,
    simd_woq_supported,
)
from quantmint.numerics.quant_math import qparams_from_absmax, row_absmax

__all__ = ["W4A16LinearMethod", "W8A8LinearMethod", "W8A16LinearMethod", "vllm_int8_kernel_is_exact"]

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
        # A row-parallel layer under tensor parallelism: each rank holds a slice of the input features.
        layer.quantmint_input_split = input_size_per_partition != input_size
        if self.rotate_input:  # kept on the layer: no cache lookup inside a compiled forward
            layer.quantmint_hadamard = hadamard_factors_for(input_size)
            if layer.quantmint_input_split:  # this rank's columns of the rotated input (`_rotate`)
                from vllm.distributed import get_tensor_model_parallel_rank

                logger.info_once(
                    "quantmint: Hadamard-rotated row-parallel layers all-gather their input over the "
                    "tensor-parallel ranks, rotate it whole and keep their columns (as on one rank)"
                )

                start = get_tensor_model_parallel_rank() * input_size_per_partition
                layer.quantmint_input_slice = (start, input_size_per_partition)
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


def _rotate(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's input rotated by the Hadamard matrix its weight folded in: (this rank's part, the whole
    rotated row or None). A row-parallel rank holds a slice of the features and the rotation mixes all
    of them (and cannot be folded into what comes before: down_proj's input is act(gate) * up), so the
    slices are all-gathered over the tensor-parallel group, rotated whole as on one rank, and the rank
    keeps its columns (those of its weight shard). Costs one all-gather of the layer's input per call."""
    if not layer.quantmint_input_split:
        return apply_hadamard(x, layer.quantmint_hadamard), None
    from vllm.distributed import tensor_model_parallel_all_gather

    whole = apply_hadamard(tensor_model_parallel_all_gather(x.contiguous(), dim=-1), layer.quantmint_hadamard)
    start, size = layer.quantmint_input_slice
    return whole[..., start : start + size], whole


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
    if exact:
        logger.info(
            "quantmint W8A8: vLLM's int8 kernel %s passed the exactness probe for %dx%d layers with %s "
            "activations (int32 accumulation, probe %.0f of %d): those layers run it",
            type(kernel).__name__,
            out_features,
            in_features,
            dtype,
            y.min().item(),
            in_features,
        )
    else:
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
        if not self.static_input and getattr(layer, "quantmint_input_split", False):
            # Per-token scales of a row-parallel layer come from the token's whole row, as on one rank
            # (vLLM's kernel would take each rank's slice: another rounding than the model calibrated).
            logger.info_once(
                "quantmint W8A8: row-parallel layers take each token's int8 scale over all tensor-parallel "
                "ranks (one all-reduce of a float per token) and run quantmint's exact int32 matmul, so "
                "they round as on one rank"
            )
            _keep_int8_weight(layer)
            layer.quantmint_kernel = (
                f"quantmint int32 matmul ({int8_matmul_path()}), token scales over all ranks"
            )
            return
        if vllm_int8_kernel_is_exact(out_features, in_features, self.static_input, layer.quantmint_dtype):
            self.kernel = _new_kernel(self.static_input)
            self.kernel.process_weights_after_loading(layer)
            layer.quantmint_kernel = f"vLLM {type(self.kernel).__name__}"
        else:
            _keep_int8_weight(layer)
            layer.quantmint_kernel = f"quantmint int32 matmul ({int8_matmul_path()})"

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        whole = None
        if self.rotate_input:
            x, whole = _rotate(layer, x)
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        panels = layer.quantmint_panels
        if not self.static_input and getattr(layer, "quantmint_input_split", False):
            return _row_parallel_int8_linear(x, layer.weight, layer.weight_scale, bias, whole, panels)
        return int8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, bias, panels)


def _keep_int8_weight(layer: torch.nn.Module) -> None:
    """Keep the int8 weight for quantmint's exact int32 matmul: packed for the W8A16 SIMD kernel where that
    is the path (`pack_int8_weight`: CPUs without VNNI), the plain weight then replaced by a one-byte view
    of its shape (the panels hold every value; no second copy of the weights); contiguous elsewhere."""
    weight = layer.weight.data.contiguous()
    panels = pack_int8_weight(weight)
    if panels is not None:
        weight = torch.zeros((), dtype=torch.int8).expand(weight.shape)
    replace_parameter(layer, "weight", weight)
    layer.quantmint_panels = panels


def _row_parallel_int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    whole: torch.Tensor | None = None,
    panels: Int8Panels | None = None,
) -> torch.Tensor:
    """This rank's part of a row-parallel W8A8 layer (x: its slice of the input features), with each
    token's scale taken over the whole row: the max of |x| over every rank's slice (an all-reduce of one
    float per token over the tensor-parallel group; from `whole`, the row itself, when the rank has it),
    so every rank rounds as one rank would (`quant_math.quantize_activation`'s per-token rounding, with
    the row's absmax). vLLM's RowParallelLinear then sums the ranks' partial outputs, as for any layer
    (the bias is passed to one rank only)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if whole is not None:
        absmax = row_absmax(whole.reshape(x2.shape[0], -1).float())
    else:
        import torch.distributed as dist
        from vllm.distributed import get_tp_group

        absmax = row_absmax(x2)
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=get_tp_group().device_group)
    scale = qparams_from_absmax(absmax)
    x_q = (x2 / scale).round_().clamp_(-127, 127).to(torch.int8)
    y = int8_int8_matmul(x_q, weight, panels).float()
    y.mul_(scale).mul_(weight_scale.reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


# ---------------------------------------------------------------- W8A16


@register_weight_loader_v2_supported_method
class W8A16LinearMethod(_Int8WeightsMethod):
    """Int8 weights per output channel, float activations.

    vLLM 0.32 has no int8 weight-only kernel on CPU (its CPUWNA16 kernel refuses uint8b128), so the layer
    runs quantmint's own, chosen at load by what the CPU has:
    - on CPUs with AMX-BF16 serving bf16, `amx_woq_linear` (`csrc/woq.c`): the weight is repacked at
      load (w + 128, in the AMX tile order) and widened to bf16 block by block inside the kernel
      (0.33-0.41× the time of a bf16 F.linear at SmolLM2's decode shapes, benchmarks/int8_matmul.py);
    - on other x86 CPUs with AVX-512 or AVX2+FMA serving float32 or bf16, `simd_woq_linear`
      (`csrc/w8a16.c`): the weight is repacked at load into panels of 2 vectors of output channels
      (same bytes, padded to a panel) and widened to float32 in registers;
    - elsewhere `int8_weight_only_linear`: `_weight_int8pack_mm` for decode rows, otherwise the int8
      weight cast inside the GEMM with the scale applied to the output.
    Never a dequantized float copy of the weights.
    """

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.before_processing()
        weight = layer.weight.data.contiguous()
        dtype = layer.quantmint_dtype
        layer.quantmint_amx = amx_woq_supported(weight, dtype)
        kernel = None if layer.quantmint_amx else simd_woq_kernel()
        layer.quantmint_simd = kernel is not None and simd_woq_supported(weight, dtype, kernel)
        if layer.quantmint_amx or layer.quantmint_simd:
            if layer.quantmint_amx:
                logger.info_once(
                    "quantmint W8A16: bf16 layers run the AMX kernel (csrc/woq.c): vLLM's mixed-precision "
                    "kernels on CPU take no int8 weight-only layer (CPUWNA16 refuses uint8b128)"
                )
                packed = pack_weight_for_amx(weight)
            else:
                assert kernel is not None
                name = kernel.name_for(dtype)
                logger.info_once(
                    f"quantmint W8A16: {dtype} layers run the {name} kernel (csrc/w8a16.c): vLLM's "
                    "mixed-precision kernels on CPU take no int8 weight-only layer "
                    "(CPUWNA16 refuses uint8b128)"
                )
                packed = pack_weight_for_simd(weight, kernel)
            out_features = weight.shape[0]
            replace_parameter(layer, "weight", packed)
            scale = layer.weight_scale.data.float().reshape(-1).expand(out_features).contiguous()
            replace_parameter(layer, "weight_scale", scale)
            layer.quantmint_bias = None  # (bias, its float32 copy), made on first use
            layer.quantmint_kernel = (
                "quantmint AMX" if layer.quantmint_amx else f"quantmint {kernel.name_for(dtype)}"
            )
            return
        logger.info_once(
            f"quantmint W8A16: {dtype} layers run torch's int8-weight matmul "
            "(quantmint's kernels take float32 or bf16 on x86 CPUs with AVX2+FMA or AVX-512, and bf16 on "
            "CPUs with AMX-BF16; vLLM's mixed-precision kernels on CPU take no int8 weight-only layer: "
            "CPUWNA16 refuses uint8b128)"
        )
        replace_parameter(layer, "weight", weight)
        scale = layer.weight_scale.data.reshape(-1).to(dtype)
        replace_parameter(layer, "weight_scale", scale)
        layer.quantmint_kernel = "torch int8-weight matmul"

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.rotate_input:
            x, _ = _rotate(layer, x)
        if layer.quantmint_amx or layer.quantmint_simd:
            bias32 = None
            if bias is not None:
                cached = layer.quantmint_bias
                if cached is None or cached[0] is not bias:
                    cached = layer.quantmint_bias = (bias, bias.float().contiguous())
                bias32 = cached[1]
            if layer.quantmint_amx:
                return amx_woq_linear(x, layer.weight, layer.weight_scale, bias32)
            return simd_woq_linear(x, layer.weight, layer.weight_scale, bias32)
        return int8_weight_only_linear(x, layer.weight, layer.weight_scale, bias)


# ---------------------------------------------------------------- W4A16

W4_WEIGHT_TYPE = scalar_types.uint4b8
"""How vLLM's mixed-precision kernels name quantmint's 4-bit codes: unsigned nibbles with a bias of 8, eight
to an int32 along the input, element j in nibble j % 8 (low first) of word j // 8. quantmint packs exactly
that (`quant_math.pack_int4`: code + 8, its codes in [-7, 7]), so the checkpoint's words go to the kernel
unchanged: no conversion at load."""

W4_ASYM_WEIGHT_TYPE = scalar_types.uint4
"""quantmint's asymmetric 4-bit codes: unsigned nibbles in [0, 15] with no bias (`quant_math.pack_uint4`),
with zero points packed along the output (`quant_math.pack_zero_points`: [ceil(out / 8), groups] int32,
compressed-tensors' `weight_zero_point`), which vLLM's kernels take as they load compressed-tensors'
asymmetric pack-quantized layers (`zero_points=True`)."""

_TORCH_RUNTIME = "serve it with quantmint's torch runtime (quantmint.load_quantized, quantmint eval)"


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def w4a16_kernel_for(
    layer_name: str,
    input_size: int,
    output_size: int,
    input_size_per_partition: int,
    output_size_per_partition: int,
    group_size: int | None,
    act_type: torch.dtype,
    zero_points: bool = False,
) -> tuple[Any, MPLinearLayerConfig]:
    """vLLM's mixed-precision kernel class for one W4A16 layer (`choose_mp_linear_kernel`: CPUWNA16 on CPU,
    Machete or Marlin on CUDA) and its layer config (`zero_points`: asymmetric weights, `uint4` codes with
    zero points); ValueError, one line naming the layer and what to do, for a layout no kernel takes."""
    if group_size is not None and input_size % group_size:
        last = input_size % group_size
        raise ValueError(
            f"quantmint: W4A16 layer {layer_name} has {input_size} input features in groups of {group_size}, "
            f"so its last group holds {last} columns, which vLLM's mixed-precision kernels cannot take "
            f"(every group must be whole): requantize with a group_size that divides {input_size} "
            f"(or strategy: channel), or {_TORCH_RUNTIME}"
        )
    if group_size is not None and input_size_per_partition % group_size:
        raise ValueError(
            f"quantmint: W4A16 layer {layer_name}: tensor parallelism splits its {input_size} input features "
            f"into {input_size_per_partition} per rank, not a whole number of groups of {group_size}: serve "
            "with a smaller tensor_parallel_size, or requantize with a group_size that divides the split"
        )
    config = MPLinearLayerConfig(
        full_weight_shape=(input_size, output_size),
        partition_weight_shape=(input_size_per_partition, output_size_per_partition),
        weight_type=W4_ASYM_WEIGHT_TYPE if zero_points else W4_WEIGHT_TYPE,
        act_type=act_type,
        group_size=-1 if group_size is None else group_size,
        zero_points=zero_points,
    )
    try:
        kernel = choose_mp_linear_kernel(config)
    except ValueError as exc:
        reasons = _one_line(str(exc)).replace(
            "Failed to find a kernel that can implement the WNA16 linear layer. Reasons: ;", ""
        )
        groups = "per channel" if group_size is None else f"groups of {group_size}"
        groups += ", zero points" if zero_points else ""
        raise ValueError(
            f"quantmint: no vLLM mixed-precision kernel serves W4A16 layer {layer_name} "
            f"({input_size_per_partition} inputs x {output_size_per_partition} outputs, {groups}, "
            f"{act_type}): {reasons.strip()}. Leave this layer in float (--ignore), or {_TORCH_RUNTIME}"
        ) from None
    return kernel, config


def _w4_probe_layer(
    kernel_type: Any,
    config: MPLinearLayerConfig,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
) -> Any:
    """A layer holding the kernel's parameters as vLLM's loader leaves them (plain parameters with the
    layout attributes the kernels read: vLLM's parameter classes need its distributed state)."""
    layer = torch.nn.Module()
    params = [
        ("weight_packed", packed, {"input_dim": 1, "output_dim": 0, "packed_dim": 1, "packed_factor": 8}),
        ("weight_scale", scale, {"input_dim": 1, "output_dim": 0}),
    ]
    if zero_point is not None:
        zp_dims = {"input_dim": 1, "output_dim": 0, "packed_dim": 0, "packed_factor": 8}
        params.append(("weight_zero_point", zero_point, zp_dims))
    for name, data, dims in params:
        param = torch.nn.Parameter(data, requires_grad=False)
        for key, value in dims.items():
            setattr(param, key, value)
        layer.register_parameter(name, param)
    layer.register_parameter("bias", None)
    kernel = kernel_type(config, **_w4_param_names())
    _process_w4_layer(kernel, layer)
    return kernel, layer


def _w4_param_names() -> dict[str, str]:
    """The kernel's parameter names. The zero point's is passed for symmetric layers too, as vLLM's own
    compressed-tensors WNA16 scheme does: its CPU kernel sets it to None there, or (W4A8) allocates a
    constant one under that name."""
    return {
        "w_q_param_name": "weight_packed",
        "w_s_param_name": "weight_scale",
        "w_zp_param_name": "weight_zero_point",
    }


W4A8_ENV = "VLLM_CPU_INT4_W4A8"


def w4a8_requested() -> bool:
    """Whether the user asked vLLM's CPU 4-bit kernel for its W4A8 path (`VLLM_CPU_INT4_W4A8=1` set
    explicitly): on AMX CPUs with bf16 activations it rounds the activations to int8 per token, so it is
    no longer W4A16. Unset, quantmint's W4A16 layers keep float activations (vLLM's default is on)."""
    return os.environ.get(W4A8_ENV, "").strip() not in ("", "0")


@contextlib.contextmanager
def _w4a16_kernel_env() -> Iterator[None]:
    """vLLM's CPU 4-bit kernel with its W4A8 path off while it processes a quantmint W4A16 layer (the
    path is chosen there, from `VLLM_CPU_INT4_W4A8`, default on), unless the user set the variable."""
    if W4A8_ENV in os.environ:
        yield
        return
    os.environ[W4A8_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(W4A8_ENV, None)


def _process_w4_layer(kernel: Any, layer: torch.nn.Module) -> str:
    """`kernel.process_weights_after_loading(layer)` with W4A8 off unless asked for; the kernel's name,
    saying W4A8 where vLLM took that path."""
    with _w4a16_kernel_env():
        kernel.process_weights_after_loading(layer)
    name = type(kernel).__name__
    if getattr(layer, "use_w4a8", False):
        if w4a8_requested():
            logger.info_once(
                f"quantmint W4A16: {W4A8_ENV} is set, so vLLM's {name} serves these layers as W4A8 "
                "(activations rounded to int8 per token, not the float activations they were tuned with)"
            )
        else:
            logger.warning_once(
                f"quantmint W4A16: vLLM's {name} took its W4A8 path (int8 activations per token) although "
                f"{W4A8_ENV} is unset (its value was read before quantmint could turn it off): set "
                f"{W4A8_ENV}=0 before starting vLLM to keep float activations"
            )
        return f"{name}, W4A8"
    return name


@functools.cache
def vllm_w4a16_kernel_runs(
    kernel_type: Any, group_size: int | None, dtype: torch.dtype, zero_points: bool = False
) -> bool:
    """Whether vLLM's selected mixed-precision kernel runs W4A16 with `dtype` activations and gives
    quantmint's dequantized product (codes in [-7, 7] packed as code + 8, the uint4b8 convention; with
    `zero_points`, codes in [0, 15] and a zero point per group, the uint4 one): a small layer with every
    code and per-group scales, against `int4_linear` in float32. vLLM 0.32's CPUWNA16 kernel, for one, is
    selected for float32 layers but implements bf16 and fp16 only."""
    from quantmint.numerics import quant_math

    in_features = 256 if group_size is None else group_size * (1 if group_size % 32 == 0 else 32)
    out_features = 32
    groups = 1 if group_size is None else in_features // group_size
    gen = torch.Generator().manual_seed(0)
    scale = (torch.rand(out_features, groups, generator=gen) + 0.5) / 64
    zp = None
    if zero_points:
        packed = quant_math.pack_uint4(torch.randint(0, 16, (out_features, in_features), generator=gen))
        zp = quant_math.pack_zero_points(torch.randint(0, 16, (out_features, groups), generator=gen))
    else:
        packed = quant_math.pack_int4(torch.randint(-7, 8, (out_features, in_features), generator=gen))
    config = MPLinearLayerConfig(
        full_weight_shape=(in_features, out_features),
        partition_weight_shape=(in_features, out_features),
        weight_type=W4_ASYM_WEIGHT_TYPE if zero_points else W4_WEIGHT_TYPE,
        act_type=dtype,
        group_size=-1 if group_size is None else group_size,
        zero_points=zero_points,
    )
    x = torch.randn(3, in_features, generator=gen).to(dtype)
    want = int4_linear(
        x.float(), packed, scale, in_features, False, group_size=group_size, weight_zero_point=zp
    )
    try:
        device = torch.empty(0).device  # where vLLM is building the model
        kernel, layer = _w4_probe_layer(
            kernel_type,
            config,
            packed.to(device),
            scale.to(device, dtype),
            None if zp is None else zp.to(device),
        )
        got = kernel.apply_weights(layer, x.to(device), None).float().cpu()
    except AttributeError as exc:  # e.g. vLLM's AVX2 build has no `cpu_gemm_wna16` op
        logger.warning_once(
            f"quantmint W4A16: vLLM's {kernel_type.__name__} is selected but its op is missing from the "
            f"vLLM build for this CPU ({_one_line(str(exc))[:200]}): these layers run quantmint's int4 "
            "matmul (unpack to the activation dtype, scale per group, F.linear)"
        )
        return False
    except (RuntimeError, NotImplementedError) as exc:
        logger.warning_once(
            f"quantmint W4A16: vLLM's {kernel_type.__name__} cannot run {dtype} activations "
            f"({_one_line(str(exc))[:200]}): these layers run quantmint's int4 matmul (unpack to the "
            "activation dtype, scale per group, F.linear); serve in bfloat16 for vLLM's kernel"
        )
        return False
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    if error > tol:
        raise ValueError(
            f"quantmint W4A16: vLLM's {kernel_type.__name__} does not give quantmint's int4 product on a "
            f"probe layer ({dtype}, relative error {error:.3g}): its 4-bit convention differs from "
            "uint4b8 (code + 8, low nibble first) on this vLLM; serve with quantmint's torch runtime"
        )
    return True


@register_weight_loader_v2_supported_method
class W4A16LinearMethod(LinearMethodBase):
    """4-bit weights (symmetric, codes in [-7, 7]; or with `zero_points`, asymmetric: codes in [0, 15] and
    `weight_zero_point` int32 [ceil(out / 8), groups] packed along the output) per output channel or in
    groups of `group_size` input columns, float activations, served by the kernel vLLM selects for
    mixed-precision linears (`choose_mp_linear_kernel`): on CPU its CPUWNA16 kernel, on CUDA Machete or
    Marlin.

    The parameters are those of compressed-tensors' pack-quantized layers, which quantmint's checkpoint
    tensors already are: `weight_packed` int32 [out, in / 8] (packed along the input), `weight_scale`
    [out, groups] (per channel: [out, 1]) and `weight_shape` [2]. They load as vLLM loads them for a
    compressed-tensors checkpoint, fused layers and tensor-parallel shards included. vLLM's GPT2 transposes
    only tensors named `.weight`, so the 4-bit tensors of its Conv1D layers arrive as stored ([out, in]).
    """

    def __init__(self, group_size: int | None, layer_name: str, zero_points: bool = False) -> None:
        self.group_size = group_size
        self.layer_name = layer_name
        self.zero_points = zero_points
        self.before_processing: Callable[[], None] = lambda: None
        self.kernel: Any = None

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
        weight_loader = extra_weight_attrs["weight_loader"]
        out = sum(output_partition_sizes)
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = out
        kernel_type, config = w4a16_kernel_for(
            self.layer_name, input_size, output_size, input_size_per_partition, out, self.group_size,
            params_dtype, self.zero_points,
        )  # fmt: skip
        layer.quantmint_in_features = input_size_per_partition
        if vllm_w4a16_kernel_runs(kernel_type, self.group_size, params_dtype, self.zero_points):
            logger.info_once(
                f"quantmint W4A16: {params_dtype} layers run vLLM's {kernel_type.__name__} "
                "(choose_mp_linear_kernel, vLLM's mixed-precision kernel selection)"
            )
        else:
            kernel_type = None
        weight = PackedvLLMParameter(
            data=torch.empty(out, -(-input_size_per_partition // 8), dtype=torch.int32),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=8,
            weight_loader=weight_loader,
        )
        if self.group_size is None:  # one scale per output row, whichever way the layer is split
            scale: BasevLLMParameter = ChannelQuantScaleParameter(
                data=torch.empty(out, 1, dtype=params_dtype), output_dim=0, weight_loader=weight_loader
            )
        else:
            scale = GroupQuantScaleParameter(
                data=torch.empty(out, input_size_per_partition // self.group_size, dtype=params_dtype),
                input_dim=1,
                output_dim=0,
                weight_loader=weight_loader,
            )
        shape = BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader)
        layer.register_parameter("weight_packed", weight)
        layer.register_parameter("weight_scale", scale)
        layer.register_parameter("weight_shape", shape)
        if self.zero_points:  # as vLLM's compressed-tensors WNA16 scheme declares weight_zero_point
            zp_data = torch.zeros(-(-out // 8), scale.data.shape[1], dtype=torch.int32)
            if self.group_size is None:
                zero_point: BasevLLMParameter = PackedColumnParameter(
                    data=zp_data, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=weight_loader
                )
            else:
                zero_point = PackedvLLMParameter(
                    data=zp_data,
                    input_dim=1,
                    output_dim=0,
                    packed_dim=0,
                    packed_factor=8,
                    weight_loader=weight_loader,
                )
            layer.register_parameter("weight_zero_point", zero_point)
        if kernel_type is not None:
            self.kernel = kernel_type(config, **_w4_param_names())

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.before_processing()
        if self.kernel is not None:
            layer.quantmint_kernel = f"vLLM {_process_w4_layer(self.kernel, layer)}"
            return
        layer.quantmint_kernel = "quantmint int4 matmul"
        # quantmint's int4 matmul: the packed words as loaded, float32 scales [out, groups]
        replace_parameter(layer, "weight_packed", layer.weight_packed.data.contiguous())
        replace_parameter(layer, "weight_scale", layer.weight_scale.data.float().contiguous())
        if self.zero_points:
            replace_parameter(layer, "weight_zero_point", layer.weight_zero_point.data.contiguous())

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        return int4_linear(
            x, layer.weight_packed, layer.weight_scale, layer.quantmint_in_features, False, None, bias,
            self.group_size, layer.weight_zero_point if self.zero_points else None,
        )  # fmt: skip


# ---------------------------------------------------------------- timing, for benchmarks
def _time_applies(prefix: str) -> None:
    """Time every quantmint linear's `apply` in this process and write {"Method[kernel]:rows x out x in":
    [calls, seconds]} to PREFIX-PID.json at exit: where a served model's time goes, per layer shape and
    the kernel that ran it (`layer.quantmint_kernel`, set when its weights are processed: e.g. W8A8's
    "vLLM <its kernel>" where the exactness probe passed, "quantmint int32 matmul" where it did not)
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
            kernel = getattr(layer, "quantmint_kernel", "?")
            shape = f"{rows}x{y.shape[-1]}x{x.shape[-1]}"
            entry = stats.setdefault(f"{cls.__name__}[{kernel}]:{shape}", [0, 0.0])
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
    timed(W4A16LinearMethod)
    atexit.register(dump)


if os.environ.get("QUANTMINT_VLLM_TIME_LINEARS"):
    _time_applies(os.environ["QUANTMINT_VLLM_TIME_LINEARS"])
