"""`quantmint serve`, added to the CLI by the vLLM backend through the `register_commands` hook: core's CLI
names no backend. The command exists whether vLLM is installed or not, and says which package to install
when it is not."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from quantmint.errors import QuantmintError
from quantmint.tools.cli import POSITIVE, int_at_least

__all__ = ["add_commands"]

INSTALL_HINT = "vLLM is not installed: pip install 'quantmint[vllm]' (see docs/serving.md)"


def add_commands(subparsers: Any) -> None:
    s = subparsers.add_parser("serve", help="serve a checkpoint with vLLM's OpenAI-compatible server")
    s.add_argument("model", help="quantmint checkpoint (or any model directory vLLM loads)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int_at_least(1, 65535), default=8000, help="port (default 8000)")
    s.add_argument("--max-model-len", type=POSITIVE, help="longest prompt + completion in tokens")
    s.add_argument("--dtype", default="auto", help="activation dtype: auto, bfloat16, float32 (default auto)")
    s.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "float"],
        help="auto: a C8 checkpoint gets vLLM's fp8 KV cache scaled by its calibrated K/V ranges; "
        "float: a float KV cache instead",
    )
    s.add_argument(
        "--tensor-parallel-size",
        type=POSITIVE,
        default=1,
        help="vLLM worker processes sharing every layer (default 1); on a one-socket CPU the cores are "
        "split among them",
    )
    s.add_argument("--no-eager", action="store_true", help="let vLLM compile (slower start, faster decode)")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: more vLLM server arguments")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise QuantmintError(INSTALL_HINT) from None
    from quantmint.backends.vllm.serve import serve_command

    cmd, env = serve_command(
        args.model,
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        kv_cache=args.kv_cache,
        eager=not args.no_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        extra=args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args,
    )
    print(" ".join(cmd), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)  # the server takes this process's PID: signals reach it directly
