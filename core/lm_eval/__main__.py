"""`python -m quantmint.lm_eval ...`: lm-eval's CLI with quantmint imported first (see the package)."""

import sys

from quantmint.lm_eval import exit_after_vllm, main, uses_vllm

if __name__ == "__main__":
    status = main()
    if uses_vllm(sys.argv[1:]):
        exit_after_vllm(status)
    sys.exit(status)
