"""Algorithm modules that the PTQ algorithm assembles (Golden Stick's layered design).

Each module lives in its own file and works on a `ModelLayout`, so every model family gets it through
the structure its plugin declares.
"""

from quantmint.algorithms.base import Algorithm, AlgorithmBase, BlockContext, recipe_from_data
from quantmint.algorithms.ptq import PTQ, QuantState, quantize
from quantmint.algorithms.rtn import RoundToNearest

__all__ = [
    "PTQ",
    "Algorithm",
    "AlgorithmBase",
    "BlockContext",
    "QuantState",
    "RoundToNearest",
    "quantize",
    "recipe_from_data",
]
