"""Runtimes for quantized checkpoints: `torch` (reference, CPU and GPU) and, later, `vllm`."""
