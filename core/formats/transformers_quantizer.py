"""`transformers.AutoModel*.from_pretrained` on a quantmint checkpoint (`quant_method: quantmint`).

Registered by `quantmint.formats.transformers_hook` when `import quantmint` has run. The quantizer reuses
`load_quantized`'s steps, so a checkpoint loads through either door into the same int8 model, with the
same checks:

- `preprocess_model` (the model is a skeleton on `meta`): `verify_checkpoint` (manifest, sha256 of
  config.json and of every shard, the `quantization_config` block against its schema), the requested
  class and dtype against the saved ones, then `convert_skeleton` swaps in the empty int8 cells and
  refuses a block whose modules its family does not select.
- transformers then reads the shards into those cells (names and dtypes match the checkpoint's).
- `postprocess_model`: `load_tensors` reads the shards again through quantmint's reader and assigns
  every tensor (values, shapes, dtypes, aliases checked), so what the model holds is what
  `load_quantized` would give, whatever transformers did; a C8 model's `generate()` defaults to the
  runtime's int8 KV cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantmint.errors import CheckpointError, ConfigError, NotSupportedError
from quantmint.extension import registry
from quantmint.formats.checkpoint import (
    checkpoint_dtype,
    convert_skeleton,
    load_tensors,
    read_model_config,
    verify_checkpoint,
)
from quantmint.formats.checkpoint_format import QUANT_METHOD, CheckpointManifest, QuantizationConfigBlock
from quantmint.formats.hf import refuse_custom_code

__all__ = ["QuantmintConfig", "QuantmintHfQuantizer", "int8_cache_by_default", "register"]


class QuantmintConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` block as transformers holds it: the keys as written, so
    `to_dict()` gives the block back. quantmint never reads it from here: the quantizer parses the
    block from the checkpoint's config.json itself, after checking that file's sha256."""

    def __init__(self, **block: Any) -> None:
        self.__dict__.update(block)
        self.quant_method = QUANT_METHOD


def _device_of(device_map: Any) -> torch.device | None:
    """The one device a `device_map` names (None: none given), or ConfigError: a quantmint checkpoint
    loads whole onto one device."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values()}
        if len(devices) == 1:
            device_map = devices.pop()
        else:
            raise ConfigError(
                f"device_map {device_map!r} spreads the model over {sorted(devices)}: a quantmint checkpoint "
                "loads onto one device; pass device_map='cpu' (or one device such as 'cuda:0')"
            )
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device_map {device_map!r} is not one device: a quantmint checkpoint loads whole onto one "
            "device; pass device_map='cpu' (or one device such as 'cuda:0'), or none"
        ) from None


class QuantmintHfQuantizer(HfQuantizer):
    """Loads a quantmint checkpoint for `from_pretrained` with `load_quantized`'s steps (module doc)."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ConfigError(
                "from_pretrained(quantization_config=QuantmintConfig(...)) on a float model: quantmint does "
                "not quantize while loading; run quantmint.quantize(model, preset) and "
                "quantmint.save_quantized (or `quantmint quantize`), then from_pretrained the checkpoint"
            )
        self.device: torch.device | None = None
        self._checkpoint: tuple[Path, QuantizationConfigBlock, CheckpointManifest] | None = None

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        self.device = _device_of(device_map)
        if self.device is None or self.device.type == "cpu":
            return
        config = self.quantization_config
        modules = getattr(config, "modules", None)  # checked against its schema later, with the files
        schemes = {s for s in modules.values() if isinstance(s, str)} if isinstance(modules, dict) else set()
        try:
            for scheme in sorted(schemes):
                registry.cell_class(scheme, self.device)
            if getattr(config, "kv_cache_modules", None):
                registry.kv_cache_class(self.device)
        except NotSupportedError as exc:
            raise NotSupportedError(f"device_map puts the model on {str(self.device)!r}: {exc}") from None

    def update_device_map(self, device_map: Any) -> Any:
        # transformers places what it reads on this device; the model is moved there after loading too.
        return None if device_map is None else {"": str(self.device)}

    def preprocess_model(self, model: nn.Module, dtype: Any = None, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        if not files or not str(files[0]).endswith(".safetensors"):
            raise CheckpointError(
                f"a quantmint checkpoint is read from its safetensors shards, and transformers found {files}"
            )
        path = Path(files[0]).parent
        refuse_custom_code(path, CheckpointError)
        block, manifest = verify_checkpoint(path, verify=True, read_tensors=False)
        config = read_model_config(path)
        saved = config.architectures[0]
        if type(model).__name__ != saved:
            raise ConfigError(
                f"{path} holds a quantized {saved}, and from_pretrained was asked for a "
                f"{type(model).__name__}: quantmint rebuilds the class it quantized; load it with "
                f"transformers.{saved}.from_pretrained (or the Auto class that maps to it)"
            )
        saved_dtype = checkpoint_dtype(path, config)
        if isinstance(dtype, torch.dtype) and dtype != saved_dtype:
            raise ConfigError(
                f"dtype {dtype} asked for, and {path} was saved in {saved_dtype}: a quantmint checkpoint "
                "loads in its own dtype (as quantmint.load_quantized); drop dtype= (or pass 'auto' or "
                f"{saved_dtype})"
            )
        self._checkpoint = (path, block, manifest)
        super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        assert self._checkpoint is not None
        path, block, _ = self._checkpoint
        convert_skeleton(model, block, path)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        assert self._checkpoint is not None
        path, block, manifest = self._checkpoint
        load_tensors(model, block, manifest, path)
        if self.device is not None:
            model.to(self.device)
        if block.kv_cache_modules:
            int8_cache_by_default(model)
        return model

    def is_serializable(self) -> bool:
        # save_pretrained would write transformers' view of the model; quantmint.save_quantized writes
        # the checkpoint with its manifest.
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def int8_cache_by_default(model: nn.Module) -> None:
    """Make `model.generate()` use the runtime's int8 KV cache (`registry.kv_cache_class`) unless the
    caller passes a cache, a `cache_implementation` or `use_cache=False`."""
    device = next(model.parameters()).device
    cache_class = registry.kv_cache_class(device)
    prepare = model._prepare_cache_for_generation

    def prepare_int8_cache(
        generation_config: Any, model_kwargs: dict[str, Any], *args: Any, **kw: Any
    ) -> Any:
        ours = None
        if (
            model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            ours = model_kwargs["past_key_values"] = cache_class.for_model(model)
        result = prepare(generation_config, model_kwargs, *args, **kw)
        if ours is not None:
            ours._is_user_defined = False  # returned only with return_dict_in_generate, as a default cache
        return result

    model._prepare_cache_for_generation = prepare_int8_cache


def register() -> None:
    """Register the config and quantizer with transformers under `quant_method: quantmint` (once)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(QuantmintConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(QuantmintHfQuantizer)


register()  # when imported directly, before transformers' quantizer table (see transformers_hook)
