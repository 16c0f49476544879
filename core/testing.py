"""Tools for plugin authors: check that a model family fits a model (`check_family`).

`quantmint check-family MODEL_DIR` runs the same checks and prints one line per check.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FamilyCheck", "check_family"]


@dataclass(frozen=True)
class FamilyCheck:
    """One check's result: `status` is "ok", "fail" or "skip"; `detail` says what was found or why."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


def _output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _random_ids(model: nn.Module, tokens: int = 8) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))


def _kv_check(model: nn.Module, layout: Any) -> FamilyCheck:
    from quantmint.algorithms.kv_cache import KVObserver, attention_module_name, kv_features

    kv = layout.family.kv
    if kv is None:
        return FamilyCheck("kv capture", "skip", "the family declares no K/V projections (no C8)")
    block = layout.blocks[0]
    observer = KVObserver(block, kv)  # exactly what C8 calibration attaches
    try:
        _output(model, _random_ids(model))
    finally:
        observer.remove()
    attention = f"{block.name}.{attention_module_name(kv)}"
    if observer.cached:
        k, v = observer.absmax()
        expected = kv_features(getattr(model, "config", None))
        if expected is not None and (k.numel() != expected or v.numel() != expected):
            return FamilyCheck(
                "kv capture",
                "fail",
                f"{block.name} caches {k.numel()} key / {v.numel()} value channels per token, not "
                f"kv_heads x head_dim = {expected} as its config says",
            )
        return FamilyCheck(
            "kv capture",
            "ok",
            f"{block.name} hands its K/V to the cache ({k.numel()} channels per token, after any rotary "
            f"embedding); C8 observes them there and stores the scales on {attention}",
        )
    if observer.k_absmax is None or observer.v_absmax is None:
        return FamilyCheck(
            "kv capture", "fail", f"{block.name}: neither a cache nor {kv.key!r} / {kv.value!r} saw K/V"
        )
    width = observer.k_absmax.numel()
    return FamilyCheck(
        "kv capture",
        "ok",
        f"{block.name} caches no K/V (an encoder): C8 reads {width} channels each at the declared "
        f"{kv.key!r} / {kv.value!r}{' ([q | k | v] thirds)' if kv.fused else ''}, scales on {attention}",
    )


def _round_trip(model: nn.Module, family: str) -> FamilyCheck:
    from quantmint import load_quantized, quantize, save_quantized

    quantized = quantize(copy.deepcopy(model), "w8a16", family=family)
    ids = _random_ids(model)
    expected = _output(quantized, ids)
    with tempfile.TemporaryDirectory(prefix="quantmint-check-") as tmp:
        out = save_quantized(quantized, Path(tmp) / "w8a16")
        loaded = load_quantized(out)
        got = _output(loaded, ids)
    if not torch.equal(expected, got):
        moved = float((expected.float() - got.float()).abs().max())
        return FamilyCheck("save/load w8a16", "fail", f"loaded outputs differ by up to {moved:.3g}")
    return FamilyCheck(
        "save/load w8a16", "ok", "outputs of the loaded checkpoint equal the in-memory model's"
    )


def check_family(model: nn.Module | str | os.PathLike[str], family: str | None = None) -> list[FamilyCheck]:
    """Check that a family fits a model: resolve its layout (paths, smoothing-pair shapes and exactness),
    capture K/V, and round-trip a w8a16 quantization through save and load. `model` is a float model or
    its directory; it is not changed. Returns one `FamilyCheck` per check (stops after a failed resolve).
    """
    from quantmint.errors import QuantmintError
    from quantmint.extension import registry
    from quantmint.extension.family import _EXACT_CHECKED, resolve_layout

    if not isinstance(model, nn.Module):
        from quantmint.io.models import load_float_model

        model = load_float_model(model)
    results = []
    try:
        fam = registry.find_family(model, family)
        _EXACT_CHECKED.clear()  # check again, not from the cache
        layout = resolve_layout(model, fam)
    except QuantmintError as exc:
        return [FamilyCheck("resolve", "fail", str(exc))]
    pairs = len(fam.smooth_pairs)
    results.append(
        FamilyCheck(
            "resolve",
            "ok",
            f"family {fam.name!r}: {len(layout.blocks)} blocks, {len(fam.linears)} linears per block, "
            f"every declared path found; {pairs} smoothing pair(s) match in shape and are exact",
        )
    )
    try:
        results.append(_kv_check(model, layout))
    except Exception as exc:  # reported, not raised: the other checks still run
        results.append(FamilyCheck("kv capture", "fail", f"{type(exc).__name__}: {exc}"))
    try:
        results.append(_round_trip(model, fam.name))
    except Exception as exc:
        results.append(FamilyCheck("save/load w8a16", "fail", f"{type(exc).__name__}: {exc}"))
    results.append(FamilyCheck("vllm round trip", "skip", "not implemented by check-family yet"))
    return results
