"""Online Hadamard rotation of a linear's input (QuaRot-style), for int8 activations without outliers.

A linear `y = x W^T` computes the same function as `y = (x H)(W H)^T` for any orthogonal `H`. With `H` a
normalised Hadamard matrix, `x H` spreads every outlier channel of `x` over all channels, so per-token int8
rounding of `x H` loses far less than rounding `x` itself; `W H` is folded into the weight once, before the
weight is quantized, and only `x H` is computed at run time. quantmint rotates the inputs of the linears
a family declares in `ModelFamily.hadamard_linears`: those after a nonlinearity (`mlp.down_proj`), whose
input channels SmoothQuant cannot fold into the layer before.

`hadamard_matrix(n)` builds a Hadamard matrix of order `n` as a Kronecker product of a power of two
(Sylvester) and, where needed, one Paley matrix of order q + 1 for a prime q ≡ 3 (mod 4) (12, 20, 24,
44, ...), which covers the widths of common models (576 = 72·8, 1536 = 12·128, 3072 = 12·256, 11008 =
43·256 is not: such a width is refused with the reason). `hadamard_transform` applies it factor by factor
(one small matmul per factor), so the run-time cost is a fraction of the linear's own.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from quantmint.extension.family import LinearAdapter

__all__ = [
    "apply_hadamard",
    "carry_rotation",
    "hadamard_factors_for",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_transform",
    "is_rotated",
    "mark_rotated",
    "rotate_linear",
    "supports_hadamard",
]

# Largest power-of-two factor applied as one dense matmul: larger powers are split (Kronecker).
_MAX_DENSE = 256
# Largest Paley factor: a bigger one would cost more per element than the linear it serves.
_MAX_PALEY = 256


def _paley_order(order: int) -> bool:
    """Whether order - 1 is a prime q ≡ 3 (mod 4)."""
    q = order - 1
    return q > 2 and q % 4 == 3 and all(q % d for d in range(2, int(q**0.5) + 1))


@functools.cache
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.cache
def _paley(order: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    q = order - 1
    squares = {x * x % q for x in range(1, q)}
    jacobsthal = torch.tensor(
        [[0 if i == j else (1 if (j - i) % q in squares else -1) for j in range(q)] for i in range(q)],
        dtype=torch.float64,
    )
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + torch.eye(order, dtype=torch.float64)


def hadamard_factors(n: int) -> list[torch.Tensor] | None:
    """Unnormalised ±1 Hadamard matrices (float64) whose Kronecker product, in order, has order `n`;
    None when no construction here reaches `n`."""
    if n < 1:
        return None
    power = n & -n  # the largest power of two dividing n
    rest = n // power
    factors = []
    if rest > 1:
        # rest * 2^a = q + 1 for a prime q ≡ 3 (mod 4), using as few powers of two as needed.
        a, limit = 0, min(n, _MAX_PALEY)
        while (rest << a) <= limit and not _paley_order(rest << a):
            a += 1
        if (rest << a) > limit:
            return None
        factors.append(_paley(rest << a))
        power >>= a
    while power > 1:
        size = min(power, _MAX_DENSE)
        factors.append(_sylvester(size))
        power //= size
    return factors or [torch.ones(1, 1, dtype=torch.float64)]


def supports_hadamard(n: int) -> bool:
    return hadamard_factors(n) is not None


def _factors_or_raise(n: int) -> list[torch.Tensor]:
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(
            f"no Hadamard matrix of order {n} can be built here (orders 2^k and 2^k * (q + 1) for a prime "
            "q ≡ 3 mod 4 are supported): leave algorithm_args.hadamard off for this model"
        )
    return factors


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised (orthogonal, `H @ H.T = I`) Hadamard matrix of order `n` that
    `hadamard_transform` applies."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for factor in _factors_or_raise(n):
        h = torch.kron(h, factor)
    return (h / n**0.5).to(dtype)


@functools.lru_cache(maxsize=64)
def _normalised_factors(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    return tuple((f / f.shape[0] ** 0.5).to(dtype=dtype, device=device) for f in _factors_or_raise(n))


def hadamard_factors_for(
    n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """The normalised factors `apply_hadamard` takes for width `n` (cached; a runtime keeps them on
    its layer so that no lookup happens in a compiled forward)."""
    return _normalised_factors(n, dtype, str(torch.device(device)))


def apply_hadamard(x: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`x @ H` for x [..., n] and the factors of H (`hadamard_factors_for(n)`), one small matmul per
    factor. Half-precision inputs are rotated in float32 and returned in their own dtype."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(-1, *(f.shape[0] for f in factors))
    # (A ⊗ B ⊗ ...) acting on a row vector: multiply each axis of the reshaped vector by its factor.
    for axis, factor in enumerate(factors):
        y = torch.movedim(torch.movedim(y, axis + 1, -1) @ factor.to(y.device, work), -1, axis + 1)
    return y.reshape(*lead, n).to(x.dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """`x @ hadamard_matrix(x.shape[-1])` for x [..., n] (see `apply_hadamard`)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return apply_hadamard(x, hadamard_factors_for(x.shape[-1], x.device, work))


# --- rotated linears ----------------------------------------------------------------------------
# A linear whose input is rotated carries this attribute and a forward pre-hook that rotates its input;
# whatever replaces it (fake-quant layer, int8 cell) gets both again through `carry_rotation`.
ROTATED_ATTR = "quantmint_hadamard"


def _rotate_input_hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (hadamard_transform(args[0]), *args[1:])


def is_rotated(module: nn.Module) -> bool:
    return bool(getattr(module, ROTATED_ATTR, False))


def mark_rotated(module: nn.Module) -> nn.Module:
    """Make `module` rotate its input (x -> x H) before computing; its weight must already be W H."""
    if not is_rotated(module):
        setattr(module, ROTATED_ATTR, True)
        module.register_forward_pre_hook(_rotate_input_hook)
    return module


def carry_rotation(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new`, rotating its input if `old` did (call when `new` replaces `old`)."""
    return mark_rotated(new) if is_rotated(old) else new


@torch.no_grad()
def rotate_linear(module: nn.Module, adapter: LinearAdapter) -> None:
    """Fold H into a float linear's weight (W -> W H, computed in float64) and rotate its input from now
    on: the module computes the same function, up to float rounding. Idempotent."""
    if is_rotated(module):
        return
    weight = adapter.weight(module)
    rotated = hadamard_transform(weight.detach().to(torch.float64)).to(weight.dtype)
    adapter.set_weight(module, rotated)
    mark_rotated(module)
