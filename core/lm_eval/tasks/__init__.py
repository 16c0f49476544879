"""Task configs of `python -m quantmint.lm_eval` (YAML, read by lm-eval through `--include_path`)."""
