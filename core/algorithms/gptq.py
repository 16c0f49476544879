"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): each target linear's weight rounded column by column, the rounding error of a column
spread over the columns not yet rounded so that the layer's output on its calibration inputs moves least.

For a linear y = x W^T with calibration inputs X, GPTQ minimises ||W X^T - Q X^T||^2 column by column with
the Hessian H = 2/n sum x x^T (n tokens). Per block of the sequential engine:

1. `before_block`: a forward pre-hook on every target linear adds x^T x (float32 products summed in
   float64) as the block runs on the calibration batches; linears that read the very same input tensor
   (q/k/v, gate/up) share one sum. The hooks see the input as the linear does (after an online Hadamard
   rotation, before SmoothQuant's smoothing, which is folded into H below).
2. The block is smoothed as usual, then every target is rounded by `GPTQRounding.fake_linear`: the
   smoothed weight W s and the smoothed Hessian diag(1/s) H diag(1/s), dampened by `damp_percent` of its
   mean diagonal; the upper Cholesky factor of H^-1 drives the lazy updates in column blocks of
   `block_size`. Dead columns (input always zero, H_jj = 0) get H_jj = 1 and a zero weight, as in the
   reference implementation.
3. The scales are those of quantmint's RTN grid (`quant_math.weight_absmax`: per channel, per group of
   `group_size` columns, or per tensor; symmetric, or asymmetric 4-bit with a zero point per group on
   the unsigned grid [0, 15], `quant_math.qparams_asymmetric`), computed before the first column is
   rounded on the original column order (`actorder` permutes the columns by decreasing H_jj for the
   rounding only: static groups), so the checkpoint is an ordinary RTN-format one. Without `actorder`,
   a group's scale (and zero point) is taken when GPTQ reaches the group, from its columns as updated
   so far (the reference's behaviour).
4. With `sequential` (the default), GPTQ drives the engine itself and the next block calibrates on this
   block's quantized outputs, as the reference does.

A target that saw no calibration token (no Hessian) is rounded to nearest and listed in the calibration
report's `gptq_rtn_fallback`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from quantmint.algorithms.base import BlockContext, Rounding
from quantmint.algorithms.builtin import RTN
from quantmint.algorithms.calibration import run_sequential
from quantmint.algorithms.rtn import RoundToNearest
from quantmint.cells.fake_quant import FakeQuantLinear
from quantmint.config import AlgorithmConfig, PTQConfig, QuantArgs
from quantmint.config.steps import GPTQArgs, GPTQConfig
from quantmint.errors import QuantmintError
from quantmint.numerics import native_gptq, quant_math

if TYPE_CHECKING:
    import argparse

    from quantmint.algorithms.calibration import CalibrationReport
    from quantmint.algorithms.observers import InputObserver
    from quantmint.algorithms.ptq import BlockSteps
    from quantmint.extension.family import LinearAdapter, ModelFamily

__all__ = ["GPTQ", "GPTQRounding", "HessianStore", "gptq_quantize"]


class HessianStore:
    """x^T x and the token count of each hooked linear's input; linears reading the same input tensor
    share one sum (`alias`)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # float64 [in, in]
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}  # name -> the name whose sum it shares
        self._last: tuple[torch.Tensor, str] | None = None  # the input last added, and its owner

    def hook(self, name: str) -> Any:
        def observe(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            last = self._last
            same = last is not None and last[0] is x
            if name in self.alias:
                if not (same and last is not None and last[1] == self.alias[name]):
                    raise QuantmintError(
                        f"GPTQ: {name} shared the input of {self.alias[name]} on the first calibration "
                        "batch but not on a later one; this model's block computes differently per batch"
                    )
                return
            if same and name not in self.sums and last is not None:
                self.alias[name] = last[1]
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            xtx = (flat.T @ flat).double()
            if name in self.sums:
                self.sums[name] += xtx
                self.counts[name] += flat.shape[0]
            else:
                self.sums[name] = xtx
                self.counts[name] = flat.shape[0]
            self._last = (x, name)

        return observe

    def hessian(self, name: str) -> torch.Tensor | None:
        """H = 2/n sum x x^T (float64) of `name`'s input, or None when it saw no token."""
        owner = self.alias.get(name, name)
        n = self.counts.get(owner, 0)
        if not n:
            return None
        return self.sums[owner] * (2.0 / n)

    def remove(self) -> None:
        """Nothing: a handle of `BlockContext.handles` for `reduce` only (the hooks are removed apart)."""

    def reduce(self, world: Any, calls: int) -> None:
        """Data-parallel calibration: every rank's x^T x summed (float64) and token counts added."""
        if not world.distributed:
            return
        parts = world.gather(
            ({n: (tuple(t.shape), self.counts[n]) for n, t in self.sums.items()}, dict(self.alias))
        )
        for _, alias in parts:
            self.alias.update(alias)
        shapes = {n: shape for sums, _ in parts for n, (shape, _) in sums.items()}
        for name in sorted(shapes):
            total = self.sums.get(name)
            if total is None:
                total = torch.zeros(shapes[name], dtype=torch.float64)
            self.sums[name] = world.sum_(total)
            self.counts[name] = sum(sums[name][1] for sums, _ in parts if name in sums)
        self._last = None

    def forget(self, names: Any) -> None:
        for name in names:
            self.sums.pop(name, None)
            self.counts.pop(name, None)
            self.alias.pop(name, None)
        self._last = None


def _qparams(weight: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN's scales of `weight` (float32 [out or 1, groups], see `quant_math.weight_absmax`) and, for
    asymmetric weights, its zero points (int8, same shape; else None)."""
    if not args.symmetric:
        wmin, wmax = quant_math.weight_minmax(weight, args.strategy, args.group_size)
        return quant_math.qparams_asymmetric(wmin, wmax, args.num_bits)
    scale = quant_math.qparams_from_absmax(
        quant_math.weight_absmax(weight, args.strategy, args.group_size), args.num_bits
    )
    return scale, None


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    block_size: int = 128,
    damp_percent: float = 0.01,
    actorder: bool = False,
    name: str = "weight",
    use_native: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ's rounding of `weight` [out, in] given its input Hessian [in, in].

    Returns (q int8 [out, in], scale float32, zero_point) on quantmint's grid (`args`: bits, strategy,
    group_size, symmetric), the same shapes as `quant_math.quantize_weight`'s (symmetric: zero_point is
    None) or `quantize_weight_asymmetric`'s (q and zero_point int8 in [0, 2^b - 1]), so
    `quant_math.dequantize_weight(q, scale, dtype, group_size, zero_point)` is the rounded weight. The
    column loop runs in the native kernel (`quantmint.numerics.native_gptq`) where it can, else (or with
    `use_native=False`) in torch; both give the same integers, scales and zero points.
    """
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise QuantmintError(
            f"GPTQ of {name}: a Hessian of shape {tuple(hessian.shape)} for {columns} input columns"
        )
    asym = not args.symmetric
    # The grid: [-qmax, qmax] symmetric, [0, qmax] with a zero point asymmetric.
    qmax = quant_math.uint_range(args.num_bits)[1] if asym else 2 ** (args.num_bits - 1) - 1
    qmin = 0 if asym else -qmax
    group_size = args.group_size if args.strategy == "group" else None
    W = weight.detach().float().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # Static scales (every strategy but groups without actorder): from the weight as it is, in its own
    # column order. Dynamic groups: a group's scale is taken when GPTQ reaches it.
    dynamic_groups = group_size is not None and not actorder
    scale, zero = _qparams(W, args)
    col_scale = quant_math.expand_weight_scale(scale, W.shape, group_size).clone()
    # The zero points per column as float32 (exact integers), like the scales; None when symmetric.
    col_zero = None if zero is None else quant_math.expand_weight_scale(zero, W.shape, group_size).float()
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        col_scale = col_scale[:, perm]
        col_zero = None if col_zero is None else col_zero[:, perm]
    diag = torch.diag(H)
    damp = damp_percent * float(diag.mean())
    H[range(columns), range(columns)] = diag + damp
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float().contiguous()
    except torch.linalg.LinAlgError:
        raise QuantmintError(
            f"GPTQ of {name}: its input Hessian is not positive definite after dampening by "
            f"{damp_percent} of its mean diagonal: raise gptq.damp_percent (e.g. 0.1)"
        ) from None
    if not bool(torch.isfinite(Hinv).all()):
        raise QuantmintError(
            f"GPTQ of {name}: the inverse Hessian holds NaN or inf (calibration inputs with NaN or inf?): "
            "check the calibration data, or raise gptq.damp_percent"
        )
    Q = torch.zeros_like(W)
    # The native kernel (`numerics/csrc/gptq.c`) runs a block's column loop row by row; it needs every
    # dynamic group inside one block, and finite weights (the torch loop decides what NaN does).
    native = use_native and (not dynamic_groups or block_size % group_size == 0)  # type: ignore[operator]
    native = native and bool(torch.isfinite(W).all())
    col_scale = col_scale.contiguous()
    col_zero = None if col_zero is None else col_zero.contiguous()
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        if native:
            Err1 = torch.empty((W.shape[0], i2 - i1), dtype=W.dtype)
            group = group_size if dynamic_groups else 0
            if native_gptq.gptq_block(
                W[:, i1:i2],
                Hinv[i1:i2, i1:i2],
                col_scale[:, i1:i2],
                Q[:, i1:i2],
                Err1,
                i1,
                group or 0,
                qmax,
                None if col_zero is None else col_zero[:, i1:i2],
            ):
                if dynamic_groups:  # the block starts on a group: i1 is a multiple of block_size
                    for j in range(i1, i2, group_size):  # type: ignore[arg-type]
                        scale[:, j // group_size] = col_scale[:, j]  # type: ignore[operator]
                        if zero is not None and col_zero is not None:
                            zero[:, j // group_size] = col_zero[:, j].to(torch.int8)  # type: ignore[operator]
                W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
                continue
            native = False  # no kernel: the torch loop from here on
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic_groups and j % group_size == 0:  # type: ignore[operator]
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                if col_zero is None:
                    s = quant_math.qparams_from_absmax(group.abs().amax(dim=1), args.num_bits)
                else:
                    s, z = quant_math.qparams_asymmetric(group.amin(dim=1), group.amax(dim=1), args.num_bits)
                    zero[:, j // group_size] = z  # type: ignore[index,operator]
                    col_zero[:, j : j + group.shape[1]] = z.float()[:, None]
                scale[:, j // group_size] = s  # type: ignore[operator]
                col_scale[:, j : j + group.shape[1]] = s[:, None]
            w = W1[:, i]
            s = col_scale[:, j]
            if col_zero is None:
                q = torch.round(w / s).clamp_(qmin, qmax)
                err = (w - q * s) / Hinv1[i, i]
            else:
                z = col_zero[:, j]
                q = (torch.round(w / s) + z).clamp_(qmin, qmax)
                err = (w - (q - z) * s) / Hinv1[i, i]
            Q1[:, i] = q
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8), scale, zero


class GPTQRounding(RoundToNearest):
    """The `Rounding` of a `gptq` step: RTN's scheme, scales and activations, GPTQ's integers."""

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config.weights, config.activations, config.w8a16_outlier_ratio)
        self.gptq: GPTQArgs = config.gptq_args()
        self.hessians = HessianStore()
        self.fallback: list[str] = []  # targets rounded to nearest: no calibration token reached them
        self._current: tuple[str | None, torch.Tensor | None] = (None, None)

    @property
    def file_rounding(self) -> tuple[str, int] | None:
        return None  # GPTQ needs the block's calibration inputs: never rounded straight from the file

    def fake_linear(
        self,
        module: nn.Module,
        family: ModelFamily,
        observer: InputObserver | None,
        smoothing: torch.Tensor | None,
        convert_only: bool = False,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
        name: str | None = None,
    ) -> FakeQuantLinear:
        self._current = (name, smoothing)
        try:
            return super().fake_linear(
                module, family, observer, smoothing, convert_only=convert_only, quantized=quantized, name=name
            )
        finally:
            self._current = (None, None)

    def fake_quantize(
        self,
        module: nn.Module,
        adapter: LinearAdapter,
        scheme: str,
        convert_only: bool = False,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> FakeQuantLinear:
        name, smoothing = self._current
        hessian = None if name is None else self.hessians.hessian(name)
        if convert_only or quantized is not None or hessian is None:
            if not convert_only and quantized is None and name is not None and name not in self.fallback:
                self.fallback.append(name)
            return super().fake_quantize(
                module, adapter, scheme, convert_only=convert_only, quantized=quantized
            )
        weight = adapter.weight(module).detach()
        if smoothing is not None:  # the input is x / s from now on: H of x / s
            inv = 1.0 / smoothing.to(torch.float64)
            hessian = hessian * inv[:, None] * inv[None, :]
        knobs = self.gptq
        q, scale, zero_point = gptq_quantize(
            weight,
            hessian,
            self.args,
            block_size=knobs.block_size,
            damp_percent=knobs.damp_percent,
            actorder=knobs.actorder,
            name=name or type(module).__name__,
        )
        bias = adapter.bias(module)
        return FakeQuantLinear(
            weight=quant_math.dequantize_weight(q, scale, weight.dtype, self.args.group_size, zero_point),
            bias=None if bias is None else bias.detach().clone(),
            weight_scale=scale,
            scheme=scheme,
            source_type=type(module).__name__,
            group_size=self.args.group_size,
            weight_zero_point=zero_point,
        )


class GPTQ(RTN):
    """GPTQ's step: RTN's grid and deploy structure, the integers chosen by GPTQ from each block's
    calibration inputs (see the module docstring)."""

    config_type: ClassVar[type[AlgorithmConfig]] = GPTQConfig

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--gptq",
            action="store_true",
            help="round the weights by GPTQ instead of round-to-nearest, on the preset's grid (gptq: {}); "
            "calibrates, so it needs --calib",
        )

    def apply_cli_options(self, config: PTQConfig, args: argparse.Namespace) -> PTQConfig:
        if not getattr(args, "gptq", False) or config.gptq is not None:
            return config
        if "recipe" in config.to_dict():
            raise ValueError(
                "--gptq: this config lists its steps as a recipe: write its rtn step as {name: gptq, ...} "
                "there instead"
            )
        if config.weight_dtype is None:
            raise ValueError(
                "--gptq: this config rounds no weights (weight_dtype: null): pick a preset with weights, "
                "or drop --gptq"
            )
        if config.block_ptq is not None:
            raise ValueError(
                "--gptq: this config tunes the rounding by block PTQ: pick a preset without -ptq, or "
                "drop --gptq"
            )
        return config.with_updates(gptq={})

    def needs_calibration(self, config: AlgorithmConfig, recipe: list[AlgorithmConfig]) -> bool:
        return True

    def reads_rotated_inputs(self, config: AlgorithmConfig) -> bool:
        return True  # the Hessian of every target's input, rotated as its weight will be

    def rounding(self, config: AlgorithmConfig) -> Rounding | None:
        assert isinstance(config, GPTQConfig)
        return GPTQRounding(config)

    @staticmethod
    def _rounding_of(ctx: BlockContext) -> GPTQRounding:
        rounding = ctx.steps.ptq.rounding
        if not isinstance(rounding, GPTQRounding):
            raise QuantmintError("the gptq step runs only as the recipe's one weight-rounding step")
        return rounding

    def run(
        self, config: AlgorithmConfig, steps: BlockSteps, samples: list[torch.Tensor]
    ) -> CalibrationReport | None:
        """With `sequential`, drive the engine so that the next block gets this block's quantized
        outputs; otherwise leave it to the sequential engine (float outputs)."""
        assert isinstance(config, GPTQConfig)
        if not config.sequential:
            return None
        return run_sequential(
            steps.model,
            steps.layout,
            samples,
            steps.attach,
            lambda block, ctx, calls, outputs: steps.finish(block, ctx, calls, outputs) or True,
            batch_size=config.batch_size,
            desc="gptq",
            done=steps.done,
        )

    def before_block(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        store = self._rounding_of(ctx).hessians
        for name, module in ctx.block.linears.items():
            if name in ctx.steps.targets:
                ctx.handles.append(module.register_forward_pre_hook(store.hook(name)))
        ctx.handles.append(store)  # reduced across ranks in data-parallel calibration

    def after_round(self, config: AlgorithmConfig, ctx: BlockContext) -> None:
        rounding = self._rounding_of(ctx)
        rounding.hessians.forget(ctx.block.linears)
        if rounding.fallback:
            ctx.steps.extra["gptq_rtn_fallback"] = list(rounding.fallback)
