"""`python -m quantmint.lm_eval ...`: lm-eval's CLI with quantmint imported first (see the package)."""

import sys

from quantmint.lm_eval import main

if __name__ == "__main__":
    sys.exit(main())
