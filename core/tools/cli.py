"""The `quantmint` command line: quantize, eval, inspect, report, export, example-model, synth-model,
and the commands plugins add through the `register_commands` hook (the vLLM backend's `serve`).

Commands that a program would read print JSON on stdout; progress bars go to stderr. Bad input (a bad
command line, config, model directory or data file) and a failing filesystem (permissions, disk full,
read-only) end with a one-line reason on stderr, `quantmint COMMAND: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from quantmint.tools.memory import peak_rss_mb

__all__ = ["POSITIVE", "build_parser", "int_at_least", "main"]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantize a model; under torchrun, calibration is shared by the ranks and rank 0 writes the output
    (`quantmint.algorithms.distributed`)."""
    from quantmint.algorithms.distributed import launched

    with launched() as world:
        _quantize(args, world)


def _quantize(args: argparse.Namespace, world: Any) -> None:
    from quantmint.algorithms.base import algorithm_for
    from quantmint.algorithms.ptq import quant_state, quantize
    from quantmint.config import PTQConfig, get_preset
    from quantmint.formats.checkpoint import save_quantized
    from quantmint.io.models import load_float_model, load_tokenizer

    if args.workers is not None:
        raise _usage_error(
            "--workers was replaced by torchrun, which shares the shards (and calibration) among its ranks: "
            "torchrun --standalone --nproc-per-node N -m quantmint quantize ... (docs/distributed.md)"
        )
    config = PTQConfig.load(args.config) if args.config else get_preset(args.preset)
    if args.ignore:
        config = config.with_updates(ignore=[*config.ignore, *args.ignore])
    for algorithm in _algorithms():  # each algorithm's own options (SmoothQuant's --smooth-alpha, ...)
        try:
            config = algorithm.apply_cli_options(config, args)
        except ValueError as exc:
            raise _usage_error(str(exc)) from None
    limits = _model_limits(Path(args.model))
    if args.calib_seq_len is None:  # the default: 512 tokens, fewer for a model that takes fewer
        args.calib_seq_len = min(512, limits["positions"] or 512)
    elif args.calib and limits["positions"] is not None and args.calib_seq_len > limits["positions"]:
        raise _usage_error(
            f"--calib-seq-len {args.calib_seq_len} is longer than {args.model} takes: its config.json allows "
            f"{limits['positions']} positions ({limits['positions_key']}); pass --calib-seq-len "
            f"{limits['positions']} or less"
        )
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise _usage_error(f"output directory {out} already exists; pass --overwrite to replace it")
    from quantmint.io.outdir import prepare_output

    if world.is_main:  # the rank that writes -o checks it, before minutes of work: the -o rules
        prepare_output(out, [args.model], args.overwrite)
    start = time.perf_counter()
    stream = args.stream or _too_big_for_memory(Path(args.model))
    model = None if stream else load_float_model(args.model)
    has_tokenizer = (Path(args.model) / "tokenizer_config.json").exists()
    # Saved by copying its files; loaded only to tokenize calibration text (loading costs seconds).
    tokenizer = Path(args.model) if has_tokenizer else None
    calibration = None
    if args.calib:
        from quantmint.io.data import calibration_samples

        if tokenizer is None:
            raise _usage_error(f"--calib needs a tokenizer, and {args.model} has none")
        calibration = calibration_samples(
            args.calib,
            load_tokenizer(args.model),
            n_samples=args.calib_samples,
            seq_len=args.calib_seq_len,
            seed=args.calib_seed,
            kind=args.calib_kind,
            vocab_size=limits["vocab"],
        )
    loaded = time.perf_counter()
    work_dir = None
    if any(algorithm_for(step).resumable for step in config.recipe()):
        work_dir = Path(args.work_dir) if args.work_dir else out.parent / f".{out.name}.quantmint-work"
    if model is None:
        from quantmint.algorithms.streaming import quantize_checkpoint

        streamed = quantize_checkpoint(
            args.model,
            out,
            config,
            family=args.family,
            calibration=calibration,
            tokenizer=tokenizer,
            work_dir=work_dir,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
        if world.is_main:
            _print_json(_quantize_report(args, out, streamed, start, loaded, world))
        return
    quantize(model, config, family=args.family, calibration=calibration, work_dir=work_dir)
    quantized = time.perf_counter()
    if not world.is_main:  # rank 0 writes the checkpoint; every rank holds the same model
        return
    save_quantized(
        model, out, tokenizer=tokenizer, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )
    saved = time.perf_counter()
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = _quantize_report(args, out, None, start, loaded, world)
    report["seconds"] = {
        "load": round(loaded - start, 2),
        "quantize": round(quantized - loaded, 2),
        "save": round(saved - quantized, 2),
        "total": round(saved - start, 2),
    }
    report["calibration"] = quant_state(model).calibration
    _print_json(report)


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def _model_limits(model_dir: Path) -> dict[str, Any]:
    """The longest input (positions) and the vocabulary size config.json declares, None where it has none
    (a missing or broken config.json is left for loading to report)."""
    from quantmint.errors import QuantmintError
    from quantmint.formats.hf import read_config_json

    try:
        raw = read_config_json(model_dir)
    except (QuantmintError, ValueError):
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    key = next((k for k in _POSITION_KEYS if _is_count(raw.get(k))), None)
    return {
        "positions": raw[key] if key else None,
        "positions_key": key,
        "vocab": raw["vocab_size"] if _is_count(raw.get("vocab_size")) else None,
    }


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _too_big_for_memory(model_dir: Path) -> bool:
    """Whether the float checkpoint takes more than half the memory left: then it is streamed."""
    from quantmint.errors import QuantmintError
    from quantmint.formats.safetensors_io import CheckpointFiles
    from quantmint.tools.memory import available_memory_bytes

    try:
        size = sum(f.stat().st_size for f in CheckpointFiles(model_dir).files)
    except QuantmintError:
        return False  # loading will say what is wrong
    if size <= available_memory_bytes() // 2:
        return False
    print(
        f"quantmint: {model_dir} holds {size / 1e9:.1f} GB of weights, more than half the memory left: "
        "quantizing it out of core (--stream)",
        file=sys.stderr,
    )
    return True


def _quantize_report(
    args: argparse.Namespace,
    out: Path,
    streamed: dict[str, Any] | None,
    start: float,
    loaded: float,
    world: Any = None,
) -> dict[str, Any]:
    from quantmint.formats.summary import checkpoint_summary

    summary = checkpoint_summary(out)
    report = {
        "model": str(args.model),
        "output": str(out),
        "scheme": summary["scheme"],
        "family": summary["family"],
        "quantized_layers": summary["quantized_layers"],
        "quantized_linear_bytes": summary["quantized_linear_bytes"],
        "quantized_linear_bytes_bf16": summary["quantized_linear_bytes_bf16"],
        "quantized_linear_ratio_vs_bf16": summary["quantized_linear_ratio_vs_bf16"],
        "checkpoint_tensor_bytes": summary["tensor_bytes"],
        "checkpoint_tensor_bytes_bf16": summary["tensor_bytes_bf16"],
        "checkpoint_files_bytes": summary["checkpoint_files_bytes"],
        "peak_rss_mb": peak_rss_mb(),
    }
    if world is not None and world.distributed:  # rank 0's figures; every rank calibrated its share
        report["ranks"] = world.size
    if streamed is not None:
        seconds = round(time.perf_counter() - start, 2)
        report["streamed"] = {k: streamed[k] for k in ("mode", "ranks", "input_bytes")}
        report["seconds"] = {"load": round(loaded - start, 2), "quantize_and_save": streamed["seconds"]}
        report["seconds"]["total"] = seconds
        report["calibration"] = streamed["calibration"]
        report["peak_rss_mb"] = max(report["peak_rss_mb"], streamed["peak_rss_mb"])
    return report


def cmd_eval(args: argparse.Namespace) -> None:
    from quantmint.eval import (
        PERPLEXITY_WINDOWING,
        embedding_cosine,
        perplexity,
        read_documents,
        read_text,
        sentence_embeddings,
    )
    from quantmint.io.models import is_quantmint_checkpoint, load_model, load_tokenizer

    if not any((args.text, args.docs, args.squad, args.boolq, args.lee)):
        raise _usage_error(
            "nothing to evaluate: pass --text FILE (perplexity), --squad FILE, --boolq FILE, --lee DIR "
            "or --docs FILE --reference DIR"
        )
    if args.docs is not None and args.reference is None:
        raise _usage_error("--docs compares embeddings with a float model: also pass --reference FLOAT_DIR")
    start = time.perf_counter()
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    _check_tokenizer_fits(model, tokenizer, args.model)
    result: dict[str, Any] = {
        "model": str(args.model),
        "quantized": is_quantmint_checkpoint(args.model),
        "load_seconds": round(time.perf_counter() - start, 2),
    }
    # what each evaluation needs of the model, checked before any of them runs
    if args.text is not None and not _is_causal_lm(model):
        raise _usage_error(f"perplexity needs a causal LM; {type(model).__name__} is not one (use --docs)")
    if (args.squad or args.boolq) and not _is_causal_lm(model):
        raise _usage_error(f"SQuAD and BoolQ need a causal LM; {type(model).__name__} is not one")
    if (args.lee or args.docs is not None) and _is_causal_lm(model):
        raise _usage_error(
            f"--lee and --docs compare sentence embeddings of an encoder (e.g. BERT); {type(model).__name__} "
            "is a causal LM: evaluate it with --text, --squad or --boolq"
        )
    if args.text is not None:
        ppl = perplexity(
            model,
            tokenizer,
            read_text(args.text),
            max_tokens=args.max_tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
        )
        result.update({"text": str(args.text), **ppl, "windowing": PERPLEXITY_WINDOWING})
    if args.squad:
        from quantmint.eval.qa import squad_f1_em

        squad = squad_f1_em(model, tokenizer, args.squad, n=args.squad_n)
        result.update({"squad": str(args.squad), **{f"squad_{k}": v for k, v in squad.items()}})
    if args.boolq:
        from quantmint.eval.qa import boolq_accuracy

        boolq = boolq_accuracy(model, tokenizer, args.boolq, n=args.boolq_n)
        result.update({"boolq": str(args.boolq), **{f"boolq_{k}": v for k, v in boolq.items()}})
    if args.lee:
        from quantmint.eval.similarity import lee_correlation

        lee = lee_correlation(model, tokenizer, args.lee)
        result.update({"lee": str(args.lee), **{f"lee_{k}": v for k, v in lee.items()}})
    if args.docs is not None:
        docs = read_documents(args.docs)
        reference = load_model(args.reference)
        if _is_causal_lm(reference):
            raise _usage_error(
                f"--reference {args.reference} is a causal LM ({type(reference).__name__}): --docs compares "
                "with the float encoder the model was quantized from"
            )
        reference_tokenizer = load_tokenizer(args.reference)
        _check_tokenizer_fits(reference, reference_tokenizer, args.reference)
        started = time.perf_counter()
        ours = sentence_embeddings(model, tokenizer, docs)
        theirs = sentence_embeddings(reference, reference_tokenizer, docs)
        result.update(
            {
                "docs": str(args.docs),
                "reference": str(args.reference),
                **embedding_cosine(theirs, ours),
                "embedding_seconds": round(time.perf_counter() - started, 2),
            }
        )
    result["peak_rss_mb"] = peak_rss_mb()
    _print_json(result)


def _check_tokenizer_fits(model: Any, tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer that can produce ids the model's embedding has no row for (an IndexError
    deep in the forward pass otherwise)."""
    from quantmint.errors import QuantmintError

    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise QuantmintError(
            f"the tokenizer in {where} has {len(tokenizer):,} tokens but the model's embedding has "
            f"{rows:,} rows: ids beyond it cannot be scored; use the model's own tokenizer"
        )


def _is_causal_lm(model: Any) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def cmd_inspect(args: argparse.Namespace) -> None:
    from quantmint.formats.summary import checkpoint_summary

    summary = checkpoint_summary(args.checkpoint)
    if args.json:
        _print_json(summary)
        return
    width = max((len(layer["module"]) for layer in summary["layers"]), default=10)
    print(f"{summary['path']}: family {summary['family']}, scheme {summary['scheme']}")
    print(f"{'module':<{width}}  {'scheme':<7} {'weight':<22} {'bytes':>12} {'bf16 bytes':>12}")
    for layer in summary["layers"]:
        print(
            f"{layer['module']:<{width}}  {layer['scheme']:<7} {layer['weight']:<22} "
            f"{layer['bytes']:>12,} {layer['bytes_bf16']:>12,}"
        )
    ratio = summary["quantized_linear_ratio_vs_bf16"]
    print(
        f"quantized linears: {summary['quantized_layers']} layers, "
        f"{summary['quantized_linear_bytes']:,} bytes "
        f"vs {summary['quantized_linear_bytes_bf16']:,} in bf16 ({ratio:.2%})"
    )
    print(
        f"all tensors: {summary['tensor_bytes']:,} bytes vs {summary['tensor_bytes_bf16']:,} in bf16; "
        f"files on disk: {summary['checkpoint_files_bytes']:,} bytes"
    )


def cmd_report(args: argparse.Namespace) -> None:
    from quantmint.io.outdir import prepare_output
    from quantmint.tools.report import ReportOptions, build_report, to_markdown, write_report

    prepare_output(args.output, [args.float_model, *args.quantized], overwrite=True)
    options = ReportOptions(
        text=args.text,
        max_tokens=args.max_tokens,
        squad=args.squad,
        squad_n=args.squad_n,
        boolq=args.boolq,
        boolq_n=args.boolq_n,
        lee=args.lee,
        decode_tokens=args.decode_tokens,
        kv_tokens=args.kv_tokens,
        vllm=args.vllm,
    )
    report = build_report(args.float_model, args.quantized, options)
    files = write_report(report, args.output)
    print(to_markdown(report))
    print(json.dumps({"written": files}))


def cmd_export(args: argparse.Namespace) -> None:
    from quantmint.formats.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, fmt=args.format, overwrite=args.overwrite)
    _print_json({"output": str(out), "format": args.format})


def cmd_example_model(args: argparse.Namespace) -> None:
    from quantmint.tools.example_models import example_model_dir

    print(example_model_dir(args.name))


def cmd_plugins(args: argparse.Namespace) -> None:
    from quantmint.extension import registry

    rows = registry.plugins_info()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        package = f"{row['distribution']} {row['version']}" if row["distribution"] else "no package"
        print(f"{row['name']}  ({row['module']}, {package})")
        for kind in ("families", "algorithms", "runtimes", "commands"):
            if row[kind]:
                print(f"  {kind}: {', '.join(row[kind])}")


def cmd_check_family(args: argparse.Namespace) -> None:
    from quantmint.errors import QuantmintError, one_line
    from quantmint.testing import check_family

    results = check_family(args.model, family=args.family, vllm=False if args.skip_vllm else None)
    for result in results:
        print(one_line(result.line()))
    failed = [r.name for r in results if r.status == "fail"]
    if failed:
        raise QuantmintError(f"{len(failed)} check(s) failed: {', '.join(failed)}")


def cmd_synth_model(args: argparse.Namespace) -> None:
    from quantmint.tools.synthetic import make_synthetic_llama

    start = time.perf_counter()
    info = make_synthetic_llama(
        args.output,
        size=args.size,
        seed=args.seed,
        tokenizer_dir=args.tokenizer,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    _print_json({"output": args.output, **info, "seconds": round(time.perf_counter() - start, 2)})


class _UsageError(Exception):
    pass


def _usage_error(message: str) -> _UsageError:
    return _UsageError(message)


def int_at_least(minimum: int, maximum: int | None = None) -> Any:
    """An argparse `type`: a whole number in [minimum, maximum], else a usage error naming the bounds."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


POSITIVE = int_at_least(1)
"""An argparse `type`: a whole number of at least 1 (for plugins' commands too)."""


def build_parser() -> argparse.ArgumentParser:
    from quantmint.config import PRESETS
    from quantmint.tools.example_models import EXAMPLE_MODELS

    parser = argparse.ArgumentParser(prog="quantmint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a float Hugging Face model directory")
    q.add_argument("model", help="float Hugging Face model directory")
    q.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    group = q.add_mutually_exclusive_group()
    group.add_argument(
        "--preset", default="w8a16", choices=list(PRESETS), help="named config (default w8a16)"
    )
    group.add_argument(
        "--config", help="YAML config: quantmint's schema or a MindFormers quantization_config"
    )
    q.add_argument("--ignore", action="append", metavar="PATTERN", help="also leave this module in float")
    q.add_argument("--family", help="force a model family instead of matching the architecture")
    for algorithm in _algorithms():
        algorithm.add_cli_options(q)
    q.add_argument(
        "--calib",
        help='calibration data: a text file, JSON Lines of {"text": ...}, SQuAD v1.1 JSON or BoolQ JSONL',
    )
    q.add_argument(
        "--calib-kind",
        choices=("auto", "text", "jsonl", "squad", "boolq"),
        default="auto",
        help="how to read --calib (default auto: .json is SQuAD, .jsonl documents or BoolQ by its first "
        "record, anything else plain text)",
    )
    q.add_argument("--calib-samples", type=POSITIVE, default=128, help="calibration samples (default 128)")
    q.add_argument(
        "--calib-seq-len",
        type=int_at_least(2),
        help="tokens per sample, at most (default 512, or the model's max positions if fewer)",
    )
    q.add_argument(
        "--calib-seed",
        type=int_at_least(0, 2**63 - 1),
        default=0,
        help="seed of the sample draw (default 0)",
    )
    q.add_argument("--max-shard-size", default="2GB", help="split safetensors shards above this size")
    q.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    q.add_argument(
        "--work-dir",
        help="block PTQ: where tuned blocks are kept so that a killed run, started again with the same "
        "command, resumes (default: .<output name>.quantmint-work beside the output; removed on success)",
    )
    q.add_argument(
        "--stream",
        action="store_true",
        help="never load the whole model: RTN streams tensor by tensor, calibration loads one block at a "
        "time (automatic when the weights take more than half the free memory)",
    )
    q.add_argument("--workers", help=argparse.SUPPRESS)  # replaced by torchrun: refused with the command
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a float or quantized model (JSON)")
    e.add_argument("model", help="quantmint checkpoint or float model directory")
    e.add_argument(
        "--text", help='UTF-8 text file (e.g. wikitext-2 test.txt), JSON Lines of {"text": ...} or SQuAD JSON'
    )
    e.add_argument(
        "--max-tokens", type=int_at_least(2), default=32768, help="score the first N tokens (default 32768)"
    )
    e.add_argument(
        "--seq-len", type=int_at_least(2), default=512, help="window length in tokens (default 512)"
    )
    e.add_argument("--batch-size", type=POSITIVE, default=4, help="windows per forward pass (default 4)")
    e.add_argument("--squad", help="SQuAD v1.1 JSON: F1/EM of greedy answers (causal LMs)")
    e.add_argument("--squad-n", type=POSITIVE, default=500, help="first N questions (default 500)")
    e.add_argument("--boolq", help="BoolQ JSONL: yes/no accuracy by log-likelihood (causal LMs)")
    e.add_argument("--boolq-n", type=POSITIVE, help="first N questions (default all)")
    e.add_argument("--lee", help="Lee corpus directory: embedding similarity vs human ratings (encoders)")
    e.add_argument("--docs", help="one document per line: compare sentence embeddings with --reference")
    e.add_argument("--reference", help="float model directory to compare embeddings against")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="schemes per layer and bytes before/after")
    i.add_argument("checkpoint", help="quantmint checkpoint directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser(
        "report", help="compare a float model with quantized checkpoints (Markdown, JSON, PNG)"
    )
    r.add_argument("float_model", help="the float model directory")
    r.add_argument("quantized", nargs="+", help="quantmint checkpoint directories")
    r.add_argument("-o", "--output", required=True, help="directory for report.md, report.json, report.png")
    r.add_argument("--text", help="perplexity text, e.g. wikitext-2 test.txt")
    r.add_argument(
        "--max-tokens", type=int_at_least(2), default=32768, help="perplexity tokens (default 32768)"
    )
    r.add_argument("--squad", help="SQuAD v1.1 dev JSON for F1/EM")
    r.add_argument("--squad-n", type=POSITIVE, default=500, help="first N SQuAD questions (default 500)")
    r.add_argument("--boolq", help="BoolQ JSONL for accuracy")
    r.add_argument("--boolq-n", type=POSITIVE, help="first N BoolQ questions (default all)")
    r.add_argument("--lee", help="Lee corpus directory (lee.cor, similarities0-1.txt) for encoders")
    r.add_argument("--decode-tokens", type=POSITIVE, default=64, help="greedy tokens timed for decode speed")
    r.add_argument(
        "--kv-tokens", type=POSITIVE, default=512, help="tokens generated to measure KV-cache bytes"
    )
    r.add_argument(
        "--vllm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also serve each causal model with vLLM (perplexity on the same windows, decode tok/s); "
        "default: when vLLM is installed",
    )
    r.set_defaults(func=cmd_report)

    xp = sub.add_parser("export", help="write a checkpoint in another format (compressed-tensors)")
    xp.add_argument("checkpoint", help="quantmint checkpoint directory")
    xp.add_argument("-o", "--output", required=True, help="output directory")
    xp.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"])
    xp.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    xp.set_defaults(func=cmd_export)

    x = sub.add_parser("example-model", help="print the local directory of a shipped example model")
    x.add_argument(
        "name", choices=list(EXAMPLE_MODELS), help="; ".join(f"{k}: {v}" for k, v in EXAMPLE_MODELS.items())
    )
    x.set_defaults(func=cmd_example_model)

    s = sub.add_parser("synth-model", help="write a synthetic Llama-shaped checkpoint of a given size")
    s.add_argument("output", help="directory to create")
    s.add_argument("--size", default="2GB", help="bf16 weight bytes, e.g. 500MB, 2GB, 8GB (default 2GB)")
    s.add_argument("--tokenizer", help="copy this model directory's tokenizer (sets the vocabulary)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    s.add_argument("--max-shard-size", default="2GB", help="split safetensors shards above this size")
    s.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    s.set_defaults(func=cmd_synth_model)

    pl = sub.add_parser("plugins", help="list installed plugins, their packages and what each registered")
    pl.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    pl.set_defaults(func=cmd_plugins)

    cf = sub.add_parser("check-family", help="check that a model family plugin fits a float model directory")
    cf.add_argument("model", help="float Hugging Face model directory")
    cf.add_argument("--family", help="check this family instead of the one matching the model's class")
    cf.add_argument(
        "--skip-vllm",
        action="store_true",
        help="skip serving the w8a16 checkpoint with vLLM (run when vLLM is installed; about a minute)",
    )
    cf.set_defaults(func=cmd_check_family)
    _add_plugin_commands(sub)
    return parser


def _algorithms() -> list[Any]:
    """The registered algorithms, each once, in name order."""
    from quantmint.algorithms.base import algorithms

    unique = {id(a): a for _, a in sorted(algorithms().items())}
    return list(unique.values())


def _add_plugin_commands(sub: Any) -> None:
    """Commands that plugins add through the `register_commands` hook (a serving backend's `serve`)."""
    from quantmint.errors import PluginError
    from quantmint.extension import registry

    for impl in registry.get_plugin_manager().hook.register_commands.get_hookimpls():
        before = dict(sub.choices)
        try:
            impl.function(subparsers=sub)
            taken = sorted(name for name, parser in before.items() if sub.choices[name] is not parser)
        except argparse.ArgumentError as exc:  # Python >= 3.11 refuses a name taken already
            taken = [str(exc)]
        if taken:
            raise PluginError(
                f"plugin {impl.plugin_name!r} adds a command the CLI has already ({', '.join(taken)}); "
                f"uninstall it or leave it out of {registry.PLUGINS_ENV}"
            )


def _os_error_message(exc: OSError) -> str:
    """An OSError in words: what failed, on which path (`[Errno 28] ...` reads as `No space left ...`)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{reason}: {' -> '.join(paths)}" if paths else reason


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status 0 on success; 2 with one line on stderr for any input or filesystem
    error (`QuantmintError`, a usage error, an `OSError`); argparse's own errors also exit with 2."""
    from quantmint.errors import QuantmintError, one_line

    try:
        parser = build_parser()
    except QuantmintError as exc:  # a plugin that fails to load or adds a command twice
        print(one_line(f"quantmint: error: {exc}"), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _UsageError as exc:  # SystemExit(2), as argparse's own errors
        parser.exit(2, one_line(f"quantmint {args.command}: error: {exc}") + "\n")
    except QuantmintError as exc:
        print(one_line(f"quantmint {args.command}: error: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:
        print(one_line(f"quantmint {args.command}: error: {_os_error_message(exc)}"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
