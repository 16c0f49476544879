"""Data-parallel calibration and sharded streaming RTN under torchrun, side by side with one process.

Each run is `quantmint quantize` in its own child process, on the same model, preset and calibration
samples, timed from start to exit (`wall_s`) and by its own report (`calibration_s`: the calibration
engine alone, without loading, tokenizing and writing):

- ``calibrate``: ``--preset`` (default ``w8a8``: SmoothQuant with the per-block alpha search)
  * ``one_all_threads``: one process with every core (``--threads``, default all of this machine's);
  * ``one_split_threads``: one process with ``threads / ranks`` threads: what each rank has;
  * ``ranks``: ``torchrun --nproc-per-node RANKS``, each rank with ``threads / ranks`` threads.
  ``scaling`` = one_split_threads / ranks (calibration seconds): N ranks on N machines each as fast
  as one rank here would take 1 / scaling of one machine's time (ideal: RANKS). ``identical`` says
  whether the ranks' checkpoint is byte for byte the one-process one (same threads per process).
- ``stream``: streaming RTN (``--stream --preset w8a16``): one process with every core, and torchrun
  RANKS ranks writing their share of the shards; ``ranks_vs_one`` is the one-process time over the
  ranks' (above 1: the ranks are faster).

Prints ONE JSON line.

    python benchmarks/distributed.py --samples 64 [--model DIR] [--ranks 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="float model dir (default: quantmint example-model smollm2)")
    p.add_argument("--preset", default="w8a8", help="calibrating preset (default w8a8)")
    p.add_argument("--ranks", type=int, default=2, help="torchrun ranks (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores to use (default all)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sample length (default 512)")
    p.add_argument("--calib", default=str(DATA), help="calibration text")
    p.add_argument("--parts", default="calibrate,stream", help="calibrate, stream or both (default both)")
    p.add_argument("--max-shard-size", default="100MB", help="streaming RTN shard size (default 100MB)")
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    args = p.parse_args(argv)
    for name in ("ranks", "threads", "samples", "seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads % args.ranks:
        p.error(f"--threads {args.threads} is not a multiple of --ranks {args.ranks}")
    return args


def _run(command: list[str], threads: int) -> tuple[float, dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = round(time.perf_counter() - start, 2)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def _quantize(args: argparse.Namespace, out: Path, ranks: int, *options: str) -> list[str]:
    cli = ["-m", "quantmint", "quantize", args.model, "-o", str(out), "--overwrite", *options]
    if ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *cli]


def _same(a: Path, b: Path) -> bool:
    """Byte-identical checkpoints, the calibration record (timings) aside."""
    names = sorted(p.name for p in a.iterdir() if p.name != "quantmint_calibration.json")
    other = sorted(p.name for p in b.iterdir() if p.name != "quantmint_calibration.json")
    return names == other and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def calibrate(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    options = ["--preset", args.preset, "--calib", args.calib]
    options += ["--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len)]
    split = args.threads // args.ranks
    runs = {
        "one_all_threads": (1, args.threads),
        "one_split_threads": (1, split),
        "ranks": (args.ranks, split),
    }
    rows: dict[str, Any] = {}
    for name, (ranks, threads) in runs.items():
        wall, report = _run(_quantize(args, work / name, ranks, *options), threads)
        rows[name] = {
            "ranks": ranks,
            "threads_per_process": threads,
            "wall_s": wall,
            "calibration_s": report["calibration"]["seconds"],
        }
    per_rank, ranked = rows["one_split_threads"]["calibration_s"], rows["ranks"]["calibration_s"]
    return {
        **rows,
        "scaling": round(per_rank / ranked, 3) if ranked else None,
        "ranks_vs_one_all_threads": round(rows["one_all_threads"]["calibration_s"] / ranked, 3),
        "identical": _same(work / "one_split_threads", work / "ranks"),
    }


def stream(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    options = ["--preset", "w8a16", "--stream", "--max-shard-size", args.max_shard_size]
    runs = {"one": (1, args.threads), "ranks": (args.ranks, args.threads // args.ranks)}
    rows: dict[str, Any] = {}
    for name, (ranks, threads) in runs.items():
        wall, _ = _run(_quantize(args, work / f"stream-{name}", ranks, *options), threads)
        rows[name] = {"ranks": ranks, "threads_per_process": threads, "wall_s": wall}
    return {
        **rows,
        "ranks_vs_one": round(rows["one"]["wall_s"] / rows["ranks"]["wall_s"], 3),
        "identical": _same(work / "stream-one", work / "stream-ranks"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from quantmint.tools.example_models import example_model_dir

        args.model = str(example_model_dir("smollm2"))
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"calibrate", "stream"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose calibrate, stream or both")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="quantmint-distributed-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "distributed",
        "model": Path(args.model).name,
        "preset": args.preset,
        "ranks": args.ranks,
        "threads": args.threads,
        "samples": args.samples,
        "seq_len": args.seq_len,
    }
    try:
        if "calibrate" in parts:
            result["calibrate"] = calibrate(args, work)
        if "stream" in parts:
            result["stream"] = stream(args, work)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
