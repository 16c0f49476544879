"""`quantmint report`: the seeds' comparison table, float vs each quantized model, with deltas.

For every model: checkpoint size, weight memory, perplexity, SQuAD F1/EM, BoolQ accuracy (causal LMs),
embedding cosine vs float and the Lee correlation (encoders), prefill and decode tokens/s, and the
KV-cache bytes after generating `kv_tokens` tokens. Written as Markdown, JSON and a PNG plot of
accuracy vs checkpoint bytes; for block-PTQ checkpoints also a table and a plot (`block_mse.png`) of each
block's output MSE after RTN and after tuning, read from the checkpoint's calibration log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantmint.errors import QuantmintError

__all__ = ["ReportOptions", "build_report", "write_report"]


class ReportOptions:
    """Which evaluations to run and on how much data."""

    def __init__(
        self,
        text: str | None = None,
        max_tokens: int = 32768,
        squad: str | None = None,
        squad_n: int = 500,
        boolq: str | None = None,
        boolq_n: int | None = None,
        lee: str | None = None,
        decode_tokens: int = 64,
        kv_tokens: int = 512,
        vllm: bool | None = None,
    ) -> None:
        self.text, self.max_tokens = text, max_tokens
        self.squad, self.squad_n = squad, squad_n
        self.boolq, self.boolq_n = boolq, boolq_n
        self.lee = lee
        self.decode_tokens, self.kv_tokens = decode_tokens, kv_tokens
        # vLLM-served figures beside the runtime's: None = when vLLM is installed (causal models only).
        self.vllm = vllm


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_figures(path: Path, tokenizer: Any, options: ReportOptions) -> dict[str, Any]:
    """The model served by vLLM (quantmint checkpoints through the quantmint plugin, in a fresh process):
    perplexity on the same windows as `perplexity` (vLLM's prompt log-probabilities) and greedy decode
    speed after the same prompt as `_decode_speed`; `vllm_error` with vLLM's first line where it fails."""
    import math
    import tempfile

    from quantmint.eval import read_text

    if not _vllm_installed():
        raise QuantmintError("--vllm: vLLM is not installed: pip install 'quantmint[vllm]', or drop --vllm")
    from quantmint.backends.vllm.offline import run_in_subprocess

    tasks: list[dict[str, Any]] = []
    seq_len = 512
    if options.text:
        ids = tokenizer(read_text(options.text), add_special_tokens=False)["input_ids"]
        n = min(len(ids), options.max_tokens) // seq_len
        tasks.append(
            {"kind": "prompt_logprobs", "prompts": [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]}
        )
    if options.decode_tokens:
        prompt = tokenizer("The history of the city begins")["input_ids"]
        tasks.append({"kind": "generate", "prompts": [prompt], "max_tokens": options.decode_tokens})
    if not tasks:
        return {}
    job = {
        "model": str(path),
        "dtype": "auto",
        "max_model_len": max(seq_len + 8, 64 + options.decode_tokens),
        "tasks": tasks,
    }
    with tempfile.TemporaryDirectory(prefix="quantmint-report-vllm-") as tmp:
        out = run_in_subprocess(job, tmp)
    if "error" in out:
        return {"vllm_error": str(out["error"]).splitlines()[0][:300]}
    row: dict[str, Any] = {}
    for result in out["results"]:
        if result["kind"] == "prompt_logprobs":
            values = [v for window in result["value"] for v in window]
            row["vllm_ppl"] = math.exp(-sum(values) / len(values))
        elif result["seconds"] > 0:
            row["vllm_decode_tokens_per_s"] = options.decode_tokens / result["seconds"]
    return row


def _calibration_log(path: Path) -> dict[str, Any]:
    from quantmint.formats.checkpoint import CALIBRATION_NAME

    log = path / CALIBRATION_NAME
    return json.loads(log.read_text()) if log.is_file() else {}


def _is_causal(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def _weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def _cache_for(model: nn.Module) -> Any:
    from transformers import DynamicCache

    from quantmint.algorithms.kv_cache import Int8KVCache
    from quantmint.algorithms.ptq import quant_state

    state = quant_state(model)
    if state is not None and state.kv_modules:
        return Int8KVCache.for_model(model)
    return DynamicCache(config=model.config)


@torch.no_grad()
def _decode_speed(model: nn.Module, tokenizer: Any, new_tokens: int) -> tuple[float, int]:
    """Greedy decode of `new_tokens` after a fixed prompt: (tokens per second, KV-cache bytes)."""
    from quantmint.algorithms.kv_cache import kv_cache_bytes

    prompt = tokenizer("The history of the city begins", return_tensors="pt")["input_ids"]
    cache = _cache_for(model)
    start = time.perf_counter()
    model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        past_key_values=cache,
        pad_token_id=tokenizer.eos_token_id,
    )
    return new_tokens / (time.perf_counter() - start), kv_cache_bytes(cache)


def evaluate_model(
    path: Path, options: ReportOptions, reference_embeddings: torch.Tensor | None = None
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """All the figures for one model directory; also returns its Lee embeddings (encoders)."""
    from quantmint.eval import embedding_cosine, perplexity, read_documents, read_text, sentence_embeddings
    from quantmint.io.models import is_quantmint_checkpoint, load_model, load_tokenizer

    model = load_model(path)
    tokenizer = load_tokenizer(path)
    row: dict[str, Any] = {
        "model": str(path),
        "quantized": is_quantmint_checkpoint(path),
        "checkpoint_bytes": _checkpoint_bytes(path),
        "weight_memory_bytes": _weight_bytes(model),
    }
    if row["quantized"]:
        from quantmint.algorithms.ptq import quant_state

        row["scheme"] = quant_state(model).config.scheme_name
        calibration = _calibration_log(path)
        if calibration.get("block_ptq"):
            row["block_ptq"] = [
                {k: e[k] for k in ("block", "rtn_mse", "ptq_mse", "kept")}
                for e in calibration["block_ptq"]["blocks"]
            ]
            row["calibration_seconds"] = calibration.get("seconds")
            row["calibration_peak_rss_mb"] = calibration.get("peak_rss_mb")
    else:
        row["scheme"] = "float"
    embeddings = None
    if _is_causal(model):
        if options.text:
            ppl = perplexity(model, tokenizer, read_text(options.text), max_tokens=options.max_tokens)
            row["ppl"] = ppl["ppl"]
            if ppl["seconds"] > 0:  # rounded to 0.01 s: a tiny text may read as no time at all
                row["prefill_tokens_per_s"] = ppl["tokens"] / ppl["seconds"]
        if options.squad:
            from quantmint.eval.qa import squad_f1_em

            squad = squad_f1_em(model, tokenizer, options.squad, n=options.squad_n)
            row.update({"squad_f1": squad["f1"], "squad_em": squad["em"], "squad_n": squad["n"]})
        if options.boolq:
            from quantmint.eval.qa import boolq_accuracy

            boolq = boolq_accuracy(model, tokenizer, options.boolq, n=options.boolq_n)
            row.update({"boolq_accuracy": boolq["accuracy"]})
        if options.decode_tokens:
            row["decode_tokens_per_s"], _ = _decode_speed(model, tokenizer, options.decode_tokens)
        if options.kv_tokens:
            _, row[f"kv_cache_bytes_{options.kv_tokens}"] = _decode_speed(model, tokenizer, options.kv_tokens)
    if _is_causal(model) and (options.vllm or (options.vllm is None and _vllm_installed())):
        row.update(vllm_figures(path, tokenizer, options))
    elif options.lee:
        from quantmint.eval.similarity import lee_correlation

        lee = lee_correlation(model, tokenizer, options.lee)
        row.update({"lee_pearson": lee["pearson"], "lee_spearman": lee["spearman"]})
        embeddings = sentence_embeddings(model, tokenizer, read_documents(Path(options.lee) / "lee.cor"))
        if reference_embeddings is not None:
            row["embedding_cosine"] = embedding_cosine(reference_embeddings, embeddings)["cosine_mean"]
    return row, embeddings


_HIGHER_IS_BETTER = (
    "squad_f1",
    "squad_em",
    "boolq_accuracy",
    "lee_pearson",
    "lee_spearman",
    "embedding_cosine",
)
_METRICS = (
    ("checkpoint_bytes", "checkpoint bytes"),
    ("weight_memory_bytes", "weight memory bytes"),
    ("ppl", "perplexity"),
    ("squad_f1", "SQuAD F1"),
    ("squad_em", "SQuAD EM"),
    ("boolq_accuracy", "BoolQ acc %"),
    ("embedding_cosine", "embedding cosine"),
    ("lee_pearson", "Lee Pearson"),
    ("lee_spearman", "Lee Spearman"),
    ("prefill_tokens_per_s", "prefill tok/s"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("vllm_ppl", "vLLM perplexity"),
    ("vllm_decode_tokens_per_s", "vLLM decode tok/s"),
)


def build_report(
    float_dir: str | Path, quantized_dirs: list[str | Path], options: ReportOptions
) -> dict[str, Any]:
    """Evaluate the float model and each quantized model; rows get deltas against the float one."""
    if not quantized_dirs:
        raise QuantmintError("report compares a float model with at least one quantized checkpoint")
    reference, reference_embeddings = evaluate_model(Path(float_dir), options)
    rows = [reference]
    for q in quantized_dirs:
        row, _ = evaluate_model(Path(q), options, reference_embeddings)
        for key, _label in _METRICS:
            if (
                key in row
                and key in reference
                and isinstance(reference[key], (int, float))
                and reference[key]
            ):
                row[f"{key}_delta"] = row[key] - reference[key]
                row[f"{key}_delta_pct"] = 100.0 * (row[key] / reference[key] - 1)
        rows.append(row)
    kv_key = f"kv_cache_bytes_{options.kv_tokens}"
    return {"rows": rows, "kv_key": kv_key, "options": vars(options)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    metrics = [
        (k, label)
        for k, label in (*_METRICS, (report["kv_key"], "KV-cache bytes"))
        if any(k in r for r in rows)
    ]
    header = "| metric | " + " | ".join(f"{r['scheme']}<br>`{Path(r['model']).name}`" for r in rows) + " |"
    lines = [header, "| --- |" + " ---: |" * len(rows)]
    for key, label in metrics:
        cells = []
        for r in rows:
            if key not in r:
                cells.append("")
                continue
            cell = _fmt(r[key])
            if f"{key}_delta_pct" in r:
                cell += f" ({r[f'{key}_delta_pct']:+.2f}%)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("block_ptq"):
            lines += [
                "",
                f"Block PTQ, `{Path(r['model']).name}`: output MSE of each block vs float "
                f"(tuning {_fmt(r.get('calibration_seconds'))} s, "
                f"peak RSS {_fmt(r.get('calibration_peak_rss_mb'))} MB)",
                "",
                "| block | RTN | PTQ | PTQ / RTN | kept |",
                "| ---: | ---: | ---: | ---: | --- |",
            ]
            for e in r["block_ptq"]:
                ratio = e["ptq_mse"] / e["rtn_mse"] if e["rtn_mse"] else float("nan")
                lines.append(
                    f"| {e['block']} | {e['rtn_mse']:.4g} | {e['ptq_mse']:.4g} | {ratio:.3f} | {e['kept']} |"
                )
    failed = [r for r in rows if r.get("vllm_error")]
    if failed:
        lines.append("")
        lines += [f"vLLM did not serve `{Path(r['model']).name}`: {r['vllm_error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    accuracy_key = next(
        (k for k in ("ppl", "squad_f1", "embedding_cosine", "lee_pearson") if all(k in r for r in rows)), None
    )
    if accuracy_key is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(rows):
        point = (r["checkpoint_bytes"] / 1e6, r[accuracy_key])
        ax.scatter(*point)
        # Quantized checkpoints share one size: stagger their labels so they stay readable.
        ax.annotate(r["scheme"], point, textcoords="offset points", xytext=(6, 4 - 11 * (i % 3)))
    ax.set_xlabel("checkpoint size (MB)")
    ax.set_ylabel(accuracy_key + (" (lower is better)" if accuracy_key == "ppl" else ""))
    ax.set_title("accuracy vs size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_block_mse(report: dict[str, Any], path: Path) -> bool:
    """Per-block output MSE, RTN vs block PTQ, for every block-PTQ checkpoint of the report."""
    tuned = [r for r in report["rows"] if r.get("block_ptq")]
    if not tuned:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in tuned:
        blocks = [e["block"] for e in r["block_ptq"]]
        name = f"{r['scheme']} ({Path(r['model']).name})"
        (line,) = ax.plot(blocks, [e["rtn_mse"] for e in r["block_ptq"]], "--", label=f"{name}: RTN")
        # The block as saved: tuned, or RTN where tuning did not beat it (marked x).
        final = [e["ptq_mse"] if e["kept"] == "ptq" else e["rtn_mse"] for e in r["block_ptq"]]
        ax.plot(blocks, final, "-", color=line.get_color(), label=f"{name}: PTQ (as saved)")
        kept_rtn = [(e["block"], e["rtn_mse"]) for e in r["block_ptq"] if e["kept"] != "ptq"]
        if kept_rtn:
            ax.plot(*zip(*kept_rtn, strict=True), "x", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("block output MSE vs float")
    ax.set_title("block PTQ vs round-to-nearest, per block")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write report.md, report.json and report.png (and block_mse.png for block-PTQ checkpoints) into
    `out_dir`; the plots need matplotlib."""
    from quantmint.formats.hf import staged_directory

    out = Path(out_dir)
    # A report directory (or an empty one) is replaced; the models compared are never written over.
    inputs = [row.get("model") for row in report.get("rows", [])]
    with staged_directory(out, overwrite=True, inputs=inputs) as tmp:
        (tmp / "report.md").write_text(to_markdown(report))
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plotted = _plot(report, tmp / "report.png")
        block_plot = _plot_block_mse(report, tmp / "block_mse.png")
    files = {"markdown": str(out / "report.md"), "json": str(out / "report.json")}
    if plotted:
        files["plot"] = str(out / "report.png")
    if block_plot:
        files["block_mse_plot"] = str(out / "block_mse.png")
    return files
