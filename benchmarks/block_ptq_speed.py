"""Block PTQ speed: two `block_ptq` settings (old: AdaRound, 300 steps; new: given or the preset's).

Quantizes the model twice in this one process, with the same calibration samples and preset, once per
setting, and evaluates each on the same wikitext-2 test tokens. Prints ONE JSON line: per setting the
tuning time, steps per block, perplexity and its change vs float, and `speedup` (old tuning time / new).

`--blocks N` tunes only N transformer blocks, from `--first` (default 0); the others stay float
through the config's `ignore`. `seconds` and `minutes` are then those N blocks' tuning time, and
`minutes_all_blocks` extrapolates it to every block (x blocks / N); the perplexities are those of the
partly quantized model: comparable between the two settings and with the float figure, not with a
full run's.

    python benchmarks/block_ptq_speed.py --preset w8a8-ptq --hadamard --blocks 2 --samples 32 \\
        --eval-tokens 8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
# The presets before SignRound: AdaRound, 300 steps, a warm-up, every batch compared (w4a16-ptq now differs)
OLD = {
    "n_outer_loops": 300,
    "early_stop": False,
    "rounding_method": "adaround",
    "warmup_ratio": 0.1,
    "compare_batches": 0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: quantmint example-model smollm2)")
    p.add_argument("--preset", default="w8a8-ptq", help="a block PTQ preset (w8a8-ptq, w4a16-ptq, ...)")
    p.add_argument("--hadamard", action="store_true", help="rotate down_proj's input (W8A8 + rotation)")
    p.add_argument("--old", type=json.loads, default=OLD, help=f"block_ptq keys of the old run ({OLD})")
    p.add_argument(
        "--new", type=json.loads, default={}, help="block_ptq keys of the new run ({}: the preset's)"
    )
    p.add_argument("--blocks", type=int, default=None, help="tune only N blocks (default: all)")
    p.add_argument("--first", type=int, default=0, help="with --blocks: the first block tuned (default 0)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sample length (default 512)")
    p.add_argument("--calib", default=str(DATA / "valid.txt"), help="calibration text")
    p.add_argument("--eval-text", default=str(DATA / "test.txt"), help="perplexity text")
    p.add_argument("--eval-tokens", type=int, default=32768, help="perplexity tokens (default 32768)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window (default 512)")
    args = p.parse_args(argv)
    if args.first < 0:
        p.error(f"--first must be at least 0, got {args.first}")
    for name in ("blocks", "samples", "seq_len", "eval_tokens", "eval_seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def _config(
    args: argparse.Namespace, block_ptq: dict[str, Any], n_blocks: int, block_names: list[str]
) -> Any:
    from quantmint.config import get_preset

    config = get_preset(args.preset)
    if config.block_ptq is None:
        raise SystemExit(f"preset {args.preset!r} has no block PTQ")
    updates: dict[str, Any] = {"block_ptq": {**config.block_ptq.model_dump(), **block_ptq}}
    if args.hadamard:
        updates["algorithm_args"] = {**config.algorithm_args.model_dump(), "hadamard": True}
    tuned = _tuned(args, n_blocks)
    if len(tuned) < n_blocks:
        skipped = "|".join(name.replace(".", r"\.") for i, name in enumerate(block_names) if i not in tuned)
        updates["ignore"] = [*config.ignore, f"re:({skipped})\\..*"]
    return config.with_updates(**updates)


def _tuned(args: argparse.Namespace, n_blocks: int) -> range:
    """The indices of the blocks tuned: all, or `--blocks` of them from `--first`."""
    if args.blocks is None:
        return range(n_blocks)
    if args.first >= n_blocks:
        raise SystemExit(f"--first {args.first}: the model has {n_blocks} blocks")
    return range(args.first, min(args.first + args.blocks, n_blocks))


def run_one(
    args: argparse.Namespace, block_ptq: dict[str, Any], calib: list[torch.Tensor], tokenizer: Any, text: str
) -> dict[str, Any]:
    from quantmint.algorithms.ptq import PTQ, quant_state, quantize
    from quantmint.eval.perplexity import perplexity
    from quantmint.io.models import load_model

    model = load_model(args.model)
    names = [b.name for b in PTQ(args.preset).layout(model).blocks]
    n_blocks = len(names)
    config = _config(args, block_ptq, n_blocks, names)
    start = time.perf_counter()
    quantize(model, config, calibration=calib)
    total_s = time.perf_counter() - start
    state = quant_state(model)
    assert state is not None and state.calibration is not None
    log = state.calibration["block_ptq"]["blocks"]
    log = [e for e in log if e["block"] in _tuned(args, n_blocks)]
    tuned = len(log)
    tuned_s = sum(e["seconds"] for e in log)
    ppl = perplexity(model, tokenizer, text, max_tokens=args.eval_tokens, seq_len=args.eval_seq_len)["ppl"]
    return {
        "block_ptq": {key: getattr(config.block_ptq, key) for key in type(config.block_ptq).model_fields},
        "seconds": round(tuned_s, 2),
        "minutes": round(tuned_s / 60, 3),
        "minutes_all_blocks": round(tuned_s / 60 * n_blocks / tuned, 3),
        "quantize_minutes": round(total_s / 60, 3),
        "steps_per_block": [e.get("steps", config.block_ptq.n_outer_loops) for e in log],
        "kept": [e["kept"] for e in log],
        "mse_vs_rtn": [round(e["ptq_mse"] / e["rtn_mse"], 4) if e["rtn_mse"] else None for e in log],
        "checks": [e.get("checks") for e in log],  # early stop: held-out MSE / RTN's at each check
        "ppl": round(ppl, 4),
        "blocks_tuned": [e["block"] for e in log],
        "blocks": n_blocks,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from quantmint.eval.perplexity import perplexity, read_text
    from quantmint.io.data import calibration_samples
    from quantmint.io.models import load_model

    if args.model is None:
        from quantmint.tools.example_models import example_model_dir

        args.model = str(example_model_dir("smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calib = calibration_samples(args.calib, tokenizer, n_samples=args.samples, seq_len=args.seq_len)
    text = read_text(args.eval_text)
    float_ppl = perplexity(
        load_model(args.model), tokenizer, text, max_tokens=args.eval_tokens, seq_len=args.eval_seq_len
    )["ppl"]
    report: dict[str, Any] = {
        "benchmark": "block_ptq_speed",
        "model": Path(args.model).name,
        "preset": args.preset,
        "hadamard": args.hadamard,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "eval_tokens": args.eval_tokens,
        "threads": torch.get_num_threads(),
        "float_ppl": round(float_ppl, 4),
    }
    for name, keys in (("old", args.old), ("new", args.new)):
        result = run_one(args, keys, calib, tokenizer, text)
        result["ppl_delta_pct"] = round(100 * (result["ppl"] / float_ppl - 1), 3)
        report[name] = result
    old_s, new_s = report["old"]["seconds"], report["new"]["seconds"]
    report["speedup"] = round(old_s / new_s, 2) if new_s > 0 else None
    report["ppl_delta_pct_new_minus_old"] = round(
        report["new"]["ppl_delta_pct"] - report["old"]["ppl_delta_pct"], 3
    )
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
