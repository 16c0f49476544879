"""Quantizing checkpoints larger than memory: streaming RTN throughput and peak RSS vs checkpoint size,
side by side with the raw cost of the same I/O, and out-of-core SmoothQuant under a memory cap.

Checkpoints are synthetic Llama-shaped bf16 models (`quantmint synth-model`, random weights, SmolLM2's
tokenizer so text calibration works), made once under ``--dir`` and reused.

``rtn`` (default sizes 0.5, 2 and 8 GB), for each size, each step in its own child process:

* ``io`` -- the raw cost: read every input shard start to end (16 MiB ``readinto`` into one buffer) and
  write as many bytes as the quantized checkpoint has (16 MiB writes), into the same output directory,
  once with buffered writes and once with O_DIRECT (what quantmint's writer uses where it can): the
  faster is the reference, so neither side gains from the page cache's moods;
* ``rtn`` -- ``quantmint quantize --stream --preset w8a16``
(`quantmint.algorithms.streaming.quantize_checkpoint`)
  in one process and under torchrun with ``--ranks`` 2 (ranks writing their share of the shards).

It reports seconds, GB/s of input, ``ratio_vs_io`` (I/O seconds / RTN seconds: the goal is >= 0.5) and the
child's peak RSS (``os.wait4``, the largest of the child and its ranks), with the largest tensor for
scale; ``rss_spread`` is the largest peak RSS over the smallest across sizes (flat: close to 1).
``marginal`` compares the two sides on the bytes the largest checkpoint has beyond the smallest (extra
seconds of I/O over extra seconds of RTN), which cancels what does not grow with the checkpoint: process
start, imports, building the skeleton. Every timed child starts alike: dirty pages flushed (``sync``) and,
without a memory cap, the input read into the page cache first (so both sides measure memory-speed I/O);
under a cap, the input evicted from the page cache (``POSIX_FADV_DONTNEED``), so both read from disk. The
I/O child runs before and after the RTN children and the faster is kept.

``smoothquant`` runs ``quantmint quantize --stream`` with SmoothQuant W8A8 (fixed alpha 0.5, no search) and
``--calib-samples`` samples of wikitext-2 valid on one checkpoint: out-of-core calibration, one block in
memory at a time.

``--mem-cap 4G`` runs every child inside a fresh cgroup (v1 ``memory.limit_in_bytes``, or v2
``memory.max``) with that limit, so an 8 GB checkpoint is quantized with 4 GB of memory; the cgroup's own
peak (``memory.max_usage_in_bytes``/``memory.peak``, page cache included) and its OOM count are reported.
Needs permission to create cgroups (root in this container).

Run::

    python benchmarks/scale.py rtn [--sizes 500MB,2GB,8GB] [--ranks 1,2] [--dir DIR] [--mem-cap 4G]
    python benchmarks/scale.py smoothquant --sizes 8GB --calib-samples 16 --mem-cap 4G
    python benchmarks/scale.py rtn --sizes 60MB --ranks 1 --dir /tmp/x      # smoke test (seconds)

One JSON line goes to stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
CHUNK = 16 << 20


def log(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "G": 2**30, "M": 2**20}
    text = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


# --- memory cap -------------------------------------------------------------------------------------
class Cgroup:
    """A throwaway memory cgroup (v1 or v2) that children join before they exec."""

    def __init__(self, limit: int) -> None:
        v1 = Path("/sys/fs/cgroup/memory")
        name = f"quantmint-scale-{os.getpid()}"
        if v1.is_dir():
            self.path, self.limit_file, self.peak_file = (
                v1 / name,
                "memory.limit_in_bytes",
                "memory.max_usage_in_bytes",
            )
        else:
            self.path, self.limit_file, self.peak_file = (
                Path("/sys/fs/cgroup") / name,
                "memory.max",
                "memory.peak",
            )
        self.path.mkdir()
        (self.path / self.limit_file).write_text(str(limit))
        self.limit = limit

    def join(self) -> None:  # runs in the child, between fork and exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def reset(self) -> None:
        peak = self.path / self.peak_file
        if self.peak_file == "memory.max_usage_in_bytes":
            peak.write_text("0")

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"limit_bytes": self.limit}
        peak = self.path / self.peak_file
        if peak.exists():
            out["peak_bytes_incl_page_cache"] = int(peak.read_text())
        failcnt = self.path / "memory.failcnt"
        if failcnt.exists():
            out["limit_hits"] = int(failcnt.read_text())
        oom = self.path / "memory.oom_control"
        if oom.exists():
            fields = dict(line.split() for line in oom.read_text().splitlines())
            out["oom_kills"] = int(fields.get("oom_kill", 0))
        return out

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as exc:
            log(f"could not remove {self.path}: {exc}")


def run_child(argv: list[str], cgroup: Cgroup | None, stdout_json: bool = True) -> dict[str, Any]:
    """Run one child to completion: its JSON stdout plus wall seconds and peak RSS (MB, wait4)."""
    from quantmint.tools.memory import maxrss_mb

    if cgroup is not None:
        cgroup.reset()
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=sys.stderr.fileno(),
        cwd=str(ROOT),
        preexec_fn=cgroup.join if cgroup is not None else None,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
    )
    stdout = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    result: dict[str, Any] = json.loads(stdout) if stdout_json and code == 0 and stdout.strip() else {}
    result.update(exit_code=code, wall_s=round(wall, 2), peak_rss_mb=maxrss_mb(usage))
    if cgroup is not None:
        result["cgroup"] = cgroup.report()
    if code != 0:
        log(f"child {argv[:4]} failed with exit code {code}")
    return result


# --- the children -----------------------------------------------------------------------------------
def io_child(src: str, out: str, nbytes: int, direct: bool) -> None:
    """Read every safetensors file of `src`, write `nbytes` into `out` (buffered, or O_DIRECT from an
    aligned buffer, the last block padded and the file truncated); print seconds as JSON."""
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buffer)
    start = time.perf_counter()
    read = 0
    for file in sorted(Path(src).glob("*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view):
                read += n
    Path(out).mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(Path(out) / "io.bin", flags, 0o644)
    left = nbytes
    while left > 0:
        n = min(CHUNK, left)
        os.write(fd, view[: -(-n // 4096) * 4096 if direct else n])
        left -= n
    os.ftruncate(fd, nbytes)
    os.close(fd)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": round(seconds, 3), "read_bytes": read, "written_bytes": nbytes}))


def ensure_checkpoint(directory: Path, size: str) -> Path:
    path = directory / f"synth-{size}"
    if (path / "config.json").is_file():
        return path
    tokenizer = subprocess.run(
        [sys.executable, "-m", "quantmint.tools.cli", "example-model", "smollm2"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    argv = [sys.executable, "-m", "quantmint.tools.cli", "synth-model", str(path), "--size", size]
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    log(f"making {path}")
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return path


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def largest_tensor(path: Path) -> int:
    from quantmint.formats.safetensors_io import CheckpointFiles

    files = CheckpointFiles(path)
    return max(files.spec(name).nbytes for name in files)


def settle(src: Path, cgroup: Cgroup | None) -> None:
    """The same start for every timed child: dirty pages flushed and, without a memory cap, the
    input in the page cache; under a cap, the input evicted from it, so that every child reads it from
    disk into page cache charged to its own cgroup (pages cached by an earlier run are charged to
    whoever read them first: a child reading those would never feel its limit)."""
    os.sync()
    if cgroup is not None:
        for file in sorted(src.glob("*.safetensors")):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    else:
        buffer = bytearray(CHUNK)
        for file in sorted(src.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def estimate_output_bytes(src: Path) -> int:
    """W8A16's checkpoint size: linear weights at one byte (plus one float32 scale per row), the rest
    as stored."""
    from quantmint.formats.safetensors_io import CheckpointFiles

    files = CheckpointFiles(src)
    total = 0
    for name in files:
        spec = files.spec(name)
        linear = name.endswith("_proj.weight")
        total += spec.shape[0] * (spec.shape[1] + 4) if linear else spec.nbytes
    return total


def measure_io(
    src: Path, out: Path, input_bytes: int, output_bytes: int, size: str, cgroup: Cgroup | None
) -> dict:
    results = {}
    for mode in ("buffered", "direct"):
        settle(src, cgroup)
        log(f"{size}: raw read of {input_bytes / 1e9:.2f} GB and {mode} write of {output_bytes / 1e9:.2f} GB")
        argv = [sys.executable, __file__, "io-child", str(src), str(out), str(output_bytes), mode]
        results[mode] = run_child(argv, cgroup)
        shutil.rmtree(out, ignore_errors=True)
    best = min(results.values(), key=lambda r: r["seconds"])
    return {**best, "seconds_by_write": {mode: r["seconds"] for mode, r in results.items()}}


def bench_rtn(args: argparse.Namespace, cgroup: Cgroup | None) -> dict[str, Any]:
    runs = []
    for size in args.sizes.split(","):
        src = ensure_checkpoint(Path(args.dir), size)
        out = Path(args.dir) / f"out-{size}"
        shutil.rmtree(out, ignore_errors=True)
        input_bytes = checkpoint_bytes(src)
        output_bytes = estimate_output_bytes(src)
        io_times = [measure_io(src, out, input_bytes, output_bytes, size, cgroup)]
        rtn = []
        for ranks in (int(r) for r in args.ranks.split(",")):
            settle(src, cgroup)
            log(f"{size}: streaming RTN, {ranks} rank(s)")
            argv = [sys.executable, "-m", "quantmint", "quantize", str(src), "-o", str(out)]
            if ranks > 1:  # torchrun's ranks share the output shards (one thread each, torchrun's default)
                launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                argv = [sys.executable, *launcher, *argv[1:]]
            result = run_child([*argv, "--stream", "--preset", "w8a16"], cgroup)
            output_bytes = checkpoint_bytes(out) if out.exists() else 0
            shutil.rmtree(out, ignore_errors=True)
            rtn.append(
                {
                    "ranks": ranks,
                    "seconds": result["wall_s"],
                    "quantize_seconds": result.get("seconds", {}).get("quantize_and_save"),
                    "gbps": round(input_bytes / result["wall_s"] / 1e9, 3),
                    "peak_rss_mb": result["peak_rss_mb"],
                    "exit_code": result["exit_code"],
                    **({"cgroup": result["cgroup"]} if "cgroup" in result else {}),
                }
            )
        io_times.append(measure_io(src, out, input_bytes, output_bytes, size, cgroup))
        io = min(io_times, key=lambda r: r["seconds"])
        for entry in rtn:
            entry["ratio_vs_io"] = round(io["seconds"] / entry["seconds"], 3)
            if entry["quantize_seconds"]:
                entry["ratio_vs_io_excluding_startup"] = round(io["seconds"] / entry["quantize_seconds"], 3)
        runs.append(
            {
                "size": size,
                "input_bytes": input_bytes,
                "output_bytes": output_bytes,
                "largest_tensor_bytes": largest_tensor(src),
                "io": {
                    "seconds": io["seconds"],
                    "gbps": round(input_bytes / io["seconds"] / 1e9, 3),
                    "peak_rss_mb": io["peak_rss_mb"],
                    "runs": [r["seconds_by_write"] for r in io_times],
                },
                "rtn": rtn,
            }
        )
    peaks = [entry["peak_rss_mb"] for run in runs for entry in run["rtn"] if entry["ranks"] == 1]
    spread = round(max(peaks) / min(peaks), 3) if peaks else None
    return {"runs": runs, "rss_spread": spread, **marginal(runs)}


def marginal(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput on the bytes the largest checkpoint has beyond the smallest, for I/O and for RTN with
    one worker: what each costs per extra GB, with the fixed costs (process start, imports, the
    skeleton) cancelled on both sides. `ratio_vs_io` is I/O's extra seconds over RTN's."""
    if len(runs) < 2:
        return {}
    small, large = min(runs, key=lambda r: r["input_bytes"]), max(runs, key=lambda r: r["input_bytes"])
    one = [next((e for e in r["rtn"] if e["ranks"] == 1), None) for r in (small, large)]
    if None in one or large["input_bytes"] == small["input_bytes"]:
        return {}
    extra = large["input_bytes"] - small["input_bytes"]
    io_s = large["io"]["seconds"] - small["io"]["seconds"]
    rtn_s = one[1]["seconds"] - one[0]["seconds"]
    return {
        "marginal": {
            "sizes": [small["size"], large["size"]],
            "extra_bytes": extra,
            "io_gbps": round(extra / io_s / 1e9, 3) if io_s > 0 else None,
            "rtn_gbps": round(extra / rtn_s / 1e9, 3) if rtn_s > 0 else None,
            "ratio_vs_io": round(io_s / rtn_s, 3) if io_s > 0 and rtn_s > 0 else None,
        }
    }


