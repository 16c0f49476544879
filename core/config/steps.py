"""The steps of a quantization recipe: `AlgorithmConfig` (the base of every algorithm's config, a
third-party algorithm's too) and the built-in algorithms' step configs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from quantmint.config.base import QuantArgs, StrictConfig

# How a rounded block's output is measured against the float one (`block_ptq.block_loss`): block
# PTQ's `loss` and the SmoothQuant block search's `smooth_search_loss`.
LossKind = Literal["mse", "token_relative", "mse+token_relative"]
# Block PTQ's may also be "auto": chosen per block by whether it is rotated (`BlockPTQ.block_loss_kind`).
BlockLossKind = Literal["mse", "token_relative", "mse+token_relative", "auto"]


class AlgorithmConfig(StrictConfig):
    """One step of a quantization recipe: plain data naming its algorithm (`name`, the key under which
    an `Algorithm` is registered, see `quantmint.algorithms.base`).

    `check(recipe)` refuses a step that does not fit the rest of the recipe (raise ValueError with the
    fix); it runs when a `PTQConfig` is built and again when `PTQ` runs a recipe.

    What a step contributes to the config that holds it (all optional):

    - `scheme_tag()`: its part of the scheme name (`w8a16`, `c8`, `ptq`; '' for none), joined with `-`
      in recipe order (`PTQConfig.scheme_name`);
    - `mindformers_method`: the MindFormers `quant_method` a recipe with this step needs at least (a
      recipe maps onto the last of `PTQConfig._MF_METHODS` its steps name; '' for any; None, the
      default, when MindFormers' quantization_config cannot name this step);
    - `ptq_fields()`: the `PTQConfig` keys this step stands for (the inverse of `PTQConfig.recipe()`),
      filled in when a config is written as a `recipe:` list.
    """

    name: ClassVar[str] = ""
    mindformers_method: ClassVar[str | None] = None

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        """Raise ValueError when this step cannot run with the rest of `recipe`."""

    def scheme_tag(self) -> str:
        """This step's part of the scheme name ('' for none)."""
        return ""

    def ptq_fields(self) -> dict[str, Any]:
        """The `PTQConfig` keys this step stands for (`algorithm_args` entries are merged)."""
        return {}


class AlgorithmArgs(StrictConfig):
    """Knobs of the algorithm modules (the seeds' `algorithm_args`)."""

    smooth_alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    # Non-empty: pick alphas from this grid, as `smooth_alpha_search` says:
    # - "block" (default): one alpha per block, the one whose quantized block output is closest (MSE) to
    #   the float block's on its first `smooth_search_batches` calibration batches (the block is rounded
    #   and re-run once per grid point);
    # - "pair": one alpha per smoothing pair, the one whose smoothed, rounded linears' outputs are closest
    #   (squared error) to their float outputs on 1024 of their calibration input tokens, taken evenly
    #   from the block's first `smooth_search_batches` batches: several times faster, but it favours
    #   larger alphas that fit the calibration text (docs/benchmarks.md, "Calibration speed and a second
    #   text"), so it is not the presets' choice.
    smooth_alpha_grid: list[float] = Field(default_factory=list, max_length=101)
    smooth_search_batches: int = Field(default=4, ge=1, le=1 << 20)
    # The block search: how many samples per grid point, the first ceil(n / smooth_search_batches) of
    # each of those batches (0: all their samples). Its cost is linear in them.
    smooth_search_samples: int = Field(default=0, ge=0, le=1 << 20)
    smooth_alpha_search: Literal["block", "pair"] = "block"
    # The block search's measure of a rounded block's output against the float one (`block_ptq.loss`'s
    # kinds): "mse" lets the few tokens of huge norm (an attention sink) decide every block's alpha;
    # "token_relative" divides each token's error by its float output's mean square.
    smooth_search_loss: LossKind = "mse"
    # W8A8: a linear whose calibration inputs hold a token with a range this many times the median token's
    # keeps float activations (W8A16 for that layer); None quantizes every activation.
    w8a16_outlier_ratio: float | None = Field(default=None, gt=1.0, le=1e9)
    # Rotate the inputs of the family's `hadamard_linears` (the MLP down projection) by a Hadamard
    # matrix online, folding it into their weights (see `quantmint.algorithms.rotation`); those linears leave
    # their smoothing pair. For int8 activations. true: every such linear, or refuse the model (a family
    # that declares none, a width that cannot be rotated); "auto": those that can be, the others left
    # as they are with a log line saying why.
    hadamard: bool | Literal["auto"] = False

    @field_validator("hadamard", mode="before")
    @classmethod
    def _hadamard_value(cls, value: Any) -> Any:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError(f"use true, false or auto, not {value!r}")

    @field_validator("smooth_alpha_grid")
    @classmethod
    def _grid_in_range(cls, value: list[float]) -> list[float]:
        bad = [a for a in value if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"smooth_alpha_grid values must lie in [0, 1], got {bad}")
        return value

    # Written only when not the default: configs and checkpoints keep the bytes they had before the key.
    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("smooth_alpha_search") == "block":
            del data["smooth_alpha_search"]
        if data.get("smooth_search_samples") == 0:
            del data["smooth_search_samples"]
        if data.get("smooth_search_loss") == "mse":
            del data["smooth_search_loss"]
        return data


class BlockPTQArgs(AlgorithmConfig):
    """Block-sequential PTQ (quant_method `ptq`): tune each block against its float output.

    The knobs of FMS Model Optimizer's PTQ, under names that say what they are:

    | here | FMS | meaning |
    | ---- | --- | ------- |
    | n_batches | ptq_nbatch | calibration batches cached per block |
    | batch_size | ptq_batchsize | samples per batch (one optimizer step) |
    | n_outer_loops | ptq_nouterloop | optimizer steps per block |
    | cosine_lr | ptq_coslr | parameter groups on a cosine schedule: W (weights), A (activations), WA |
    | lr_weight | ptq_lrw | Adam lr of the AdaRound rounding variables (they live in about ±3) |
    | lr_weight_clip | ptq_lrcv_w | Adam lr of the weight scales (log space: 1e-2 ≈ 1% per step) |
    | lr_act_clip | ptq_lrcv_a | Adam lr of static activation scales (log space) |

    Defaults were picked on 4-bit blocks: on tiny Llama blocks lr_weight 1.0 gave a tuned MSE of
    0.32-0.36x RTN's in 100 steps where 0.1 gave 0.9x, and round_reg 0.01 left the rounding soft, so
    hardening undid the gain; on SmolLM2's first two blocks lr_weight 0.3 did better than 1.0 (0.38 and
    0.65x RTN vs 0.74 and 0.44x); 0.5 sits between. Steps: on those two blocks with 64 samples, 300
    steps gave 0.49 and 0.47x RTN where 100 steps left 6 of the first 8 blocks no better than RTN.
    """

    n_batches: int = Field(default=64, ge=1, le=1 << 20)
    batch_size: int = Field(default=2, ge=1, le=1 << 16)
    n_outer_loops: int = Field(default=300, ge=1, le=1 << 24)
    cosine_lr: Literal["none", "W", "A", "WA"] = "WA"
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Learning rates: finite (no inf/nan anywhere, see StrictConfig) and at most 1e3; 0 freezes those scales.
    lr_weight: float = Field(default=0.5, gt=0.0, le=1e3)
    lr_weight_clip: float = Field(default=1e-2, ge=0.0, le=1e3)
    lr_act_clip: float = Field(default=1e-3, ge=0.0, le=1e3)
    # AdaRound: weight of the regulariser that drives each rounding variable to 0 or 1, its exponent
    # annealed from beta_start to beta_end, and the share of steps before it is switched on.
    round_reg: float = Field(default=10.0, ge=0.0, le=1e9)
    beta_start: float = Field(default=20.0, gt=0.0, le=1e6)
    beta_end: float = Field(default=2.0, gt=0.0, le=1e6)
    round_reg_warmup: float = Field(default=0.2, ge=0.0, lt=1.0)
    # "float": each block learns from the float model's inputs; "quantized": from the outputs of the
    # already-quantized blocks before it (BRECQ / QDrop), the target staying the float output.
    inputs: Literal["float", "quantized"] = "float"
    # Where cached block inputs/outputs live: "memory", "disk" (safetensors files, one batch in RAM at a
    # time) or "auto" (disk when the cache would take more than a quarter of the free RAM).
    cache: Literal["auto", "memory", "disk"] = "auto"
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    # Early stop: the last `holdout_batches` calibration batches are held out of training, and every
    # `eval_every` steps the block, its rounding hardened as it will be frozen, is run on them; tuning
    # stops after `patience` checks without a new best held-out MSE and keeps the best state seen
    # (the RTN start included), so `n_outer_loops` is then a ceiling. Off: exactly `n_outer_loops`
    # steps over every batch, the behaviour before these keys existed.
    early_stop: bool = False
    eval_every: int = Field(default=10, ge=1, le=1 << 24)
    patience: int = Field(default=3, ge=1, le=1 << 24)
    holdout_batches: int = Field(default=4, ge=1, le=1 << 20)
    # How the rounding is learned. "adaround": AdaRound's soft rounding variables, Adam at `lr_weight`,
    # annealed to 0/1 by the regulariser (`round_reg`, `beta_*`). "signround": SignRound (AutoRound's
    # rounding): an offset V in [-0.5, 0.5] added before round-to-nearest, with straight-through
    # gradients, moved by signed gradient steps of `sign_lr` grid units (0: 1 / n_outer_loops), decayed
    # as the W group's schedule; it starts exactly at RTN and is always hard, so the block trained is
    # the block frozen, and `lr_weight` and the regulariser are unused.
    rounding_method: Literal["adaround", "signround"] = "adaround"
    sign_lr: float = Field(default=0.0, ge=0.0, le=1.0)
    # RTN's and the tuned block's output MSE (which decide the block kept, and scale the loss) are
    # measured on the first `compare_batches` calibration batches; 0: on all of them.
    compare_batches: int = Field(default=0, ge=0, le=1 << 20)
    # What a block is tuned, and kept, by: "mse", the mean squared error of its output against the float
    # output; "token_relative", each token's squared error over the mean square of that token's float
    # output (the error the next block's or the final RMSNorm/LayerNorm sees, to first order), so that
    # a few tokens of huge norm (an attention sink) do not decide the whole block; "mse+token_relative",
    # the whole output's relative squared error plus the token-relative one (the sink still counts);
    # "auto", token_relative for a block with a rotated linear (`algorithm_args.hadamard`) and
    # mse+token_relative for one without (what measured best in each case; the report names the choice).
    loss: BlockLossKind = "mse"

    name: ClassVar[str] = "block_ptq"
    mindformers_method: ClassVar[str | None] = "ptq"

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        if not any(isinstance(s, RoundToNearestConfig) for s in recipe):
            raise ValueError("block_ptq tunes quantized weights: set weight_dtype, or drop block_ptq")

    def scheme_tag(self) -> str:
        return "ptq"

    def ptq_fields(self) -> dict[str, Any]:
        return {"block_ptq": self.model_dump(mode="json")}

    # Written only when set off their defaults: configs (and checkpoints) that do not use these keys keep the
    # bytes they had before these keys existed; reading them back gives the defaults again.
    _LATER_KEYS: ClassVar[tuple[str, ...]] = (
        "early_stop",
        "eval_every",
        "patience",
        "holdout_batches",
        "rounding_method",
        "sign_lr",
        "compare_batches",
        "loss",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self._LATER_KEYS:
            if key in data and getattr(self, key) == type(self).model_fields[key].default:
                del data[key]
        return data

    @model_validator(mode="after")
    def _check(self) -> BlockPTQArgs:
        if self.beta_end > self.beta_start:
            raise ValueError("beta is annealed downwards: beta_end must not exceed beta_start")
        return self


def quantizes_activations(recipe: list[AlgorithmConfig]) -> bool:
    return any(isinstance(s, RoundToNearestConfig) and s.activations is not None for s in recipe)


class HadamardConfig(AlgorithmConfig):
    """Online Hadamard rotation of the family's `hadamard_linears` (see `quantmint.algorithms.rotation`);
    `auto`: only those that can be rotated, where `false` refuses a model with others (a family that
    declares none, a width with no rotation)."""

    name: ClassVar[str] = "hadamard"
    auto: bool = False

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        if not quantizes_activations(recipe):
            raise ValueError(
                "algorithm_args.hadamard rotates activations before they are quantized: set "
                "activation_dtype: int8, or hadamard: false"
            )

    def ptq_fields(self) -> dict[str, Any]:
        return {"algorithm_args": {"hadamard": "auto" if self.auto else True}}

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if not self.auto:  # written only when set: recipes keep the bytes they had before the key
            del data["auto"]
        return data


class SmoothQuantConfig(AlgorithmConfig):
    """SmoothQuant: migrate activation outliers into the weights, alpha fixed or searched per smoothing
    pair (see `AlgorithmArgs.smooth_alpha_grid`)."""

    name: ClassVar[str] = "smooth_quant"
    mindformers_method: ClassVar[str | None] = "smooth_quant"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    alpha_grid: list[float] = Field(default_factory=list, max_length=101)
    search_batches: int = Field(default=4, ge=1, le=1 << 20)
    search_samples: int = Field(default=0, ge=0, le=1 << 20)  # 0: every sample of those batches
    search: Literal["block", "pair"] = "block"
    search_loss: LossKind = "mse"  # the block search's

    @field_validator("alpha_grid")
    @classmethod
    def _grid_in_range(cls, value: list[float]) -> list[float]:
        bad = [a for a in value if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"alpha_grid values must lie in [0, 1], got {bad}")
        return value

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("search") == "block":  # the default, written nowhere (as `smooth_alpha_search`)
            del data["search"]
        if data.get("search_samples") == 0:  # likewise
            del data["search_samples"]
        if data.get("search_loss") == "mse":  # likewise
            del data["search_loss"]
        return data

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        if not quantizes_activations(recipe):
            raise ValueError(
                "outliers_suppression 'smooth' only helps when activations are quantized: "
                "set activation_dtype: int8 or outliers_suppression: none"
            )

    def ptq_fields(self) -> dict[str, Any]:
        return {
            "outliers_suppression": "smooth",
            "algorithm_args": {
                "smooth_alpha": self.alpha,
                "smooth_alpha_grid": list(self.alpha_grid),
                "smooth_search_batches": self.search_batches,
                "smooth_search_samples": self.search_samples,
                "smooth_alpha_search": self.search,
                "smooth_search_loss": self.search_loss,
            },
        }


class RoundToNearestConfig(AlgorithmConfig):
    """Weights rounded to nearest (and int8 activations, static or dynamic, when `activations` is set)."""

    name: ClassVar[str] = "rtn"
    mindformers_method: ClassVar[str | None] = ""
    weights: QuantArgs
    activations: QuantArgs | None = None
    w8a16_outlier_ratio: float | None = Field(default=None, gt=1.0, le=1e9)

    def scheme_tag(self) -> str:
        """The scheme of the rounded linears: `w8a16`, `w8a8`, `w4a16` or `w4a8` (see the cells), with
        `-asym` for asymmetric weights (zero points)."""
        asym = "" if self.weights.symmetric else "-asym"
        return f"w{self.weights.num_bits}a{8 if self.activations is not None else 16}{asym}"

    def ptq_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "weight_dtype": "int4" if self.weights.num_bits == 4 else "int8",
            "weights": self.weights.model_dump(mode="json"),
        }
        if self.activations is not None:
            fields.update(activation_dtype="int8", activations=self.activations.model_dump(mode="json"))
        if self.w8a16_outlier_ratio is not None:
            fields["algorithm_args"] = {"w8a16_outlier_ratio": self.w8a16_outlier_ratio}
        return fields


class GPTQArgs(StrictConfig):
    """GPTQ's knobs (Frantar et al., 2022), the `gptq:` key of a `PTQConfig` (see `GPTQConfig`).

    | key | meaning |
    | --- | ------- |
    | block_size | columns per lazy batch update (the paper's B = 128) |
    | damp_percent | dampening added to the Hessian's diagonal, as a share of its mean diagonal |
    | actorder | quantize columns in order of decreasing Hessian diagonal (static groups: the scales are
      those of the original column order, so the checkpoint layout stays ordinary) |
    | sequential | the next block calibrates on this block's quantized outputs (GPTQ's own flow) |
    | batch_size | calibration samples per forward pass while GPTQ drives calibration |
    """

    block_size: int = Field(default=128, ge=1, le=1 << 16)
    damp_percent: float = Field(default=0.01, gt=0.0, le=10.0)
    actorder: bool = False
    sequential: bool = True
    batch_size: int = Field(default=8, ge=1, le=1 << 16)

    def gptq_args(self) -> GPTQArgs:
        """The GPTQ knobs alone (of a `GPTQConfig` too)."""
        return GPTQArgs(**{key: getattr(self, key) for key in GPTQArgs.model_fields})


class GPTQConfig(RoundToNearestConfig, GPTQArgs):
    """GPTQ: the weights rounded column by column, each column's rounding error spread over the columns
    not yet rounded through the inverse Hessian of the layer's calibration inputs (see
    `quantmint.algorithms.gptq`). It takes the place of `rtn` in a recipe (same `weights`, `activations`
    and scheme: the checkpoint is an ordinary RTN-format one, only the integers differ)."""

    name: ClassVar[str] = "gptq"
    # MindFormers' quant_method is rtn, smooth_quant or ptq (the seeds' guide): none names GPTQ.
    mindformers_method: ClassVar[str | None] = None

    def check(self, recipe: list[AlgorithmConfig]) -> None:
        if any(isinstance(s, BlockPTQArgs) for s in recipe):
            raise ValueError("gptq and block_ptq both choose the rounding of the weights: keep one of them")

    def scheme_tag(self) -> str:
        return f"{super().scheme_tag()}-gptq"

    def ptq_fields(self) -> dict[str, Any]:
        return {**super().ptq_fields(), "gptq": self.gptq_args().model_dump(mode="json")}


class KVCacheConfig(AlgorithmConfig):
    """Static int8 K/V cache scales, measured on calibration data."""

    name: ClassVar[str] = "kv_cache"
    mindformers_method: ClassVar[str | None] = ""
    kvcache: QuantArgs

    def scheme_tag(self) -> str:
        return "c8"

    def ptq_fields(self) -> dict[str, Any]:
        return {"kvcache_dtype": "int8", "kvcache": self.kvcache.model_dump(mode="json")}
