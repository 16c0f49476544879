"""The `quantmint` quantization method for vLLM: reads a quantmint checkpoint's `quantization_config`.

vLLM names layers its own way: it fuses q/k/v and gate/up into one layer (`qkv_proj`, `gate_up_proj`,
BERT's `query`/`key`/`value` into `qkv_proj`), may nest the model under another root (`model.` for a
BERT embedding model), and a model class that renames checkpoint weights (vLLM's Transformers modeling
backend, for every architecture vLLM has no class of its own for: `gpt_neox.layers.0...` becomes
`model.layers.0...`) hands its weight-name mapping to the quantization config (`apply_vllm_mapper`).
The checkpoint's module names (quantized, rotated, KV-cached) are first mapped through it. A vLLM layer
is then matched to them by applying the family's declared renames (`ServingNeeds.engine_module_names`
for engine `vllm`), expanding a fused name through the model's `packed_modules_mapping`, then by whole
dotted components, the checkpoint's name being a suffix of vLLM's or the other way round. What else this
reads from the family's `ServingNeeds`: which linears vLLM transposes on load (`transposed_linears`).

Every quantized checkpoint module must be matched by a vLLM layer: once vLLM has built the model and
starts loading weights (or, for a model whose loader never asks, when the first layer is processed
after loading), a module no layer asked for is refused in one line naming its checkpoint name and the
name it was looked for as, instead of vLLM loading int8 tensors into a float layer and failing on a
parameter it does not have.
"""

from __future__ import annotations

import os
from typing import Any

import regex as re
import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.models.utils import WeightsMapper

from quantmint.backends.vllm import KV_CACHE_ENV, SUPPORTED_VLLM
from quantmint.backends.vllm.kv_cache import FP8_KV_CACHE_SCHEME, QuantmintKVCacheMethod
from quantmint.backends.vllm.linear import W4A16LinearMethod, W8A8LinearMethod, W8A16LinearMethod
from quantmint.errors import CheckpointError, UnknownModelFamilyError
from quantmint.extension import registry
from quantmint.formats.checkpoint_format import QUANT_METHOD, QuantizationConfigBlock

logger = init_logger(f"vllm.{__name__}")  # under vLLM's "vllm" logger, whose handler prints info lines

ENGINE = "vllm"
"""The engine name under which a family declares its layer renames (`EngineRename.engine`)."""


class QuantmintConfigError(CheckpointError, ValueError):
    """A checkpoint's quantization_config vLLM cannot use: a `CheckpointError` (one line), and the
    ValueError vLLM expects from a quantization config."""


def _check_vllm_version() -> None:
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM + "."):
        logger.warning(
            "quantmint's vLLM backend is tested with vLLM %s.x; this is vLLM %s. If loading fails, install "
            "the tested release: pip install 'quantmint[vllm]'",
            SUPPORTED_VLLM,
            vllm.__version__,
        )


def _components(name: str) -> tuple[str, ...]:
    return tuple(part for part in name.split(".") if part)


