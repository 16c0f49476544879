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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantmint import registry
from quantmint.algorithms.rtn import RoundToNearest
from quantmint.cells.base import QuantizedLinear
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.config import PTQConfig, get_preset
from quantmint.errors import ConfigError, NotSupportedError
from quantmint.family import ModelFamily, ModelLayout, resolve_layout
from quantmint.matching import matches_any

__all__ = ["PTQ", "QuantState", "quant_state", "quantize"]

STATE_ATTR = "_quantmint_state"


@dataclass
class QuantState:
    """What quantmint did to a model: kept on the model, written into the checkpoint's config."""

    config: PTQConfig
    family: str
    modules: dict[str, str] = field(default_factory=dict)  # module name -> scheme
    phase: str = "applied"  # "applied" (fake-quant) or "converted" (real int8 cells)


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
        self._check_supported()

    def _check_supported(self) -> None:
        missing = []
        if self.config.activation_dtype:
            missing.append("int8 activations (W8A8)")
        if self.config.outliers_suppression != "none":
            missing.append("outlier smoothing (SmoothQuant)")
        if self.config.kvcache_dtype:
            missing.append("int8 kv cache (C8)")
        if missing:
            raise NotSupportedError(
                f"this version of quantmint implements RTN weight-only quantization (preset w8a16); "
                f"{', '.join(missing)} requested by this config ({self.config.scheme_name}) are not "
                "available yet"
            )

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
    def apply(self, model: nn.Module) -> nn.Module:
        """Fake-quantize `model` in place (mode quantize) or give it empty int8 cells (mode deploy)."""
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
            self._build_empty_cells(model, layout, targets, state)
        else:
            rtn = RoundToNearest(self.config.weights)
            for name, module in tqdm(targets.items(), desc="RTN weights", unit="linear", disable=None):
                model.set_submodule(name, rtn.fake_quantize(module, layout.family.adapter, self.scheme))
                state.modules[name] = self.scheme
        setattr(model, STATE_ATTR, state)
        return model

    def _build_empty_cells(
        self, model: nn.Module, layout: ModelLayout, targets: dict[str, nn.Module], state: QuantState
    ) -> None:
        cell_cls = cell_class(self.scheme)
        adapter = layout.family.adapter
        scale_rows = None if self.config.weights.strategy == "channel" else 1
        for name, module in targets.items():
            weight = adapter.weight(module)
            out_features, in_features = weight.shape
            bias = adapter.bias(module)
            cell = cell_cls.empty(
                in_features,
                out_features,
                bias is not None,
                weight.dtype,
                (scale_rows or out_features, 1),
            )
            model.set_submodule(name, cell)
            state.modules[name] = self.scheme
        state.phase = "converted"

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
    model: nn.Module, config: PTQConfig | str | dict[str, Any] = "w8a16", family: str | None = None
) -> nn.Module:
    """Quantize a float model in place and return it with real int8 layers (apply, then convert).

    Args:
        model: a float transformers model that a registered model family handles.
        config: a `PTQConfig`, a preset name (`w8a16`, ...) or a mapping of config keys.
        family: force a model family by name instead of matching the model's class.
    """
    ptq = PTQ(as_config(config).with_updates(mode="quantize"), family=family)
    ptq.apply(model)
    return ptq.convert(model)
