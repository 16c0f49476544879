"""SmoothQuant W8A8 on SmolLM2-135M: quantmint vs llm-compressor 0.14, side by side in one run.

Both tools calibrate on the *same* token ids and are scored by the *same* perplexity function, each in its
own child process (run one at a time, never concurrently), and the run prints one JSON line with, per tool:

* ``calib_s`` -- wall time of the tool's calibration call: ``quantmint.quantize(model, "w8a8",
  calibration=samples)`` (observe, smooth, fake-quantize, convert to int8 cells) and llm-compressor's
  ``oneshot(model, recipe=[SmoothQuantModifier(smoothing_strength=alpha), QuantizationModifier(
  targets="Linear", scheme="W8A8", ignore=["lm_head"])], dataset=...)`` (default mappings and default
  ``independent`` pipeline: a sequential SmoothQuant pass, then data-free W8A8 with per-channel int8
  weights and dynamic per-token int8 activations, the same scheme as quantmint's); ``load_s`` -- loading
  the float model (reported apart, not in ``calib_s``);
* ``peak_rss_mb`` -- peak RSS of the whole child process (``os.wait4`` rusage, ``ru_maxrss`` is KiB on
  Linux), which includes the perplexity evaluation, and ``calib_peak_rss_mb`` -- the child's own peak read
  right after calibration, before evaluation;
* ``ppl`` -- perplexity of the resulting in-memory model with ``quantmint.eval.perplexity.perplexity`` (both
  children import it: the windowing is ``PERPLEXITY_WINDOWING``, the first ``--eval-tokens`` tokens of
  wikitext-2 ``test.txt`` in independent 512-token windows), plus ``check``: the logits of the first 64
  calibration tokens before vs after quantization (relative error, top-1 agreement) and the number of
  quantized linears, to show the model really is quantized (llm-compressor keeps float weights and
  fake-quantizes in forward hooks);
* ``ppl_second`` -- perplexity on a second text, so that a setting fitted to wikitext shows up: by default
  (``--second-text``) the unique paragraph contexts of SQuAD v1.1 dev (Wikipedia prose, untokenized),
  joined, first ``--eval-tokens`` tokens, same windowing (``quantmint.eval.perplexity.squad_contexts_text``);
  ``--second-text ''`` skips it.

``float`` is the float model's perplexity (its own child, system python; with ``--float-in-venv`` also in the
llm-compressor venv, whose transformers differs, to show both environments score alike). ``comparison``
holds ``time_ratio`` (llm-compressor calib_s / quantmint calib_s), ``total_time_ratio`` (with loading),
``rss_ratio`` and ``calib_rss_ratio`` (llm-compressor / quantmint), each tool's ``ppl_delta_pct`` vs float
(``ppl_second_delta_pct`` on the second text), and ``goal_met``: quantmint at least 2x faster at equal or
better perplexity (on both texts when the second one was scored).
``comparison_quantmint_alpha0.5_vs_llmcompressor`` does the same for quantmint's fast setting (fixed alpha,
no search) against llm-compressor's best; the top-level ``goal_met`` is true if either comparison meets it.

Calibration: ``--samples`` x ``--seq-len`` tokens (128 x 512) from wikitext-2 ``valid.txt``, ``--seed`` 0,
drawn once with ``quantmint.io.data.calibration_samples`` and saved as one ``[samples, seq_len]`` int64
tensor in
a temporary safetensors file that both children read; each reports the sha256 of the ids it read. quantmint
calibrates in batches of 8 (its default), llm-compressor in batches of ``--llmc-batch-size`` (1, its
default). Runs: quantmint preset ``w8a8`` (alpha searched per block in {0.5, 0.6, 0.7, 0.8}) vs
llm-compressor at ``--llmc-alpha`` 0.8 (its best on this model), then quantmint at a fixed alpha of 0.5
(``algorithm_args`` replaced by ``smooth_alpha: 0.5``: no search and no Hadamard rotation);
``--alpha05`` adds llm-compressor at 0.5 too.

Setup, once: llm-compressor lives in its own virtual environment (``--venv``, default
``venvs/llmc`` beside the checkout, or ``$QUANTMINT_LLMC_VENV``; below, VENV stands for it) that
reuses the system torch 2.13.0+cpu; pip is held to that torch by a constraints file, and the venv gets
its own transformers (5.17), compressed-tensors and datasets. ``--setup`` runs exactly::

    python3 -m venv --system-site-packages VENV
    echo 'torch==2.13.0' > VENV/constraints.txt
    VENV/bin/python -m pip install --dry-run --report R.json \\
        -c VENV/constraints.txt llmcompressor==0.14.0.1   # refused if it would install
                                                 # torch, triton or CUDA (nvidia-*) packages
    VENV/bin/python -m pip install -c VENV/constraints.txt llmcompressor==0.14.0.1
    VENV/bin/python -c "import torch; print(torch.__version__)"   # must print 2.13.0+cpu

Nothing is installed into the system python. Run (children get ``HF_HUB_OFFLINE=1``; no downloads)::

    python3 benchmarks/smoothquant_vs_llmcompressor.py --setup
    python3 benchmarks/smoothquant_vs_llmcompressor.py [--alpha05] [--float-in-venv]
    python3 benchmarks/smoothquant_vs_llmcompressor.py --samples 8 --eval-tokens 4096   # smoke test
    python3 benchmarks/smoothquant_vs_llmcompressor.py --dry-run    # print the plan, run nothing

One JSON line goes to stdout; progress and the children's output go to stderr. The full run takes about
12 minutes on 2 idle cores (most of it llm-compressor's calibration); timings from a busy machine are
meaningless (the 1-minute load average before each child is recorded): with another job on the cores, all
threads (``--threads``, default every core) spin against it and calibration slows several-fold, unevenly
between the tools. A small ``--samples`` run checks the plumbing, not the speed goal: quantmint's alpha
search re-runs each block once per grid alpha (4) on one sample of each of its first 4 batches -- a fixed
cost per block that a small calibration set weighs more -- while llm-compressor's passes do not depend on
the count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.json"
# Beside the checkout (as shared/ is), or where QUANTMINT_LLMC_VENV says: no machine-specific path.
DEFAULT_VENV = Path(os.environ.get("QUANTMINT_LLMC_VENV") or ROOT.parent / "venvs" / "llmc")
LLMC_VERSION = "0.14.0.1"
TORCH_PIN = "2.13.0"
QUANTMINT_PRESET = "w8a8"
PROBE_TOKENS = 64  # logits compared before / after quantization
GOAL_SPEEDUP = 2.0
# Packages the llm-compressor venv must never install (it reuses the system's CPU torch).
FORBIDDEN_PREFIXES = ("torch", "triton", "nvidia-")
ALLOWED_EXCEPTIONS = ("nvidia-ml-py",)  # pure-Python NVML bindings llm-compressor imports; no CUDA
VENV_PACKAGES = (
    "torch",
    "transformers",
    "llmcompressor",
    "compressed-tensors",
    "datasets",
    "huggingface_hub",
)
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def log(msg: str) -> None:
    print(f"[smoothquant_vs_llmcompressor] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Plan: which children run, with which interpreter and spec (pure; --dry-run prints it)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Child:
    """One child process: `kind` is float | quantmint | llmcompressor; `spec` is its JSON argument."""

    name: str
    kind: str
    python: str
    spec: dict[str, Any] = field(default_factory=dict)

    def argv(self, out: str | Path) -> list[str]:
        return [
            self.python,
            str(Path(__file__).resolve()),
            "--child",
            self.kind,
            "--spec",
            json.dumps(self.spec),
            "--out",
            str(out),
        ]


def venv_python(venv: str | Path) -> Path:
    return Path(venv) / "bin" / "python"


def plan(args: argparse.Namespace, model: str, calib_ids: str, second_text: str | None = None) -> list[Child]:
    """The children in the order they run: float, quantmint, llm-compressor (then the alpha=0.5 pair).
    `second_text`: the plain-text file the children score as the second text (default `--second-text`)."""
    common = {
        "model": model,
        "calib_ids": calib_ids,
        "text": str(args.text),
        "second_text": second_text or args.second_text or None,
        "eval_tokens": args.eval_tokens,
        "eval_seq_len": args.eval_seq_len,
        "threads": args.threads,
    }
    llmc = str(venv_python(args.venv))
    children = [Child("float", "float", sys.executable, dict(common))]
    if args.float_in_venv:
        children.append(Child("float_venv", "float", llmc, dict(common)))
    children += [
        Child(
            "quantmint", "quantmint", sys.executable, {**common, "preset": QUANTMINT_PRESET, "alpha": None}
        ),
        Child(
            "llmcompressor",
            "llmcompressor",
            llmc,
            {**common, "alpha": args.llmc_alpha, "batch_size": args.llmc_batch_size},
        ),
        # quantmint's fast setting (no search): compared with llm-compressor's best alpha as well.
        Child(
            "quantmint_alpha0.5",
            "quantmint",
            sys.executable,
            {**common, "preset": QUANTMINT_PRESET, "alpha": 0.5},
        ),
    ]
    if args.alpha05:
        children += [
            Child(
                "llmcompressor_alpha0.5",
                "llmcompressor",
                llmc,
                {**common, "alpha": 0.5, "batch_size": args.llmc_batch_size},
            ),
        ]
    return children


# ----------------------------------------------------------------------------------------------------------
# Report assembly (pure)
# ----------------------------------------------------------------------------------------------------------


def _ratio(num: float | None, den: float | None, digits: int = 3) -> float | None:
    return round(num / den, digits) if num is not None and den else None


def _delta_pct(ppl: float | None, ref: float | None) -> float | None:
    return round(100.0 * (ppl / ref - 1.0), 3) if ppl is not None and ref else None


def compare(
    float_ppl: float | None,
    quantmint: dict[str, Any],
    llmc: dict[str, Any],
    float_second: float | None = None,
) -> dict[str, Any]:
    """Ratios of one quantmint run and one llm-compressor run (llm-compressor over quantmint).

    Each run is a dict with `calib_s`, `load_s`, `peak_rss_mb`, `calib_peak_rss_mb`, `ppl` and, when the
    second text was scored, `ppl_second` (`float_second`: the float model's).
    `goal_met`: quantmint calibrates at least `GOAL_SPEEDUP` times faster at equal or better perplexity,
    on both texts when both runs scored the second one.
    """

    def total(run: dict[str, Any]) -> float | None:
        return run["load_s"] + run["calib_s"] if run.get("load_s") is not None else None

    time_ratio = _ratio(llmc.get("calib_s"), quantmint.get("calib_s"))
    ppl_q, ppl_l = quantmint.get("ppl"), llmc.get("ppl")
    second_q, second_l = quantmint.get("ppl_second"), llmc.get("ppl_second")
    second: dict[str, Any] = {}
    if second_q is not None or second_l is not None:
        second = {
            "ppl_second_delta_pct": {
                "quantmint": _delta_pct(second_q, float_second),
                "llmcompressor": _delta_pct(second_l, float_second),
            },
            "ppl_second_quantmint_vs_llmcompressor_pct": _delta_pct(second_q, second_l),
        }
    second_ok = not second or (second_q is not None and second_l is not None and second_q <= second_l)
    return {
        "time_ratio": time_ratio,
        "total_time_ratio": _ratio(total(llmc), total(quantmint)),
        "rss_ratio": _ratio(llmc.get("peak_rss_mb"), quantmint.get("peak_rss_mb")),
        "calib_rss_ratio": _ratio(llmc.get("calib_peak_rss_mb"), quantmint.get("calib_peak_rss_mb")),
        "ppl_delta_pct": {
            "quantmint": _delta_pct(ppl_q, float_ppl),
            "llmcompressor": _delta_pct(ppl_l, float_ppl),
        },
        "ppl_quantmint_vs_llmcompressor_pct": _delta_pct(ppl_q, ppl_l),
        **second,
        "goal_met": bool(
            time_ratio is not None
            and ppl_q is not None
            and ppl_l is not None
            and time_ratio >= GOAL_SPEEDUP
            and ppl_q <= ppl_l
            and second_ok
        ),
    }


def assemble(
    results: dict[str, dict[str, Any]], meta: dict[str, Any], alpha05: bool = False
) -> dict[str, Any]:
    """The JSON report from the children's results (keyed by child name) and the run's metadata."""
    float_run = results.get("float", {})
    float_ppl = float_run.get("ppl")
    float_second = float_run.get("ppl_second")
    report: dict[str, Any] = {"benchmark": "smoothquant_vs_llmcompressor", **meta}
    report["float"] = dict(float_run)
    if "float_venv" in results:
        venv_ppl = results["float_venv"].get("ppl")
        report["float"]["ppl_venv"] = venv_ppl
        report["float"]["venv_matches"] = (
            venv_ppl is not None and float_ppl is not None and abs(venv_ppl - float_ppl) < 1e-3
        )
    report["runs"] = {name: run for name, run in results.items() if not name.startswith("float")}
    report["comparison"] = compare(
        float_ppl, results.get("quantmint", {}), results.get("llmcompressor", {}), float_second
    )
    # quantmint at a fixed alpha of 0.5 (no search) against llm-compressor at its own best alpha.
    report["comparison_quantmint_alpha0.5_vs_llmcompressor"] = compare(
        float_ppl, results.get("quantmint_alpha0.5", {}), results.get("llmcompressor", {}), float_second
    )
    report["goal_met"] = any(
        report[key]["goal_met"] for key in ("comparison", "comparison_quantmint_alpha0.5_vs_llmcompressor")
    )
    if alpha05:
        report["comparison_alpha0.5"] = compare(
            float_ppl,
            results.get("quantmint_alpha0.5", {}),
            results.get("llmcompressor_alpha0.5", {}),
            float_second,
        )
    # Every calibrating child read the ids the parent drew, and every child scored the same eval ids.
    calib_hashes = {run["calib_sha256"] for run in results.values() if "calib_sha256" in run}
    report["calibration"] = {
        **meta["calibration"],
        "same_ids_in_every_child": calib_hashes == {meta["calibration"]["sha256"]},
    }
    eval_hashes = {run.get("eval_sha256") for run in results.values()}
    second_hashes = {run.get("second_eval_sha256") for run in results.values()}
    report["eval"] = {
        **meta["eval"],
        "same_ids_in_every_child": len(eval_hashes) == 1 and None not in eval_hashes,
        "same_second_ids_in_every_child": len(second_hashes) == 1,
    }
    return report


# ----------------------------------------------------------------------------------------------------------
# Environment: the llm-compressor venv, versions
# ----------------------------------------------------------------------------------------------------------


def forbidden_installs(pip_report: dict[str, Any]) -> list[str]:
    """`name==version` of packages in a `pip install --report` that the venv must not get."""
    bad = []
    for item in pip_report.get("install", []):
        name = item["metadata"]["name"].lower().replace("_", "-")
        if name.startswith(FORBIDDEN_PREFIXES) and name not in ALLOWED_EXCEPTIONS:
            bad.append(f"{name}=={item['metadata']['version']}")
    return bad


def setup_venv(venv: Path) -> dict[str, Any]:
    """Create the llm-compressor venv (module docstring); refuses to let pip touch torch or CUDA."""
    if sys.prefix != sys.base_prefix:
        raise SystemExit(f"run --setup with the system python3, not from the venv {sys.prefix}")
    python = venv_python(venv)
    constraints = venv / "constraints.txt"
    start = time.perf_counter()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    constraints.write_text(f"torch=={TORCH_PIN}\n", encoding="utf-8")
    pip = [str(python), "-m", "pip", "install", "-c", str(constraints), f"llmcompressor=={LLMC_VERSION}"]
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "pip-report.json"
        subprocess.run([*pip[:4], "--dry-run", "--quiet", "--report", str(report_path), *pip[4:]], check=True)
        pip_report = json.loads(report_path.read_text(encoding="utf-8"))
    bad = forbidden_installs(pip_report)
    if bad:
        raise SystemExit(
            f"pip would install {', '.join(bad)} into {venv}; refusing (the venv must reuse the system "
            "torch 2.13.0+cpu): install llmcompressor with --no-deps and list its other dependencies"
        )
    planned = sorted(
        f"{i['metadata']['name']}=={i['metadata']['version']}" for i in pip_report.get("install", [])
    )
    log(f"installing into {venv}: {', '.join(planned) or 'nothing (already installed)'}")
    subprocess.run(pip, check=True, stdout=sys.stderr)
    versions = env_versions(python)
    if not str(versions.get("torch_runtime", "")).startswith(f"{TORCH_PIN}+cpu"):
        raise SystemExit(f"the venv's torch is {versions.get('torch_runtime')}, expected {TORCH_PIN}+cpu")
    return {
        "venv": str(venv),
        "installed": planned,
        "seconds": round(time.perf_counter() - start, 1),
        "versions": versions,
    }


VERSIONS_SNIPPET = """
import importlib.metadata as md, json, sys
names = sys.argv[1].split(",")
out = {}
for n in names:
    try:
        out[n] = md.version(n)
    except md.PackageNotFoundError:
        out[n] = None
if "--torch" in sys.argv:
    import torch
    out["torch_runtime"] = torch.__version__
out["python"] = sys.version.split()[0]
print(json.dumps(out))
"""


def env_versions(python: str | Path, import_torch: bool = True) -> dict[str, Any]:
    """Installed versions of `VENV_PACKAGES` as `python` sees them (torch also by importing it)."""
    argv = [
        str(python),
        "-c",
        VERSIONS_SNIPPET,
        ",".join(VENV_PACKAGES),
        *(["--torch"] if import_torch else []),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def check_venv(venv: Path) -> dict[str, Any]:
    python = venv_python(venv)
    if not python.exists():
        raise SystemExit(f"no llm-compressor venv at {venv}: create it with `{Path(__file__).name} --setup`")
    versions = env_versions(python)
    llmc, torch = versions.get("llmcompressor"), str(versions.get("torch_runtime"))
    if llmc != LLMC_VERSION or not torch.startswith(f"{TORCH_PIN}+cpu"):
        raise SystemExit(
            f"{venv} has llmcompressor {llmc} and torch {torch}; expected {LLMC_VERSION} and "
            f"{TORCH_PIN}+cpu: delete {venv} and recreate it with --setup"
        )
    return versions


def git_commit() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# ----------------------------------------------------------------------------------------------------------
# Parent: calibration ids, children
# ----------------------------------------------------------------------------------------------------------


def ids_sha256(ids: Any) -> str:
    """sha256 of a token-id tensor's int64 bytes (row-major)."""
    import torch

    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def write_calibration(model: str, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Draw the calibration samples once and save them as `input_ids` [samples, seq_len] int64."""
    import torch
    from safetensors.torch import save_file

    from quantmint.io.data import calibration_samples
    from quantmint.io.models import load_tokenizer

    samples = calibration_samples(
        args.calib,
        load_tokenizer(model),
        n_samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        kind="text",
    )
    ids = torch.stack(samples)
    save_file({"input_ids": ids}, str(path))
    return {
        "file": str(args.calib),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "tokens": ids.numel(),
        "sha256": ids_sha256(ids),
    }


def write_second_text(source: str | None, path: Path) -> str | None:
    """The second text as a plain UTF-8 file that every child reads alike (both venvs' quantmint may differ):
    a SQuAD .json becomes its unique contexts, joined (`squad_contexts_text`, this checkout's)."""
    if not source:
        return None
    from quantmint.eval.perplexity import read_text

    path.write_text(read_text(source), encoding="utf-8")
    return str(path)


def run_child(child: Child, out: Path, threads: int) -> dict[str, Any]:
    """Run one child to completion; its result JSON plus `peak_rss_mb` (wait4) and `wall_s`."""
    from quantmint.tools.memory import maxrss_mb

    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log(f"child {child.name} ({child.python}), load average {loadavg()}")
    start = time.perf_counter()
    proc = subprocess.Popen(child.argv(out), env=env, stdout=sys.stderr.fileno(), cwd=str(ROOT))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"child {child.name} failed with exit code {proc.returncode} (its output is above)")
    result = json.loads(out.read_text(encoding="utf-8"))
    result["peak_rss_mb"] = maxrss_mb(usage)
    result["wall_s"] = round(wall, 2)
    log(f"child {child.name} done in {wall:.1f}s: {json.dumps(result)[:300]}")
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    llmc_versions = check_venv(args.venv)
    model = args.model or str(_example_model())
    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="sq-vs-llmc-") as tmp:
        calib_path = Path(tmp) / "calibration.safetensors"
        calibration = write_calibration(model, args, calib_path)
        second = write_second_text(args.second_text, Path(tmp) / "second_text.txt")
        results: dict[str, dict[str, Any]] = {}
        for child in plan(args, model, str(calib_path), second):
            child_load = loadavg()
            results[child.name] = run_child(child, Path(tmp) / f"{child.name}.json", args.threads)
            results[child.name]["loadavg_1m_at_start"] = child_load
    from quantmint.eval.perplexity import PERPLEXITY_WINDOWING

    meta = {
        "model": model,
        "threads": args.threads,
        "loadavg_1m_at_start": load_start,
        "cpu": platform.processor() or platform.machine(),
        "calibration": calibration,
        "eval": {
            "file": str(args.text),
            "second_file": args.second_text or None,
            "max_tokens": args.eval_tokens,
            "seq_len": args.eval_seq_len,
            "windowing": PERPLEXITY_WINDOWING,
        },
        "settings": {
            "quantmint": f"preset {QUANTMINT_PRESET} (SmoothQuant, alpha searched per block, down_proj "
            "rotated where the family allows), batch 8",
            "llmcompressor": f"SmoothQuantModifier(smoothing_strength={args.llmc_alpha}) default mappings + "
            f"QuantizationModifier(targets='Linear', scheme='W8A8', ignore=['lm_head']), "
            f"batch {args.llmc_batch_size}, default pipeline",
        },
        "versions": {
            "quantmint": git_commit(),
            "system": env_versions(sys.executable),
            "llmcompressor_venv": {"path": str(args.venv), **llmc_versions},
        },
    }
    return assemble(results, meta, alpha05=args.alpha05)


def _example_model() -> Path:
    from quantmint.tools.example_models import example_model_dir

    return example_model_dir("smollm2")


# ----------------------------------------------------------------------------------------------------------
# Children (run by the system python or the venv python; import torch & co lazily)
# ----------------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    from quantmint.tools.memory import peak_rss_mb

    return peak_rss_mb()


def _load_ids(path: str) -> Any:
    from safetensors.torch import load_file

    return load_file(path)["input_ids"]


def _score(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """quantmint's perplexity of `model` on the spec's text, and the sha256 of the ids it scored."""
    from quantmint.eval.perplexity import perplexity, read_text

    scores: dict[str, Any] = {}
    for key, path in (("", spec["text"]), ("second_", spec.get("second_text"))):
        if not path:
            continue
        text = read_text(path)  # the parent wrote the second text as plain text (`write_second_text`)
        ppl = perplexity(model, tokenizer, text, max_tokens=spec["eval_tokens"], seq_len=spec["eval_seq_len"])
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0][: ppl["tokens"]]
        scores.update(
            {
                "ppl" if not key else "ppl_second": round(ppl["ppl"], 4),
                f"{key}eval_tokens": ppl["tokens"],
                f"{key}eval_seconds": ppl["seconds"],
                f"{key}eval_sha256": ids_sha256(ids),
            }
        )
    return scores


def _probe_logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids[:1, :PROBE_TOKENS]).logits[0].float()


def _logit_check(before: Any, after: Any) -> dict[str, float]:
    err = float((after - before).norm() / before.norm())
    agree = float((after.argmax(-1) == before.argmax(-1)).float().mean())
    return {"probe_rel_logit_err": round(err, 5), "probe_top1_agreement": round(agree, 4)}


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def child_float(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    return {**_score(model, tokenizer, spec), "versions": _versions(), "threads": torch.get_num_threads()}


def child_quantmint(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import quantmint
    from quantmint.io.models import load_float_model, load_tokenizer

    torch.set_num_threads(spec["threads"])
    ids = _load_ids(spec["calib_ids"])
    config = quantmint.get_preset(spec["preset"])
    if spec.get("alpha") is not None:  # a fixed alpha instead of the per-block search
        config = config.with_updates(algorithm_args={"smooth_alpha": spec["alpha"]})
    tokenizer = load_tokenizer(spec["model"])
    start = time.perf_counter()
    model = load_float_model(spec["model"])
    load_s = time.perf_counter() - start
    before = _probe_logits(model, ids)
    samples = list(ids.unbind(0))
    start = time.perf_counter()
    quantmint.quantize(model, config, calibration=samples)
    calib_s = time.perf_counter() - start
    calib_rss = _peak_rss_mb()
    state = quantmint.quant_state(model)
    assert state is not None
    schemes: dict[str, int] = {}
    for scheme in state.modules.values():
        schemes[scheme] = schemes.get(scheme, 0) + 1
    check = {**_logit_check(before, _probe_logits(model, ids)), "quantized_linears": schemes}
    return {
        "tool": "quantmint",
        "config": config.to_dict(),
        "load_s": round(load_s, 2),
        "calib_s": round(calib_s, 2),
        "calib_peak_rss_mb": calib_rss,
        "calib_sha256": ids_sha256(ids),
        "calib_report": state.calibration,
        **_score(model, tokenizer, spec),
        "check": check,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }


def child_llmcompressor(spec: dict[str, Any]) -> dict[str, Any]:
    import compressed_tensors
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    ids = _load_ids(spec["calib_ids"])
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})  # already tokenized: oneshot uses it as is
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto").eval()
    load_s = time.perf_counter() - start
    before = _probe_logits(model, ids)
    recipe = [
        SmoothQuantModifier(smoothing_strength=spec["alpha"]),
        QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]
    start = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=recipe,
        dataset=dataset,
        num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1],
        batch_size=spec["batch_size"],
        shuffle_calibration_samples=False,  # all samples are used either way; keep quantmint's order
    )
    calib_s = time.perf_counter() - start
    calib_rss = _peak_rss_mb()
    quantized = [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]
    statuses = sorted({str(getattr(m, "quantization_status", None)) for m in quantized})
    check = {
        **_logit_check(before, _probe_logits(model, ids)),
        "quantized_linears": len(quantized),
        "quantization_status": statuses,
    }
    from quantmint.eval.perplexity import new_cache

    assert new_cache(model) is None  # scored like any float-cache model, as the float child is
    return {
        "tool": "llmcompressor",
        "alpha": spec["alpha"],
        "batch_size": spec["batch_size"],
        "load_s": round(load_s, 2),
        "calib_s": round(calib_s, 2),
        "calib_peak_rss_mb": calib_rss,
        "calib_sha256": ids_sha256(ids),
        **_score(model, tokenizer, spec),
        "check": check,
        "threads": torch.get_num_threads(),
        "versions": {
            **_versions(),
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
        },
    }