def bench_smoothquant(args: argparse.Namespace, cgroup: Cgroup | None) -> dict[str, Any]:
    runs = []
    config = Path(args.dir) / "smoothquant-alpha0.5.yaml"
    config.write_text(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from quantmint.config import get_preset; import sys; "
                "sys.stdout.write(get_preset('w8a8').with_updates("
                "algorithm_args={'smooth_alpha': 0.5, 'smooth_alpha_grid': []}).to_yaml())",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    for size in args.sizes.split(","):
        src = ensure_checkpoint(Path(args.dir), size)
        out = Path(args.dir) / f"out-sq-{size}"
        shutil.rmtree(out, ignore_errors=True)
        log(f"{size}: out-of-core SmoothQuant W8A8, {args.calib_samples} x {args.calib_seq_len} tokens")
        argv = [sys.executable, "-m", "quantmint.tools.cli", "quantize", str(src), "-o", str(out), "--stream"]
        argv += ["--config", str(config), "--calib", str(CALIB), "--calib-samples", str(args.calib_samples)]
        argv += ["--calib-seq-len", str(args.calib_seq_len)]
        result = run_child(argv, cgroup)
        output_bytes = checkpoint_bytes(out) if out.exists() else 0
        shutil.rmtree(out, ignore_errors=True)
        runs.append(
            {
                "size": size,
                "input_bytes": checkpoint_bytes(src),
                "output_bytes": output_bytes,
                "calibration": {"samples": args.calib_samples, "seq_len": args.calib_seq_len},
                "seconds": result["wall_s"],
                "calibration_seconds": (result.get("calibration") or {}).get("seconds"),
                "peak_rss_mb": result["peak_rss_mb"],
                "exit_code": result["exit_code"],
                **({"cgroup": result["cgroup"]} if "cgroup" in result else {}),
            }
        )
    return {"runs": runs}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "io-child":
        io_child(argv[1], argv[2], int(argv[3]), direct=argv[4] == "direct")
        return None
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["rtn", "smoothquant"])
    parser.add_argument(
        "--sizes", default=None, help="checkpoint sizes (default rtn 500MB,2GB,8GB; smoothquant 8GB)"
    )
    parser.add_argument("--ranks", default="1,2", help="rtn: torchrun rank counts to run (default 1,2)")
    parser.add_argument(
        "--dir",
        default="synth-checkpoints",
        help="where checkpoints are made and kept (default ./synth-checkpoints)",
    )
    parser.add_argument("--mem-cap", help="run the children in a cgroup with this memory limit, e.g. 4G")
    parser.add_argument("--calib-samples", type=int, default=16, help="smoothquant: samples (default 16)")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="smoothquant: tokens per sample")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ("500MB,2GB,8GB" if args.what == "rtn" else "8GB")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    cgroup = Cgroup(parse_size(args.mem_cap)) if args.mem_cap else None
    try:
        body = bench_rtn(args, cgroup) if args.what == "rtn" else bench_smoothquant(args, cgroup)
    finally:
        if cgroup is not None:
            cgroup.remove()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    report = {
        "benchmark": f"scale_{args.what}",
        "mem_cap_bytes": parse_size(args.mem_cap) if args.mem_cap else None,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "commit": commit.stdout.strip(),
        **body,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
