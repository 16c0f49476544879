"""Online Hadamard rotation of a linear's input (QuaRot-style), for int8 activations without outliers.

A linear `y = x W^T` computes the same function as `y = (x H)(W H)^T` for any orthogonal `H`. With `H` a
normalised Hadamard matrix, `x H` spreads every outlier channel of `x` over all channels, so per-token int8
rounding of `x H` loses far less than rounding `x` itself; `W H` is folded into the weight once, before the
weight is quantized, and only `x H` is computed at run time. quantmint rotates the inputs of the linears
a family declares in `ModelFamily.hadamard_linears`: those after a nonlinearity (`mlp.down_proj`), whose
input channels SmoothQuant cannot fold into the layer before.

`hadamard_matrix(n)` builds a Hadamard matrix of order `n` as a Kronecker product of a power of two
(Sylvester) and, where needed, one Paley matrix: of order q + 1 for a prime q ≡ 3 (mod 4) (12, 20, 24,
44, ...), else of order 2(q + 1) for a prime q ≡ 1 (mod 4) (28, 36, 60, 148, ...). That covers the
widths of most models (576 = 72·8, 1536 = 12·128, 14336 = 224·64, 18944 = 148·128). A width no
construction reaches, such as Llama-2-7B's 11008 = 43·256, is rotated block by block: `I_k ⊗ H_m` for
the largest order `m` dividing it that is built here (`rotation_block(n)`; 11008 → 43 blocks of 256),
still orthogonal, each outlier spread over its block of `m` channels. A width without such a block of at
least `MIN_BLOCK` channels is refused with the reason. `hadamard_transform` applies the rotation factor
by factor (one small matmul per factor), so the run-time cost is a fraction of the linear's own.

The construction is part of the checkpoint format: a checkpoint lists only which linears are rotated,
and every reader rebuilds the matrix from the width, so the order of factors chosen for a width never
changes (tests pin them).
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
    "rotation_block",
    "supports_hadamard",
]

# Largest power-of-two factor applied as one dense matmul: larger powers are split (Kronecker).
_MAX_DENSE = 256
# Largest Paley factor: a bigger one would cost more per element than the linear it serves.
_MAX_PALEY = 256
# Smallest block of a block-diagonal rotation (a width with no Hadamard matrix of its own order): fewer
# channels would spread an outlier too little to be worth the run-time cost.
MIN_BLOCK = 64


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley_order(order: int) -> bool:
    """Whether order - 1 is a prime q ≡ 3 (mod 4) (Paley's first construction)."""
    q = order - 1
    return q > 2 and q % 4 == 3 and _is_prime(q)


def _paley2_order(order: int) -> bool:
    """Whether order = 2(q + 1) for a prime q ≡ 1 (mod 4) (Paley's second construction)."""
    q = order // 2 - 1
    return order % 2 == 0 and q % 4 == 1 and _is_prime(q)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i), the quadratic character mod the prime q (0 on the diagonal)."""
    squares = {x * x % q for x in range(1, q)}
    return torch.tensor(
        [[0 if i == j else (1 if (j - i) % q in squares else -1) for j in range(q)] for i in range(q)],
        dtype=torch.float64,
    )


@functools.cache
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.cache
def _paley(order: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(order - 1)
    return s + torch.eye(order, dtype=torch.float64)


@functools.cache
def _paley2(order: int) -> torch.Tensor:
    """Paley construction II: a Hadamard matrix of order 2(q + 1) for a prime q ≡ 1 (mod 4), from the
    symmetric conference matrix C of order q + 1: C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    half = order // 2
    c = torch.zeros(half, half, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(half - 1)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(half, dtype=torch.float64), minus)


def _odd_factor(rest: int, power: int, limit: int) -> tuple[torch.Tensor, int] | None:
    """A Paley matrix of order rest * 2^a (rest odd, 2^a dividing `power`, order <= limit) and 2^a; the
    first construction is tried for every a before the second, so that the orders chosen for widths
    the first alone covered never change (see the module's note on the checkpoint format)."""
    for build, fits in ((_paley, _paley_order), (_paley2, _paley2_order)):
        a = 0
        while (rest << a) <= limit and (power >> a) >= 1:
            if fits(rest << a):
                return build(rest << a), 1 << a
            a += 1
    return None


@functools.cache
def _factors(n: int) -> tuple[torch.Tensor, ...] | None:
    if n < 1:
        return None
    power = n & -n  # the largest power of two dividing n
    rest = n // power
    factors = []
    if rest > 1:
        found = _odd_factor(rest, power, min(n, _MAX_PALEY))
        if found is None:
            return None
        factors.append(found[0])
        power //= found[1]
    while power > 1:
        size = min(power, _MAX_DENSE)
        factors.append(_sylvester(size))
        power //= size
    return tuple(factors) or (torch.ones(1, 1, dtype=torch.float64),)


def hadamard_factors(n: int) -> list[torch.Tensor] | None:
    """Unnormalised ±1 Hadamard matrices (float64) whose Kronecker product, in order, has order `n`;
    None when no construction here reaches `n` (see `rotation_block` for what is done then)."""
    factors = _factors(n)
    return None if factors is None else list(factors)


@functools.cache
def rotation_block(n: int) -> int | None:
    """The order m of the Hadamard blocks that rotate width `n`: `n` itself where a Hadamard matrix of
    order n is built here, else the largest divisor m >= MIN_BLOCK of n that has one (the rotation is
    then I_(n/m) ⊗ H_m); None when there is none."""
    if _factors(n) is not None:
        return n
    for m in range(n // 2, MIN_BLOCK - 1, -1):
        if n % m == 0 and _factors(m) is not None:
            return m
    return None


def supports_hadamard(n: int) -> bool:
    """Whether width `n` can be rotated (by a Hadamard matrix of order n, or block by block)."""
    return rotation_block(n) is not None


def _factors_or_raise(n: int) -> tuple[torch.Tensor, ...]:
    """The factors of the rotation's blocks for width `n` (their orders multiply to `rotation_block(n)`)."""
    block = rotation_block(n)
    if block is None:
        raise ValueError(
            f"no Hadamard rotation of width {n} can be built here (orders 2^k·(q + 1) for a prime "
            f"q ≡ 3 mod 4 or 2^k·2(q + 1) for a prime q ≡ 1 mod 4, q + 1 <= {_MAX_PALEY}, or blocks of such "
            f"an order of at least {MIN_BLOCK} that divide the width): leave algorithm_args.hadamard off "
            "for this model"
        )
    factors = _factors(block)
    assert factors is not None
    return factors


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal (`H @ H.T = I`) matrix of width `n` that `hadamard_transform` applies: the
    normalised Hadamard matrix of order n, or block-diagonal `I_(n/m) ⊗ H_m` (`rotation_block`)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for factor in _factors_or_raise(n):
        h = torch.kron(h, factor)
    block = h.shape[0]
    h = torch.kron(torch.eye(n // block, dtype=torch.float64), h)
    return (h / block**0.5).to(dtype)


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
    factor. Where the factors' orders multiply to a block m < n, each run of m channels is rotated alone
    (H = I_(n/m) ⊗ H_m). Half-precision inputs are rotated in float32 and returned in their own dtype."""
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
