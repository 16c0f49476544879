"""SmolLM2-135M served by vLLM, side by side in one run: float, native compressed-tensors W8A8 and W4A16,
and quantmint's W8A16, W8A8, W4A16 and W8A8-C8 through the quantmint plugin. Prints one JSON line.

Per variant (each in its own vLLM process, `enforce_eager`, on the CPU defaults of `quantmint serve`):
- `tok_s`: greedy decode throughput, `--prompts` prompts x `--tokens` new tokens (EOS ignored), all
  submitted at once, the median of `--repeats` runs in the same engine (`tok_s_runs`: each run; single
  runs of one variant moved by up to 15% between invocations on this machine); `start_s`: engine start;
- `ppl`: perplexity from vLLM's prompt log-probabilities over `--ppl-windows` independent 512-token
  windows of wikitext-2 test (the first token of each window is not scored), and for int8 variants
  `ppl_runtime`, the same windows through quantmint's own exact torch runtime (fp32), and
  `ppl_gap_pp = 100 * (ppl / ppl_runtime - 1)`;
- ratios to fp32, to bf16 and to native W8A8;
- `kv_bytes_per_token`: vLLM's KV cache space (`VLLM_CPU_KVCACHE_SPACE`) over the tokens vLLM says it
  holds (its "KV cache size: N tokens" line): the C8 variant's fp8 cache against the float ones. For C8,
  `ppl_runtime` is quantmint's runtime with its int8 KV cache and `ppl_runtime_float_cache` with a float
  one; `quantmint_w8a8c8_float_cache_*` serves the same checkpoint with `--kv-cache float`;
- with `--time-linears`, for the plugin's bf16 variants, `linears` from one more generation run with
  every quantmint linear's `apply` timed in vLLM's worker (`QUANTMINT_VLLM_TIME_LINEARS`):
  `decode_s` / `prefill_s` (calls of at most / more than `--prompts` rows), `kernel_s` (seconds per
  kernel that ran the layers: e.g. W8A8's vLLM kernel where its exactness probe passed, quantmint's
  int32 matmul where it did not) and `per_call_us` per kernel and rows x out x in shape. Native W8A8
  runs without the plugin; the plugin's W8A8 runs the same kernel.

Checkpoints: `--w8a8 DIR` / `--w8a16 DIR` / `--w4a16 DIR` / `--w8a8c8 DIR` reuse quantmint checkpoints;
otherwise they are made here (W8A16: RTN; W8A8 and W8A8-C8: the `w8a8` / `w8a8-c8` presets calibrated on
`--calib`, `w8a8` without its Hadamard rotation (`--no-hadamard`), whose compressed-tensors export the
native variant serves; a rotated `--w8a8 DIR` cannot be exported; W4A16: the `w4a16-gptq`
preset in groups of `--w4a16-group-size` (default 64: SmolLM2's 576 columns are not whole groups of 128,
which vLLM's 4-bit kernels need), calibrated on `--calib`). The native variants are the W8A8 and W4A16
checkpoints exported with `quantmint export --format compressed-tensors` (W4A16: pack-quantized),
served with `VLLM_PLUGINS=` empty. `--variants a,b` runs only those (fp32 and bf16 are always run: the
ratios need them).

    python benchmarks/vllm_serving.py --text ../shared/data/wikitext-2/test.txt \\
        --calib ../shared/data/wikitext-2/valid.txt [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    print(f"[vllm_serving] {msg}", file=sys.stderr, flush=True)


def windows(text_path: str, tokenizer: Any, n: int, length: int = 512) -> list[list[int]]:
    ids = tokenizer(Path(text_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return [ids[i * length : (i + 1) * length] for i in range(min(n, len(ids) // length))]


def ppl_from_logprobs(rows: list[list[float]]) -> float:
    total = sum(sum(r) for r in rows)
    count = sum(len(r) for r in rows)
    return math.exp(-total / count)


@torch.no_grad()
def runtime_ppl(path: Path, wins: list[list[int]], int8_cache: bool = False) -> float:
    """quantmint's runtime over `wins`; `int8_cache`: attention reads K/V through the C8 int8 cache."""
    from quantmint.io.models import load_model

    model = load_model(path)
    rows = []
    for w in wins:
        ids = torch.tensor([w])
        kwargs: dict[str, Any] = {}
        if int8_cache:
            from quantmint.backends.torch.kv_cache import Int8KVCache

            kwargs = {"past_key_values": Int8KVCache.for_model(model), "use_cache": True}
        logprobs = model(ids, **kwargs).logits[0, :-1].float().log_softmax(-1)
        rows.append(logprobs[torch.arange(len(w) - 1), ids[0, 1:]].tolist())
    return ppl_from_logprobs(rows)