def _suffix_match(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether one dotted name is a whole-component suffix of the other."""
    n = min(len(a), len(b))
    return n > 0 and a[-n:] == b[-n:]


SERVED_SCHEMES = ("w8a8", "w8a16", "w4a16")
_TORCH_RUNTIME = "quantmint's torch runtime (quantmint.load_quantized, quantmint eval)"


def _refuse_unserved(scheme: str, schemes: set[str], strategy: str) -> None:
    """Refuse, in one line with the alternative, a checkpoint with layers no vLLM kernel of ours serves."""
    if "w4a8" in schemes:
        raise ValueError(
            f"this quantmint checkpoint ({scheme}) has w4a8 layers (4-bit weights, int8 activations), which "
            "quantmint's vLLM backend does not serve: vLLM's int4 x int8 kernels take other layouts. "
            "Requantize as w4a16 (4-bit weights, float activations: served with vLLM's mixed-precision "
            f"kernels) or w8a8, or run this one with {_TORCH_RUNTIME}"
        )
    unserved = sorted(schemes - set(SERVED_SCHEMES))
    if unserved:
        raise ValueError(
            f"this quantmint checkpoint ({scheme}) has schemes {', '.join(unserved)}, which quantmint's "
            f"vLLM backend does not serve (it serves {', '.join(SERVED_SCHEMES)}); run it with "
            f"{_TORCH_RUNTIME}"
        )
    four_bit = "w4a16" in schemes
    if four_bit and strategy not in ("channel", "group"):
        raise ValueError(
            f"this quantmint checkpoint ({scheme}) has 4-bit weights with one scale per {strategy}, which "
            "vLLM's mixed-precision kernels do not take (they take a scale per channel or per group): "
            f"requantize with weights.strategy channel or group, or run it with {_TORCH_RUNTIME}"
        )
    if not four_bit and strategy == "group":
        raise ValueError(
            f"this quantmint checkpoint ({scheme}) has grouped int8 weight scales, which quantmint's vLLM "
            f"backend does not serve (int8 weights per channel); run it with {_TORCH_RUNTIME}"
        )


@register_quantization_config(QUANT_METHOD)
class QuantmintConfig(QuantizationConfig):
    """A quantmint checkpoint as vLLM sees it: which layer is W8A8, W8A16, W4A16 or float (a method per
    layer, so mixed checkpoints serve), and the KV cache."""

    def __init__(self, block: QuantizationConfigBlock) -> None:
        super().__init__()
        self.family: str = block.family
        try:  # the family's declaration says how vLLM reads its layers
            serving = registry.family_named(block.family).serving
        except UnknownModelFamilyError as exc:
            raise QuantmintConfigError(f"this quantmint checkpoint: {exc}") from None
        self._renames = [(re.compile(r.pattern), r.replacement) for r in serving.renames(ENGINE)]
        self._transposed = [_components(name) for name in serving.transposed_linears]
        self.scheme: str = block.scheme
        self.modules: dict[str, str] = dict(block.modules)  # keyed by vLLM-side names once mapped
        self.kv_cache_modules: list[str] = list(block.kv_cache_modules)
        self.kv_checkpoint_names: dict[str, str] = {name: name for name in self.kv_cache_modules}
        self.rotated_modules: list[str] = list(block.rotated_modules)
        # vLLM-side name -> the checkpoint's own name (equal until a model's mapper renames it)
        self.checkpoint_names: dict[str, str] = {name: name for name in self.modules}
        self._served: set[str] = set()  # vLLM-side names of the modules some vLLM layer asked for
        self._served_checked = False
        self._reindex()
        self.static_input = not block.config.activations.dynamic
        weights = block.config.weights
        self.group_size: int | None = weights.group_size if weights.strategy == "group" else None
        self.zero_points = not weights.symmetric  # asymmetric 4-bit weights: `weight_zero_point` tensors
        _refuse_unserved(self.scheme, set(self.modules.values()), weights.strategy)
        self.float_kv_cache = bool(self.kv_cache_modules) and os.environ.get(KV_CACHE_ENV, "") == "float"
        # C8: vLLM keeps no int8 cache; its fp8 cache (same byte per element) takes the calibrated ranges
        # as per-tensor scales, and is what vLLM picks for `--kv-cache-dtype auto` (see kv_cache.py).
        self.kv_cache_scheme: dict[str, Any] | None = None
        if self.kv_cache_modules and not self.float_kv_cache:
            self.kv_cache_scheme = dict(FP8_KV_CACHE_SCHEME)
        self._attention_prefixes: list[str] = []  # vLLM attention layers given the C8 scale method
        if self.float_kv_cache:
            logger.warning(
                "%s=float: serving the C8 checkpoint's KV cache in float; its K/V scales are ignored",
                KV_CACHE_ENV,
            )

    # ------------------------------------------------------------------ vLLM's interface

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # int8 tensor cores (Turing); vLLM checks it on CUDA only

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantmintConfig:
        _check_vllm_version()
        # The one parser of the format: identity, version, every field's type, the PTQConfig.
        return cls(QuantizationConfigBlock.from_block(config, "the checkpoint", QuantmintConfigError))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, Attention):
            if self.kv_cache_scheme is None:
                return None  # no C8 (or --kv-cache float): vLLM's own float cache
            self._attention_prefixes.append(prefix)
            return QuantmintKVCacheMethod(self, prefix)
        if not isinstance(layer, LinearBase):
            return None
        scheme = self.scheme_for(prefix)
        if scheme is None:
            return _FloatLinearMethod(self)
        transposed = self.is_transposed(prefix)
        rotate = self.is_rotated(prefix)
        method: W8A8LinearMethod | W8A16LinearMethod | W4A16LinearMethod
        if scheme == "w4a16":  # vLLM's own mixed-precision kernel selection
            if rotate:
                raise ValueError(
                    f"layer {prefix} is w4a16 with a Hadamard-rotated input, which quantmint's vLLM backend "
                    f"does not serve (vLLM's mixed-precision kernels take the input as it is): run it with "
                    f"{_TORCH_RUNTIME}, or quantize without algorithm_args.hadamard"
                )
            method = W4A16LinearMethod(self.group_size, prefix, zero_points=self.zero_points)
        elif scheme == "w8a8":
            method = W8A8LinearMethod(
                static_input=self.static_input, transposed=transposed, rotate_input=rotate
            )
        elif scheme == "w8a16":
            method = W8A16LinearMethod(transposed=transposed, rotate_input=rotate)
        else:
            raise ValueError(
                f"layer {prefix} is quantized with scheme {scheme!r}, which quantmint's vLLM backend does "
                "not serve (it serves w8a8, w8a16 and w4a16): serve it with quantmint's torch runtime"
            )
        method.before_processing = self.check_every_module_served
        return method

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        """Rename the checkpoint's module names as the model class renames its weights (vLLM calls this
        before it builds the layers; the Transformers backend's mapper moves a base-model prefix such as
        `gpt_neox.` to `model.`). A name the mapper drops keeps its own: it must still be served."""

        def mapped(name: str) -> str:
            new = hf_to_vllm_mapper.map_name(name)
            return name if new is None else new

        self.checkpoint_names = {mapped(name): original for name, original in self.checkpoint_names.items()}
        self.modules = {mapped(name): scheme for name, scheme in self.modules.items()}
        self.kv_checkpoint_names = {
            mapped(name): self.kv_checkpoint_names.get(name, name) for name in self.kv_cache_modules
        }
        self.kv_cache_modules = [mapped(name) for name in self.kv_cache_modules]
        self.rotated_modules = [mapped(name) for name in self.rotated_modules]
        self._reindex()

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:  # type: ignore[override]
        """Called as vLLM starts loading weights, after it built every layer: refuse a quantized module
        no layer asked for before its int8 tensors reach a float layer."""
        self.check_every_module_served()
        return super().get_checkpoint_weight_mapper()

    def get_cache_scale_mapper(self) -> WeightsMapper:  # type: ignore[override]
        """C8: each attention module's `k_scale` / `v_scale` to the vLLM attention layer inside it
        (`model.layers.0.self_attn.k_scale` -> `...self_attn.attn.k_scale`; GPT-2's `h.0.attn.k_scale` ->
        `h.0.attn.attn.k_scale`, which vLLM's default mapping leaves alone). Dropped when opted out."""
        mapper = super().get_cache_scale_mapper()
        if self.float_kv_cache:
            drop = {re.compile(r"\.[kv]_scale$"): None}
            return WeightsMapper(orig_to_new_regex=drop) | mapper
        moves: dict[re.Pattern[str], str] = {}
        for name in self.kv_cache_modules:
            inside = [p for p in self._attention_prefixes if p.startswith(name + ".")]
            if len(inside) != 1:
                continue  # no vLLM attention layer under it: its layer, if any, reports the scales missing
            for source in {name, self.kv_checkpoint_names.get(name, name)}:
                moves[re.compile(rf"^{re.escape(source)}\.([kv])_scale$")] = rf"{inside[0]}.\1_scale"
        return WeightsMapper(orig_to_new_regex=moves) | mapper

    # ------------------------------------------------------------------ layer lookup

    def _reindex(self) -> None:
        self._index = [(_components(name), name, scheme) for name, scheme in self.modules.items()]
        self._rotated = [_components(name) for name in self.rotated_modules]

    def check_every_module_served(self) -> None:
        """Refuse, in one line, a quantized checkpoint module that no vLLM layer matched (once all layers
        are built). Skipped under pipeline parallelism, where each rank builds only its own layers."""
        if self._served_checked:
            return
        self._served_checked = True
        try:
            from vllm.distributed import get_pp_group

            if get_pp_group().world_size > 1:
                return
        except (AssertionError, ImportError):  # no distributed state: a single process
            pass
        unserved = [name for name in self.modules if name not in self._served]
        if not unserved:
            return
        shown = "; ".join(
            f"{self.checkpoint_names.get(name, name)!r} (looked for as {name!r})" for name in unserved[:3]
        )
        more = f" and {len(unserved) - 3} more" if len(unserved) > 3 else ""
        raise QuantmintConfigError(
            f"quantmint: {len(unserved)} quantized module(s) of this {self.family!r} checkpoint match no "
            f"linear layer of the vLLM model: {shown}{more}; vLLM would load their int8 weights into float "
            "layers. Check that vLLM runs this architecture with the layer names the family declares (a "
            f"name vLLM spells otherwise is declared in the family's ServingNeeds.engine_module_names), "
            "or leave these modules in float (--ignore)"
        )

    def _renamed(self, prefix: str) -> str:
        for pattern, replacement in self._renames:
            prefix = pattern.sub(replacement, prefix)
        return prefix

    def is_transposed(self, prefix: str) -> bool:
        """Whether vLLM transposes the weight of layer `prefix` on load (the family's `transposed_linears`:
        weights its own format stores [in, out], which quantmint's int8 cells already store [out, in])."""
        wanted = _components(self._renamed(prefix))
        return any(wanted[-len(parts) :] == parts for parts in self._transposed)

    def scheme_for(self, prefix: str) -> str | None:
        """The scheme of vLLM layer `prefix` (fused layers: every part's), or None when it stays float."""
        prefix = self._renamed(prefix)
        parent, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        names = [f"{parent}.{p}" if parent else p for p in parts] if parts else [prefix]
        schemes = {name: self._lookup(name) for name in names}
        found = set(schemes.values())
        if len(found) > 1:
            raise ValueError(
                f"vLLM fuses {', '.join(names)} into one layer {prefix}, but the checkpoint quantized them "
                f"differently ({schemes}): quantize or ignore all of them together (e.g. --ignore with a "
                "pattern that covers every one)"
            )
        return found.pop()

    def is_rotated(self, prefix: str) -> bool:
        """Whether the checkpoint rotated vLLM layer `prefix`'s input (never a fused layer's)."""
        wanted = _components(self._renamed(prefix))
        return any(_suffix_match(parts, wanted) for parts in self._rotated)

    def _lookup(self, name: str) -> str | None:
        wanted = _components(name)
        hits = [(full, scheme) for parts, full, scheme in self._index if _suffix_match(parts, wanted)]
        if len(hits) > 1:
            names = ", ".join(full for full, _ in hits)
            raise ValueError(f"vLLM layer {name} matches several checkpoint modules ({names})")
        if not hits:
            return None
        self._served.add(hits[0][0])
        return hits[0][1]


class _FloatLinearMethod(UnquantizedLinearMethod):
    """vLLM's float linear, which first checks that every quantized module found its layer (for model
    classes whose weight loading never asks the quantization config for a weight mapper)."""

    def __init__(self, config: QuantmintConfig) -> None:
        super().__init__()
        self._config = config

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._config.check_every_module_served()
        super().process_weights_after_loading(layer)
