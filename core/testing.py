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


def _quantized_w8a16(model: nn.Module, family: str) -> nn.Module:
    from quantmint import quantize

    return quantize(copy.deepcopy(model), "w8a16", family=family)


def _round_trip(quantized: nn.Module, tmp: Path) -> FamilyCheck:
    from quantmint import load_quantized, save_quantized

    ids = _random_ids(quantized)
    expected = _output(quantized, ids)
    loaded = load_quantized(save_quantized(quantized, tmp / "w8a16"))
    got = _output(loaded, ids)
    if not torch.equal(expected, got):
        moved = float((expected.float() - got.float()).abs().max())
        return FamilyCheck("save/load w8a16", "fail", f"loaded outputs differ by up to {moved:.3g}")
    return FamilyCheck(
        "save/load w8a16", "ok", "outputs of the loaded checkpoint equal the in-memory model's"
    )


def _greedy(model: nn.Module, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
        out.append(y[0, x.shape[1] :].tolist())
    return out


VLLM_PROMPTS = 4
VLLM_TOKENS = 8


def _vllm_round_trip(model: nn.Module, tmp: Path) -> FamilyCheck:
    """Serve the saved w8a16 checkpoint with vLLM (a fresh process) and compare its greedy tokens with
    quantmint's torch runtime on the same prompts: every first token equal, and on average at least
    3/4 of each continuation before the first difference (kernels differ by float ulps, which may flip
    a near-tie later on)."""
    import importlib.util

    from quantmint import load_quantized

    name = "vllm round trip"
    if importlib.util.find_spec("vllm") is None:
        return FamilyCheck(name, "skip", "vLLM is not installed (pip install 'quantmint[vllm]')")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not hasattr(model, "generate"):
        return FamilyCheck(name, "skip", f"{type(model).__name__} does not generate")
    from quantmint.backends.vllm.offline import run_in_subprocess

    vocab = int(model.config.vocab_size)
    prompts = [[(7 * i + 13 * j + 1) % vocab for j in range(5 + 3 * i)] for i in range(VLLM_PROMPTS)]
    job = {
        "model": str(tmp / "w8a16"),
        "skip_tokenizer_init": True,
        "tasks": [{"kind": "generate", "prompts": prompts, "max_tokens": VLLM_TOKENS}],
    }
    out = run_in_subprocess(job, tmp)
    if "error" in out:
        return FamilyCheck(name, "fail", f"vLLM could not serve the w8a16 checkpoint: {out['error']}")
    got = out["results"][0]["value"]
    want = _greedy(load_quantized(tmp / "w8a16"), prompts, VLLM_TOKENS)
    same = []
    for g, w in zip(got, want, strict=True):
        first = next((i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), len(w))
        same.append(first / len(w))
    agreement = sum(same) / len(same)
    detail = (
        f"greedy tokens served by vLLM agree with quantmint's runtime on {agreement:.0%} of "
        f"{VLLM_TOKENS}-token continuations"
    )
    if min(same) == 0 or agreement < 0.75:
        return FamilyCheck(
            name,
            "fail",
            f"{detail} (first tokens: vLLM {[g[0] for g in got]}, quantmint {[w[0] for w in want]})",
        )
    return FamilyCheck(name, "ok", detail)


def check_family(
    model: nn.Module | str | os.PathLike[str], family: str | None = None, vllm: bool | None = None
) -> list[FamilyCheck]:
    """Check that a family fits a model: resolve its layout (paths, smoothing-pair shapes and exactness),
    capture K/V where C8 observes them, round-trip a w8a16 quantization through save and load, and serve
    that checkpoint with vLLM (`vllm`: None runs it when vLLM is installed, False skips it; it starts an
    engine in a fresh process, a minute or so). `model` is a float model or its directory; it is not
    changed. Returns one `FamilyCheck` per check (stops after a failed resolve).
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
    with tempfile.TemporaryDirectory(prefix="quantmint-check-") as tmp:
        saved = False
        try:
            result = _round_trip(_quantized_w8a16(model, fam.name), Path(tmp))
            saved = result.status == "ok"
        except Exception as exc:
            result = FamilyCheck("save/load w8a16", "fail", f"{type(exc).__name__}: {exc}")
        results.append(result)
        if vllm is False:
            results.append(FamilyCheck("vllm round trip", "skip", "not asked for"))
        elif not saved:
            results.append(FamilyCheck("vllm round trip", "skip", "no w8a16 checkpoint to serve"))
        else:
            try:
                results.append(_vllm_round_trip(model, Path(tmp)))
            except Exception as exc:
                results.append(FamilyCheck("vllm round trip", "fail", f"{type(exc).__name__}: {exc}"))
    return results