def time_linears(
    model: Path, dtype: str, prompts: list[list[int]], args: argparse.Namespace, tmp: str, env: dict, run: Any
) -> dict[str, Any]:
    """One generation run with every quantmint linear's apply timed in the engine (see the docstring)."""
    prefix = Path(tmp) / f"linears-{time.monotonic_ns()}"
    job = {
        "model": str(model),
        "dtype": dtype,
        "max_model_len": 1024,
        "tasks": [{"kind": "generate", "prompts": prompts, "max_tokens": args.tokens}],
    }
    out = run(job, tmp, env={**env, "QUANTMINT_VLLM_TIME_LINEARS": str(prefix)})
    stats: dict[str, list[float]] = {}  # "kernel rows x out x in" -> [calls, seconds]
    for dump in Path(tmp).glob(f"{prefix.name}-*.json"):
        for key, (calls, seconds) in json.loads(dump.read_text()).items():
            method, shape = key.split(":", 1)  # "W8A8LinearMethod[vLLM ...]", "16x576x576"
            kernel = method.split("[", 1)[1].rstrip("]") if "[" in method else method
            entry = stats.setdefault(f"{kernel} {shape}", [0, 0.0])
            entry[0] += calls
            entry[1] += seconds
    rows = {key: int(key.rsplit(" ", 1)[1].split("x", 1)[0]) for key in stats}
    kernels: dict[str, float] = {}
    for key, (_, seconds) in stats.items():
        kernels[key.rsplit(" ", 1)[0]] = kernels.get(key.rsplit(" ", 1)[0], 0.0) + seconds

    def by_time(item: tuple[str, list[float]]) -> float:
        return -item[1][1]

    return {
        "error": out.get("error"),
        "decode_s": round(sum(s for k, (_, s) in stats.items() if rows[k] <= args.prompts), 3),
        "prefill_s": round(sum(s for k, (_, s) in stats.items() if rows[k] > args.prompts), 3),
        "kernel_s": {k: round(s, 3) for k, s in kernels.items()},
        "per_call_us": {k: round(s / n * 1e6, 1) for k, (n, s) in sorted(stats.items(), key=by_time)},
    }


