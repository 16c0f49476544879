"""The PTQ algorithm: assembles algorithm modules from a `PTQConfig` and runs them in two phases.

- `apply` (mode `quantize`): calibrate and fake-quantize a float model in place; its outputs are those
  of the quantized model, so accuracy can be checked before converting.
- `apply` (mode `deploy`): rebuild the quantized structure with empty int8 cells, ready to be filled
  from a checkpoint (no float weights are needed).
- `convert`: swap every fake-quant layer for the real int8 cell that the runtime registered for its
  scheme.

`quantize(model, config)` does both phases and returns the converted model.
"""

from __future__ import annotations

import copy
import resource
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantmint import quant_math, registry
from quantmint.algorithms.rtn import RoundToNearest
from quantmint.algorithms.smooth_quant import SmoothQuant
from quantmint.calibration import BlockCall, run_sequential
from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.config import PTQConfig, get_preset
from quantmint.errors import ConfigError, NotSupportedError
from quantmint.family import BlockLayout, ModelFamily, ModelLayout, resolve_layout
from quantmint.kv_cache import KVObserver, attention_module_name
from quantmint.matching import matches_any
from quantmint.observers import InputObserver, attach_input_observers

__all__ = ["PTQ", "QuantState", "quant_state", "quantize"]

STATE_ATTR = "_quantmint_state"


@dataclass
class QuantState:
    """What quantmint did to a model: kept on the model, written into the checkpoint's config."""

    config: PTQConfig
    family: str
    modules: dict[str, str] = field(default_factory=dict)  # module name -> scheme
    phase: str = "applied"  # "applied" (fake-quant) or "converted" (real int8 cells)
    calibration: dict[str, Any] | None = None  # samples, tokens, seconds, peak RSS of calibration
    kv_modules: list[str] = field(default_factory=list)  # attention modules holding k_scale / v_scale


def quant_state(model: nn.Module) -> QuantState | None:
    """The `QuantState` of a model that quantmint quantized or loaded, else None."""
    return getattr(model, STATE_ATTR, None)


def as_config(config: PTQConfig | str | dict[str, Any]) -> PTQConfig:
    """Accept a config object, a preset name or a plain mapping."""
    if isinstance(config, PTQConfig):
        return config
    if isinstance(config, str):
        return get_preset(config)
    if isinstance(config, dict):
        return PTQConfig.from_dict(config)  # type: ignore[return-value]
    raise ConfigError(f"expected a PTQConfig, a preset name or a mapping, got {type(config).__name__}")


