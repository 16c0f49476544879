"""Quantization math: pure tensor functions (`quant_math`) and the native kernels that speed them up,
each with a torch fallback (`native` builds C sources from `csrc/`; `native_rtn` is the RTN kernel)."""