def make_checkpoints(
    args: argparse.Namespace, source: str, work: Path
) -> tuple[Path | None, Path | None, Path | None, Path | None]:
    """The W8A16, W8A8, W4A16 and W8A8-C8 checkpoints: given, made here, or None when no variant wanted
    uses it."""
    from quantmint.algorithms.ptq import quantize
    from quantmint.config import get_preset
    from quantmint.formats.checkpoint import save_quantized
    from quantmint.io.data import calibration_samples
    from quantmint.io.models import load_float_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    w4a16 = get_preset("w4a16-gptq")
    w4a16 = w4a16.with_updates(weights={**w4a16.to_dict()["weights"], "group_size": args.w4a16_group_size})
    # W8A8 without the preset's rotation: the native variant serves its compressed-tensors export, which
    # cannot describe a rotated layer, and both W8A8 rows must serve the same weights.
    w8a8 = get_preset("w8a8")
    w8a8 = w8a8.with_updates(algorithm_args={**w8a8.algorithm_args.model_dump(), "hadamard": False})
    # scheme -> (config, what the log calls it, whether it calibrates)
    recipes: dict[str, tuple[Any, str, bool]] = {
        "w8a16": ("w8a16", "W8A16", False),
        "w8a8": (w8a8, "W8A8 (SmoothQuant preset, --no-hadamard)", True),
        "w4a16": (w4a16, f"W4A16 (GPTQ, groups of {args.w4a16_group_size})", True),
        "w8a8c8": ("w8a8-c8", "W8A8-C8 (SmoothQuant + int8 KV cache preset)", True),
    }
    made: dict[str, Path | None] = {}
    for scheme, (config, label, calibrates) in recipes.items():
        given = getattr(args, scheme)
        made[scheme] = Path(given) if given else None
        if made[scheme] is not None or not args.variants_wanted(scheme):
            continue
        if calibrates and not args.calib:
            raise SystemExit(f"--calib is needed to make the {label} checkpoint (or pass --{scheme} DIR)")
        log(f"quantizing {label}")
        samples = calibration_samples(args.calib, tokenizer, args.calib_samples, 512) if calibrates else None
        model = quantize(load_float_model(source), config, calibration=samples)
        made[scheme] = save_quantized(model, work / scheme, tokenizer=tokenizer)
    return made["w8a16"], made["w8a8"], made["w4a16"], made["w8a8c8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", required=True, help="wikitext-2 test.txt for perplexity")
    parser.add_argument("--calib", help="calibration text for the W8A8 checkpoint made here")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--w8a8", help="an existing quantmint W8A8 checkpoint of SmolLM2")
    parser.add_argument("--w8a16", help="an existing quantmint W8A16 checkpoint of SmolLM2")
    parser.add_argument("--w4a16", help="an existing quantmint W4A16 checkpoint of SmolLM2")
    parser.add_argument("--w8a8c8", help="an existing quantmint W8A8-C8 checkpoint of SmolLM2")
    parser.add_argument("--w4a16-group-size", type=int, default=64, help="group size of the W4A16 made here")
    parser.add_argument(
        "--variants", help="comma-separated variants to run besides fp32 and bf16 (default all)"
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="generation runs per variant (median)")
    parser.add_argument(
        "--quick", action="store_true", help="4 prompts x 16 tokens, 2 windows, 16 calib samples"
    )
    parser.add_argument("--time-linears", action="store_true", help="time the plugin's linears (see above)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.tokens, args.ppl_windows, args.calib_samples, args.repeats = 4, 16, 2, 16, 1
    wanted = None if not args.variants else {v.strip() for v in args.variants.split(",") if v.strip()}
    known = [
        f"{kind}_{scheme}_{dtype}"
        for scheme in ("w8a8", "w8a16", "w4a16")
        for kind in ("native", "quantmint")
        for dtype in ("bf16", "fp32")
        if not (kind == "native" and (dtype == "fp32" or scheme == "w8a16"))
    ] + ["quantmint_w8a8c8_bf16", "quantmint_w8a8c8_fp32", "quantmint_w8a8c8_float_cache_bf16"]
    if wanted is not None and wanted - set(known):
        raise SystemExit(f"--variants: unknown {sorted(wanted - set(known))}; choose from {', '.join(known)}")
    args.variants_wanted = lambda scheme: wanted is None or any(v.split("_")[1] == scheme for v in wanted)

    from quantmint.backends.vllm.offline import run_in_subprocess
    from quantmint.backends.vllm.serve import CPU_ENV_DEFAULTS
    from quantmint.formats.export import export_checkpoint
    from quantmint.io.models import load_tokenizer
    from quantmint.tools.example_models import example_model_dir

    source = example_model_dir("smollm2")
    tokenizer = load_tokenizer(source)
    with tempfile.TemporaryDirectory(prefix="quantmint-vllm-bench-") as tmp:
        work = Path(tmp)
        w8a16, w8a8, w4a16, w8a8c8 = make_checkpoints(args, source, work)
        native = export_checkpoint(w8a8, work / "w8a8-compressed-tensors") if w8a8 else None
        native4 = export_checkpoint(w4a16, work / "w4a16-compressed-tensors") if w4a16 else None
        wins = windows(args.text, tokenizer, args.ppl_windows)
        lines = [
            ln for ln in Path(args.text).read_text(encoding="utf-8").splitlines() if len(ln.split()) > 30
        ]
        prompts = [tokenizer(ln)["input_ids"][:32] for ln in lines[: args.prompts]]
        variants: list[tuple[str, Any, str, dict[str, str]]] = [
            ("fp32", source, "float32", {}),
            ("bf16", source, "bfloat16", {}),
        ]
        if w8a8 is not None:
            variants += [
                ("native_w8a8_bf16", native, "bfloat16", {"VLLM_PLUGINS": ""}),
                ("quantmint_w8a8_bf16", w8a8, "bfloat16", {}),
                ("quantmint_w8a8_fp32", w8a8, "float32", {}),
            ]
        if w8a16 is not None:
            variants += [
                ("quantmint_w8a16_bf16", w8a16, "bfloat16", {}),
                ("quantmint_w8a16_fp32", w8a16, "float32", {}),
            ]
        if w4a16 is not None:
            variants += [
                ("native_w4a16_bf16", native4, "bfloat16", {"VLLM_PLUGINS": ""}),
                ("quantmint_w4a16_bf16", w4a16, "bfloat16", {}),
                ("quantmint_w4a16_fp32", w4a16, "float32", {}),
            ]
        if w8a8c8 is not None:  # the fp8 cache by default; the same checkpoint with a float cache
            variants += [
                ("quantmint_w8a8c8_bf16", w8a8c8, "bfloat16", {}),
                ("quantmint_w8a8c8_fp32", w8a8c8, "float32", {}),
                (
                    "quantmint_w8a8c8_float_cache_bf16",
                    w8a8c8,
                    "bfloat16",
                    {"QUANTMINT_VLLM_KV_CACHE": "float"},
                ),
            ]
        if wanted is not None:
            variants = [v for v in variants if v[0] in ("fp32", "bf16") or v[0] in wanted]
        runtime: dict[str, float] = {}
        for ckpt, exported in ((w8a8, native), (w8a16, None), (w4a16, native4), (w8a8c8, None)):
            if ckpt is not None and any(v[1] in (ckpt, exported) for v in variants):
                runtime[str(ckpt)] = runtime_ppl(ckpt, wins, int8_cache=ckpt == w8a8c8)
                if exported is not None:
                    runtime[str(exported)] = runtime[str(ckpt)]
        float_cache = {str(w8a8c8): runtime_ppl(w8a8c8, wins)} if w8a8c8 is not None else {}
        kv_space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_ENV_DEFAULTS["VLLM_CPU_KVCACHE_SPACE"]))
        results: dict[str, Any] = {}
        for name, model, dtype, env in variants:
            log(f"{name}: starting vLLM")
            job = {
                "model": str(model),
                "dtype": dtype,
                "max_model_len": 1024,
                "tasks": [
                    *[{"kind": "generate", "prompts": prompts, "max_tokens": args.tokens}] * args.repeats,
                    {"kind": "prompt_logprobs", "prompts": wins},
                ],
            }
            out = run_in_subprocess(job, tmp, env=env)
            if "error" in out:
                results[name] = {"error": out["error"]}
                log(f"{name}: {out['error']}")
                continue
            *gens, lp = out["results"]
            speeds = [round(args.prompts * args.tokens / g["seconds"], 1) for g in gens]
            row: dict[str, Any] = {
                "dtype": dtype,
                "start_s": round(out["start_s"], 1),
                "tok_s": statistics.median(speeds),
                "tok_s_runs": speeds,
                "ppl": round(ppl_from_logprobs(lp["value"]), 4),
            }
            if str(model) in runtime:
                row["ppl_runtime"] = round(runtime[str(model)], 4)
                row["ppl_gap_pp"] = round(100 * (row["ppl"] / runtime[str(model)] - 1), 3)
            if str(model) in float_cache:
                row["ppl_runtime_float_cache"] = round(float_cache[str(model)], 4)
            if out.get("kv_cache_tokens"):
                row["kv_cache_tokens"] = out["kv_cache_tokens"]
                row["kv_bytes_per_token"] = round(kv_space * 2**30 / out["kv_cache_tokens"], 1)
            if args.time_linears and name.startswith("quantmint_") and dtype == "bfloat16":
                row["linears"] = time_linears(model, dtype, prompts, args, tmp, env, run_in_subprocess)
            results[name] = row
            log(f"{name}: {row}")
    base = results.get("fp32", {}).get("tok_s")
    bf16 = results.get("bf16", {}).get("tok_s")
    native_speed = results.get("native_w8a8_bf16", {}).get("tok_s")
    for row in results.values():
        if "tok_s" in row:
            row["speed_vs_fp32"] = round(row["tok_s"] / base, 3) if base else None
            row["speed_vs_bf16"] = round(row["tok_s"] / bf16, 3) if bf16 else None
            row["speed_vs_native_w8a8"] = round(row["tok_s"] / native_speed, 3) if native_speed else None
    report = {
        "benchmark": "vllm_serving",
        "model": "SmolLM2-135M-Instruct",
        "prompts": args.prompts,
        "new_tokens": args.tokens,
        "ppl_windows": len(wins),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "results": results,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