class PTQ:
    """Post-training quantization of one model, configured by a `PTQConfig`."""

    def __init__(self, config: PTQConfig | str | dict[str, Any], family: str | None = None) -> None:
        self.config = as_config(config)
        self.family_name = family

    @property
    def needs_calibration(self) -> bool:
        """Smoothing, static activation ranges and kv-cache scales are measured on calibration data."""
        act_static = bool(self.config.activation_dtype) and not self.config.activations.dynamic
        outlier_guard = bool(self.config.activation_dtype) and self.config.algorithm_args.w8a16_outlier_ratio
        return (
            self.config.outliers_suppression == "smooth"
            or act_static
            or bool(outlier_guard)
            or bool(self.config.kvcache_dtype)
        )

    def kv_attention_modules(self, layout: ModelLayout) -> dict[str, BlockLayout]:
        """Full names of the attention modules that get kv-cache scales (C8), with their blocks."""
        if not self.config.kvcache_dtype:
            return {}
        kv = layout.family.kv
        if kv is None:
            raise NotSupportedError(
                f"model family {layout.family.name!r} declares no K/V projections, so its kv cache cannot be "
                "quantized; use a preset without -c8"
            )
        return {f"{block.name}.{attention_module_name(kv)}": block for block in layout.blocks}

    # --- structure ----------------------------------------------------------------------------
    def layout(self, model: nn.Module) -> ModelLayout:
        family = registry.find_family(model, self.family_name)
        return resolve_layout(model, family)

    def ignore_patterns(self, family: ModelFamily) -> list[str]:
        return [*self.config.ignore, *family.default_ignore]

    def targets(self, layout: ModelLayout) -> dict[str, nn.Module]:
        """Linears this config quantizes: the family's linears minus the ignore list, by full name."""
        if not self.config.weight_dtype:
            return {}
        ignore = self.ignore_patterns(layout.family)
        return {name: m for name, m in layout.linears() if not matches_any(name, ignore)}

    @property
    def scheme(self) -> str:
        return "w8a8" if self.config.activation_dtype else "w8a16"

    # --- phases -------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(
        self,
        model: nn.Module,
        calibration: list[torch.Tensor] | None = None,
        batch_size: int = 8,
        schemes: dict[str, str] | None = None,
    ) -> nn.Module:
        """Fake-quantize `model` in place (mode quantize) or give it empty int8 cells (mode deploy).

        Args:
            calibration: 1-D int64 token tensors (see `quantmint.data.calibration_samples`); needed
                when the config smooths outliers or uses static activation ranges.
            batch_size: calibration samples per forward pass.
            schemes: deploy mode: the scheme of each module as saved (calibration may have kept some
                W8A8 linears at W8A16); others get the config's scheme.
        """
        if quant_state(model) is not None:
            raise ConfigError(
                "this model was already quantized by quantmint; start again from the float model"
            )
        layout = self.layout(model)
        targets = self.targets(layout)
        if not targets and self.config.weight_dtype:
            raise ConfigError(
                f"the ignore list {self.ignore_patterns(layout.family)} excludes every linear of "
                f"family {layout.family.name!r}: nothing is left to quantize"
            )
        state = QuantState(config=self.config, family=layout.family.name)
        if self.config.mode == "deploy":
            self._build_empty_cells(model, layout, targets, state, schemes or {})
            self._build_empty_kv_scales(model, layout, state)
        elif self.needs_calibration:
            if not calibration:
                raise ConfigError(
                    f"{self.config.scheme_name} with outliers_suppression="
                    f"{self.config.outliers_suppression!r}, activations.dynamic="
                    f"{self.config.activations.dynamic} and kvcache_dtype={self.config.kvcache_dtype} "
                    "needs calibration data: pass calibration="
                    "quantmint.data.calibration_samples(...) (CLI: --calib FILE)"
                )
            state.calibration = self._calibrate(model, layout, targets, calibration, batch_size, state)
        else:
            for name, module in tqdm(targets.items(), desc="RTN weights", unit="linear", disable=None):
                model.set_submodule(name, self._fake_linear(module, layout.family, None, None))
                state.modules[name] = self.scheme
        setattr(model, STATE_ATTR, state)
        return model

    def _fake_linear(
        self,
        module: nn.Module,
        family: ModelFamily,
        observer: InputObserver | None,
        smoothing: torch.Tensor | None,
    ) -> FakeQuantLinear:
        """The fake-quantized twin of one float linear (weights RTN, activations per config)."""
        scheme = self._scheme_for(observer)
        fake = RoundToNearest(self.config.weights).fake_quantize(module, family.adapter, scheme)
        if scheme == "w8a8":
            fake.quantize_input = True
            if not self.config.activations.dynamic:
                assert observer is not None
                amax = torch.tensor(observer.tensor_range(smoothing), dtype=torch.float32)
                fake.input_scale = quant_math.qparams_from_absmax(amax).reshape(1)
        return fake

    def _scheme_for(self, observer: InputObserver | None) -> str:
        """The config's scheme, or w8a16 for a W8A8 linear whose input has an outlier token (see
        `AlgorithmArgs.w8a16_outlier_ratio`). Linears that share an input decide alike."""
        ratio = self.config.algorithm_args.w8a16_outlier_ratio
        outlier = ratio is not None and observer is not None and observer.token_outlier_ratio() > ratio
        return "w8a16" if self.scheme == "w8a8" and outlier else self.scheme

    def _transform_block(
        self,
        block: BlockLayout,
        family: ModelFamily,
        observers: dict[str, InputObserver],
        targets: dict[str, nn.Module],
        smooth: SmoothQuant | None,
    ) -> dict[str, torch.Tensor]:
        """Smooth, then fake-quantize the targets of one block in place; returns the scales folded into
        `prev` outputs (see `SmoothQuant.smooth_block`)."""
        inputs, outputs = smooth.smooth_block(block, family, observers) if smooth else ({}, {})
        for name, module in block.linears.items():
            if name in targets:
                fake = self._fake_linear(module, family, observers.get(name), inputs.get(name))
                block.module.set_submodule(name[len(block.name) + 1 :], fake)
        return outputs

    def _search_alpha(
        self,
        block: BlockLayout,
        family: ModelFamily,
        observers: dict[str, InputObserver],
        targets: dict[str, nn.Module],
        calls: list[BlockCall],
        outputs: list[torch.Tensor],
        head_dim: int | None,
    ) -> tuple[float, dict[float, float]]:
        """The smoothing alpha of the grid whose quantized block output is closest (MSE) to the float one."""
        args = self.config.algorithm_args
        subset = range(min(len(calls), args.smooth_search_batches))
        losses = {}
        for alpha in args.smooth_alpha_grid:
            trial = copy.deepcopy(block.module)
            trial_layout = BlockLayout(
                index=block.index,
                name=block.name,
                module=trial,
                linears={n: trial.get_submodule(n[len(block.name) + 1 :]) for n in block.linears},
            )
            self._transform_block(trial_layout, family, observers, targets, SmoothQuant(alpha, head_dim))
            losses[alpha] = sum(
                float((calls[i].run(trial) - outputs[i]).float().pow(2).mean()) for i in subset
            )
        return min(losses, key=losses.__getitem__), losses

    def _calibrate(
        self,
        model: nn.Module,
        layout: ModelLayout,
        targets: dict[str, nn.Module],
        samples: list[torch.Tensor],
        batch_size: int,
        state: QuantState,
    ) -> dict[str, Any]:
        """Block by block: observe inputs, smooth, fake-quantize (see `quantmint.calibration`)."""
        family = layout.family
        head_dim = _head_dim(model)
        args = self.config.algorithm_args
        smoothing = self.config.outliers_suppression == "smooth"
        act = self.config.activations
        percentile = act.percentile if act.observer == "percentile" else None
        kv_modules = {block.name: name for name, block in self.kv_attention_modules(layout).items()}
        alphas: list[float] = []

        def attach(block: BlockLayout) -> tuple[dict[str, InputObserver], list[Any], KVObserver | None]:
            # Observe every family linear of the block: smoothing needs them even when one is ignored.
            observers, handles = attach_input_observers(block.linears, percentile)
            kv_observer = KVObserver(block, family.kv) if block.name in kv_modules else None
            return observers, handles, kv_observer

        def finish(
            block: BlockLayout, attached: Any, calls: list[BlockCall], outputs: list[torch.Tensor]
        ) -> bool:
            observers, handles, kv_observer = attached
            for handle in handles:
                handle.remove()
            if kv_observer is not None:
                kv_observer.remove()
            smooth = None
            if smoothing:
                alpha = args.smooth_alpha
                if args.smooth_alpha_grid:
                    alpha, _ = self._search_alpha(block, family, observers, targets, calls, outputs, head_dim)
                alphas.append(alpha)
                smooth = SmoothQuant(alpha, head_dim=head_dim)
            prev_scales = self._transform_block(block, family, observers, targets, smooth)
            for name in block.linears:
                if name in targets:
                    state.modules[name] = model.get_submodule(name).scheme
            if kv_observer is not None:
                v_divisor = prev_scales.get(f"{block.name}.{family.kv.value}")
                k_scale, v_scale = kv_observer.scales(self.config.kvcache.strategy, head_dim, v_divisor)
                attn = model.get_submodule(kv_modules[block.name])
                attn.register_buffer("k_scale", k_scale)
                attn.register_buffer("v_scale", v_scale)
                state.kv_modules.append(kv_modules[block.name])
            return False

        report = run_sequential(model, layout, samples, attach, finish, batch_size=batch_size)
        result: dict[str, Any] = {
            "samples": report.samples,
            "tokens": report.tokens,
            "seconds": report.seconds,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if alphas:
            result["smooth_alpha_per_block"] = alphas
        kept = sorted(n for n, scheme in state.modules.items() if scheme != self.scheme)
        if kept:
            result["kept_w8a16"] = kept
        return result

    def _build_empty_cells(
        self,
        model: nn.Module,
        layout: ModelLayout,
        targets: dict[str, nn.Module],
        state: QuantState,
        schemes: dict[str, str],
    ) -> None:
        adapter = layout.family.adapter
        scale_rows = None if self.config.weights.strategy == "channel" else 1
        for name, module in targets.items():
            scheme = schemes.get(name, self.scheme)
            weight = adapter.weight(module)
            out_features, in_features = weight.shape
            bias = adapter.bias(module)
            cell = cell_class(scheme).empty(
                in_features,
                out_features,
                bias is not None,
                weight.dtype,
                (scale_rows or out_features, 1),
                static_input=scheme == "w8a8" and not self.config.activations.dynamic,
            )
            model.set_submodule(name, cell)
            state.modules[name] = scheme
        state.phase = "converted"

    def _build_empty_kv_scales(self, model: nn.Module, layout: ModelLayout, state: QuantState) -> None:
        kv = layout.family.kv
        for name, block in self.kv_attention_modules(layout).items():
            key = block.module.get_submodule(kv.key)
            features = layout.family.adapter.weight(key).shape[0] // (3 if kv.fused else 1)
            strategy = self.config.kvcache.strategy
            size = {"channel": features, "head": features // _head_dim(model), "tensor": 1}[strategy]
            attn = model.get_submodule(name)
            attn.register_buffer("k_scale", torch.empty(size, dtype=torch.float32))
            attn.register_buffer("v_scale", torch.empty(size, dtype=torch.float32))
            state.kv_modules.append(name)

    @torch.no_grad()
    def convert(self, model: nn.Module) -> nn.Module:
        """Swap every `FakeQuantLinear` for the registered int8 cell of its scheme."""
        state = quant_state(model)
        if state is None:
            raise ConfigError("convert() needs a model that apply() has prepared; call apply(model) first")
        if state.phase == "converted":
            return model
        fakes = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
        for name, fake in tqdm(fakes, desc="convert to int8", unit="linear", disable=None):
            model.set_submodule(name, cell_class(fake.scheme).from_fake_quant(fake))
        state.phase = "converted"
        return model


def cell_class(scheme: str) -> type[QuantizedLinear]:
    cells = registry.cell_classes()
    if scheme not in cells:
        raise NotSupportedError(
            f"no int8 cell is registered for scheme {scheme!r} (registered: {sorted(cells) or 'none'}); "
            f"is the 'torch_runtime' plugin excluded by {registry.PLUGINS_ENV}?"
        )
    return cells[scheme]


def quantize(
    model: nn.Module,
    config: PTQConfig | str | dict[str, Any] = "w8a16",
    family: str | None = None,
    calibration: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Quantize a float model in place and return it with real int8 layers (apply, then convert).

    Args:
        model: a float transformers model that a registered model family handles.
        config: a `PTQConfig`, a preset name (`w8a16`, ...) or a mapping of config keys.
        family: force a model family by name instead of matching the model's class.
        calibration: token samples for configs that calibrate (SmoothQuant, static activations).
    """
    ptq = PTQ(as_config(config).with_updates(mode="quantize"), family=family)
    ptq.apply(model, calibration=calibration)
    return ptq.convert(model)


def _head_dim(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    return head_dim or (hidden // heads if hidden and heads else None)
