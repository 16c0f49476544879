"""Named configs: the seeds' combination list and the block PTQ, GPTQ and 4-bit presets."""

from __future__ import annotations

from quantmint.config.base import QuantArgs
from quantmint.config.ptq_config import PTQConfig
from quantmint.config.steps import AlgorithmArgs, BlockLossKind, BlockPTQArgs, GPTQArgs
from quantmint.errors import ConfigError

# The seeds' combination list: RTN W8A16, SmoothQuant W8A8, C8, W8A16+C8, SmoothQuant+C8.
# SmoothQuant presets search alpha per block on this grid, scoring each alpha's rounded block on one
# sample of each of the first 4 calibration batches (4 x 512 tokens on SmolLM2): the search then costs a
# fraction of the float calibration pass, and its choice held on wikitext-2 and on a text the calibration
# never saw as well as scoring every sample of those batches (docs/benchmarks.md, "Calibration speed and
# a second text"). The per-pair search (`smooth_alpha_search: pair`) fitted the calibration text more.
_SMOOTH_SEARCH = AlgorithmArgs(smooth_alpha_grid=[0.5, 0.6, 0.7, 0.8], smooth_search_samples=4)
_SMOOTH_SEARCH_ROTATED = AlgorithmArgs(**{**_SMOOTH_SEARCH.model_dump(), "hadamard": "auto"})
_INT4_GROUPS = QuantArgs(num_bits=4, strategy="group", group_size=128)
_INT4_ASYM_GROUPS = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=128)


def _signround(steps: int, loss: BlockLossKind, **more: float) -> BlockPTQArgs:
    """Block PTQ by SignRound: `steps` a block, no warm-up, 16 batches compared, tuned and kept by `loss`."""
    return BlockPTQArgs(
        n_outer_loops=steps,
        rounding_method="signround",
        warmup_ratio=0.0,
        compare_batches=16,
        loss=loss,
        **more,
    )


PRESETS: dict[str, PTQConfig] = {
    "w8a16": PTQConfig(weight_dtype="int8"),
    # W8A8 rotates the down projection's input where the model allows (`hadamard: auto`): the only
    # setting measured within +0.25% on wikitext-2 and +0.5% on a second text (SmolLM2: +0.22% / +0.48%,
    # unrotated +0.33% / +1.02%; docs/benchmarks.md, "Calibration speed and a second text"). Such a
    # checkpoint is served by the quantmint plugin; `--no-hadamard` makes one that exports to
    # compressed-tensors (vLLM runs no online rotation of a quantized layer on a CPU).
    "w8a8": PTQConfig(
        weight_dtype="int8",
        activation_dtype="int8",
        outliers_suppression="smooth",
        algorithm_args=_SMOOTH_SEARCH_ROTATED,
    ),
    "c8": PTQConfig(weight_dtype=None, kvcache_dtype="int8"),
    "w8a16-c8": PTQConfig(weight_dtype="int8", kvcache_dtype="int8"),
    # W8A8-C8 keeps the unrotated search: its goal is SQuAD F1 (within one point of float, met: -0.64 over
    # 1,500 questions), and the rotation with the alpha search scored no better there (-2.22 against the
    # unrotated preset's -2.24, measured before C8 observed K/V at the cache); `--hadamard` adds it.
    "w8a8-c8": PTQConfig(
        weight_dtype="int8",
        activation_dtype="int8",
        kvcache_dtype="int8",
        outliers_suppression="smooth",
        algorithm_args=_SMOOTH_SEARCH,
    ),
    # 4-bit weights in groups of 128 (RTN), and block PTQ of the int8 and int4 schemes.
    "w4a16": PTQConfig(weight_dtype="int4", weights=_INT4_GROUPS),
    # W8A8 block PTQ: the alpha search of `w8a8` with the down projection's input Hadamard-rotated where
    # the model allows (`hadamard: auto`), then SignRound's 40 steps, tuned and kept by `loss: auto`: the
    # token-relative error (what the next RMSNorm passes on) for a rotated block: on SmolLM2 +0.02%
    # (second text +0.36%) in 9.6 minutes, where AdaRound's 300 steps by MSE took 28 minutes to +0.12%.
    # Without the rotation that error alone lost to `w8a8` (+0.72%), so an un-rotated block keeps the
    # whole output's relative error in the sum: +0.23% (second text +0.75%) in 7.5 minutes
    # (docs/benchmarks.md, "The w8a8-ptq preset"). W4A16 keeps the MSE in its sum: the token-relative
    # error alone failed at 4 bits.
    "w8a8-ptq": PTQConfig(
        weight_dtype="int8",
        activation_dtype="int8",
        outliers_suppression="smooth",
        algorithm_args=_SMOOTH_SEARCH_ROTATED,
        block_ptq=_signround(40, "auto", lr_weight_clip=0.003),
    ),
    "w8a16-ptq": PTQConfig(weight_dtype="int8", block_ptq=BlockPTQArgs()),
    # SignRound, 60 steps: on SmolLM2 +12.0% in 7 minutes where AdaRound's 300 steps took 29 minutes to
    # +17.2%, and tuned by the sum of the output's relative error and the token-relative one: +9.5%, and
    # lower on a second text too (docs/benchmarks.md, "Block PTQ speed"); `w8a16-ptq` keeps AdaRound.
    "w4a16-ptq": PTQConfig(
        weight_dtype="int4",
        weights=_INT4_GROUPS,
        block_ptq=_signround(60, "mse+token_relative"),
    ),
    # GPTQ's rounding on the same grids as RTN's w4a16 (groups of 128) and w8a16 (per channel).
    "w4a16-gptq": PTQConfig(weight_dtype="int4", weights=_INT4_GROUPS, gptq=GPTQArgs()),
    "w8a16-gptq": PTQConfig(weight_dtype="int8", gptq=GPTQArgs()),
    # Asymmetric 4-bit groups of 128 (a zero point per group, GPTQModel's and llm-compressor's W4A16_ASYM).
    "w4a16-asym": PTQConfig(weight_dtype="int4", weights=_INT4_ASYM_GROUPS),
    "w4a16-asym-gptq": PTQConfig(weight_dtype="int4", weights=_INT4_ASYM_GROUPS, gptq=GPTQArgs()),
}


def get_preset(name: str) -> PTQConfig:
    """The preset config called `name` (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