CHILDREN = {"float": child_float, "quantmint": child_quantmint, "llmcompressor": child_llmcompressor}


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--setup", action="store_true", help="create the llm-compressor venv (see the docstring)")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and run nothing")
    p.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help=f"llm-compressor venv (default {DEFAULT_VENV})"
    )
    p.add_argument("--model", help="float model dir (default: `quantmint example-model smollm2`)")
    p.add_argument(
        "--calib", type=Path, default=DATA / "valid.txt", help="calibration text (wikitext-2 valid)"
    )
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--text", type=Path, default=DATA / "test.txt", help="perplexity text (wikitext-2 test)")
    p.add_argument(
        "--second-text",
        default=str(SQUAD),
        help="second perplexity text: a text file, or a SQuAD v1.1 .json whose unique contexts are joined "
        "(default SQuAD v1.1 dev; '' skips it)",
    )
    p.add_argument(
        "--eval-tokens", type=int, default=32768, help="perplexity tokens per text (default 32768)"
    )
    p.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)"
    )
    p.add_argument("--llmc-alpha", type=float, default=0.8, help="llm-compressor smoothing_strength (0.8)")
    p.add_argument("--llmc-batch-size", type=int, default=1, help="llm-compressor calibration batch (1)")
    p.add_argument("--alpha05", action="store_true", help="also run both tools at a fixed alpha of 0.5")
    p.add_argument("--float-in-venv", action="store_true", help="also score the float model in the venv")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("samples", "seq_len", "eval_tokens", "eval_seq_len", "threads", "llmc_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_tokens < args.eval_seq_len:
        p.error(
            f"--eval-tokens {args.eval_tokens} is less than one --eval-seq-len window ({args.eval_seq_len})"
        )
    if not 0.0 <= args.llmc_alpha <= 1.0:
        p.error(f"--llmc-alpha must lie in [0, 1], got {args.llmc_alpha}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        result = CHILDREN[args.child](json.loads(args.spec))
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
        return
    if args.setup:
        print(json.dumps({"benchmark": "smoothquant_vs_llmcompressor", "setup": setup_venv(args.venv)}))
        return
    if args.dry_run:
        model = args.model or "$(quantmint example-model smollm2)"
        children = plan(args, model, "<tmp>/calibration.safetensors")
        print(
            json.dumps(
                {
                    "benchmark": "smoothquant_vs_llmcompressor",
                    "dry_run": True,
                    "venv": str(args.venv),
                    "calibration": {
                        "file": str(args.calib),
                        "samples": args.samples,
                        "seq_len": args.seq_len,
                        "seed": args.seed,
                    },
                    "children": [vars(c) for c in children],
                }
            )
        )
        return
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
