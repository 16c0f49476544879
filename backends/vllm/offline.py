"""Run one model through vLLM offline in this process: the tests and benchmarks start it as a subprocess.

    python -m quantmint.backends.vllm.offline JOB.json
    -> last stdout line: {"start_s": ..., "results": [...]}

JOB: {"model": dir, "dtype": "float32", "max_model_len": 256, "runner": "generate" | "pooling",
      "model_impl": "auto" | "vllm" | "transformers",   # vLLM's own model class or its Transformers backend
      "skip_tokenizer_init": false,
      "tensor_parallel_size": 1,       # > 1: that many worker processes (cores split on one socket)
      "tasks": [{"kind": "generate", "prompts": [...], "max_tokens": 16},
                {"kind": "prompt_logprobs", "prompts": [...]},   # log p(prompt[i] | prompt[:i])
                {"kind": "prompt_top1", "prompts": [...]},       # argmax p(. | prompt[:i])
                {"kind": "embed", "prompts": [...]}]}
Prompts are strings or lists of token ids. A failure prints {"error": "..."} and exits 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Any

__all__ = ["run", "run_in_subprocess"]


def _prompts(items: list[Any]) -> list[Any]:
    return [{"prompt_token_ids": p} if isinstance(p, list) else p for p in items]


def run(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {
        "model": job["model"],
        "dtype": job.get("dtype", "float32"),
        "max_model_len": job.get("max_model_len", 256),
        "enforce_eager": True,
        "seed": 0,
        "trust_remote_code": False,  # never run Python shipped in a model directory
        # prompts given as token ids need no tokenizer (a checkpoint saved without one)
        "skip_tokenizer_init": bool(job.get("skip_tokenizer_init", False)),
    }
    if job.get("tensor_parallel_size", 1) > 1:
        kwargs["tensor_parallel_size"] = job["tensor_parallel_size"]
    if "model_impl" in job:
        kwargs["model_impl"] = job["model_impl"]
    if job.get("runner") == "pooling":
        kwargs["runner"] = "pooling"
        if "pooling" in job:
            from vllm.config import PoolerConfig

            kwargs["pooler_config"] = PoolerConfig(**job["pooling"])
    start = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - start
    results: list[Any] = []
    for task in job["tasks"]:
        prompts = _prompts(task["prompts"])
        t0 = time.perf_counter()
        if task["kind"] == "generate":
            params = SamplingParams(temperature=0.0, max_tokens=task.get("max_tokens", 16), ignore_eos=True)
            outs = llm.generate(prompts, params, use_tqdm=False)
            value: Any = [list(o.outputs[0].token_ids) for o in outs]
        elif task["kind"] == "prompt_logprobs":
            params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
            outs = llm.generate(prompts, params, use_tqdm=False)
            value = []
            for o in outs:
                rows = o.prompt_logprobs[1:]  # the first prompt token has none
                ids = o.prompt_token_ids[1:]
                value.append([row[t].logprob for row, t in zip(rows, ids, strict=True)])
        elif task["kind"] == "prompt_top1":  # vLLM's greedy choice after every prefix of each prompt
            params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
            outs = llm.generate(prompts, params, use_tqdm=False)
            value = [
                [min(row.items(), key=lambda kv: kv[1].rank)[0] for row in o.prompt_logprobs[1:]]
                for o in outs
            ]
        elif task["kind"] == "embed":
            outs = llm.embed(prompts, use_tqdm=False)
            value = [list(o.outputs.embedding) for o in outs]
        else:
            raise ValueError(f"unknown task kind {task['kind']!r}")
        results.append({"kind": task["kind"], "value": value, "seconds": time.perf_counter() - t0})
    return {"start_s": start_s, "results": results}


def run_in_subprocess(
    job: dict[str, Any],
    workdir: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run `job` in a fresh Python process (vLLM's state and environment stay out of the caller).

    Returns the job's JSON result, with the log lines that name quantmint under "quantmint_log", or
    {"error": ..., "traceback": ...} when it failed.
    """
    job_file = os.path.join(workdir, f"vllm-job-{os.getpid()}-{time.monotonic_ns()}.json")
    with open(job_file, "w") as f:
        json.dump(job, f)
    proc = subprocess.run(
        [sys.executable, "-m", "quantmint.backends.vllm.offline", job_file],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {
            "error": f"vLLM process exited {proc.returncode} with no result",
            "traceback": proc.stderr[-4000:],
        }
    out = json.loads(lines[-1])
    logged = proc.stderr.splitlines() + proc.stdout.splitlines()
    out["quantmint_log"] = [line for line in logged if "quantmint" in line and not line.startswith("{")]
    # vLLM's own count of the tokens its KV cache holds (its log line "... KV cache size: N tokens").
    sizes = [re.search(r"KV cache size: ([\d,]+) tokens", line) for line in logged]
    found = [int(m[1].replace(",", "")) for m in sizes if m]
    if found:
        out["kv_cache_tokens"] = found[-1]
    return out


def main() -> int:
    from quantmint.backends.vllm.serve import CPU_ENV_DEFAULTS, THREADS_BIND_ENV, cpu_thread_binding

    for key, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    with open(sys.argv[1]) as f:
        job = json.load(f)
    try:
        binding = cpu_thread_binding(job.get("tensor_parallel_size", 1))
        if binding is not None:
            os.environ[THREADS_BIND_ENV] = binding
        out = run(job)
    except Exception as exc:  # reported to the test, which shows it
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
