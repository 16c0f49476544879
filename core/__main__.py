"""`python -m quantmint ...`: the `quantmint` command (what torchrun starts: `torchrun ... -m quantmint`)."""

import sys

from quantmint.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
