"""Block-sequential PTQ: tuned blocks beat RTN, determinism, resume after SIGKILL, disk cache, config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_tiny, byte_tokenizer, model_output, tiny_config
from safetensors.torch import load_file

from quantmint.algorithms.ptq import PTQ, quant_state, quantize
from quantmint.config import PTQConfig, get_preset
from quantmint.errors import ConfigError
from quantmint.formats.checkpoint import CALIBRATION_NAME, load_quantized, save_quantized
from quantmint.numerics import quant_math

FAST = {"n_outer_loops": 60, "batch_size": 4, "n_batches": 4}


def _calibration(n: int = 16, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=generator) for _ in range(n)]


def _config(preset: str, **block_ptq: object) -> PTQConfig:
    config = get_preset(preset)
    weights = config.weights.model_dump()
    if weights["strategy"] == "group":
        weights["group_size"] = 32  # the tiny models are 64 wide: two groups per row
    assert config.block_ptq is not None
    return config.with_updates(
        weights=weights, block_ptq={**config.block_ptq.model_dump(), **FAST, **block_ptq}
    )


def _block_log(model: torch.nn.Module) -> list[dict]:
    state = quant_state(model)
    assert state is not None and state.calibration is not None
    return state.calibration["block_ptq"]["blocks"]


@pytest.mark.parametrize(
    ("family", "preset"),
    [("llama", "w4a16-ptq"), ("llama", "w8a8-ptq"), ("gpt2", "w4a16-ptq"), ("bert", "w8a16-ptq")],
)
def test_tuned_blocks_beat_rtn_on_every_block(family: str, preset: str, input_ids: torch.Tensor) -> None:
    model = quantize(build_tiny(family), _config(preset), calibration=_calibration())
    log = _block_log(model)
    assert len(log) == 2
    for entry in log:
        assert entry["kept"] == "ptq", entry
        assert entry["ptq_mse"] < 0.9 * entry["rtn_mse"], entry
    # The frozen model is an ordinary quantmint model: real cells, close to float.
    reference = model_output(build_tiny(family), input_ids)
    assert quant_math.sqnr_db(reference, model_output(model, input_ids)) > 15


def test_tuned_model_is_closer_to_float_than_rtn(input_ids: torch.Tensor) -> None:
    config = _config("w4a16-ptq", n_outer_loops=150)
    calibration = _calibration(32)
    reference = model_output(build_tiny("llama"), input_ids)
    tuned = quantize(build_tiny("llama"), config, calibration=calibration)
    rtn = quantize(build_tiny("llama"), config.with_updates(block_ptq=None))
    assert quant_math.sqnr_db(reference, model_output(tuned, input_ids)) > quant_math.sqnr_db(
        reference, model_output(rtn, input_ids)
    )


def test_frozen_weights_are_plain_int_tensors_on_their_grid() -> None:
    model = quantize(build_tiny("llama"), _config("w4a16-ptq"), calibration=_calibration())
    cell = model.model.layers[0].mlp.down_proj
    assert cell.scheme == "w4a16" and cell.weight_packed.dtype == torch.int32
    q = cell.weight
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 7


def test_same_seed_gives_identical_tensors() -> None:
    config = _config("w8a8-ptq", n_outer_loops=30)
    first = quantize(build_tiny("llama"), config, calibration=_calibration()).state_dict()
    second = quantize(build_tiny("llama"), config, calibration=_calibration()).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("inputs", ["float", "quantized"])
def test_disk_cache_gives_the_same_model_as_memory(inputs: str) -> None:
    memory = quantize(
        build_tiny("llama"), _config("w4a16-ptq", cache="memory", inputs=inputs), calibration=_calibration()
    )
    disk = quantize(
        build_tiny("llama"), _config("w4a16-ptq", cache="disk", inputs=inputs), calibration=_calibration()
    )
    assert quant_state(disk).calibration["block_ptq"]["cache"] == "disk"
    a, b = memory.state_dict(), disk.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_inputs_mode_tunes_against_float_targets() -> None:
    model = quantize(
        build_tiny("llama"), _config("w4a16-ptq", inputs="quantized"), calibration=_calibration()
    )
    log = _block_log(model)
    assert all(e["ptq_mse"] < e["rtn_mse"] for e in log)
    assert quant_state(model).calibration["block_ptq"]["inputs"] == "quantized"


def test_checkpoint_round_trip_and_log(tmp_path: Path, input_ids: torch.Tensor) -> None:
    model = quantize(build_tiny("llama"), _config("w4a16-ptq"), calibration=_calibration())
    out = save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(out)
    assert torch.equal(model_output(model, input_ids), model_output(loaded, input_ids))
    log = json.loads((out / CALIBRATION_NAME).read_text())["block_ptq"]["blocks"]
    assert [e["block"] for e in log] == [0, 1]


def test_work_dir_of_another_config_restarts_with_a_notice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished work dir of another config is not resumed: the run starts afresh and says so (the
    CLI's default work dir follows -o, so a new config quantized to the same output lands there)."""
    work = tmp_path / "work"
    quantize(
        build_tiny("llama"), _config("w4a16-ptq", n_outer_loops=10), calibration=_calibration(), work_dir=work
    )
    capsys.readouterr()
    config = _config("w4a16-ptq", n_outer_loops=11)
    again = quantize(build_tiny("llama"), config, calibration=_calibration(), work_dir=work)
    assert "another model, config or calibration set" in capsys.readouterr().err
    assert quant_state(again).calibration["block_ptq"]["resumed_at_block"] is None
    fresh = quantize(build_tiny("llama"), config, calibration=_calibration()).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in again.state_dict().items())


def test_finished_work_dir_reloads_without_tuning(tmp_path: Path) -> None:
    work = tmp_path / "work"
    config = _config("w4a16-ptq", n_outer_loops=20)
    first = quantize(build_tiny("llama"), config, calibration=_calibration(), work_dir=work).state_dict()
    again = quantize(build_tiny("llama"), config, calibration=_calibration(), work_dir=work)
    assert quant_state(again).calibration["block_ptq"]["resumed_at_block"] == 2
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())


# --- resume after SIGKILL, through the CLI ------------------------------------------------------
def _deep_llama(path: Path) -> Path:
    """A 4-block tiny Llama, so that a kill lands between blocks."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _quantize_command(model: Path, out: Path, config: Path, text: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "quantmint.tools.cli",
        "quantize",
        str(model),
        "--config",
        str(config),
        "-o",
        str(out),
        "--calib",
        str(text),
        "--calib-samples",
        "16",
        "--calib-seq-len",
        "48",
    ]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    model = _deep_llama(tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    config = tmp_path / "ptq.yaml"
    config.write_text(_config("w4a16-ptq", n_outer_loops=400).to_yaml())
    env = {**os.environ, "TQDM_DISABLE": "1"}

    reference = tmp_path / "reference"
    subprocess.run(
        _quantize_command(model, reference, config, text), check=True, env=env, capture_output=True
    )

    out = tmp_path / "resumed"
    work = tmp_path / ".resumed.quantmint-work"
    command = _quantize_command(model, out, config, text)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = work / "progress.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.exists() and json.loads(progress.read_text()).get("next_block", 0) >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed; raise n_outer_loops"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not out.exists()
    done = json.loads(progress.read_text())["next_block"]
    assert 1 <= done < 4

    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert report["calibration"]["block_ptq"]["resumed_at_block"] == done
    assert not work.exists(), "the work directory is removed once the checkpoint is saved"
    a, b = _tensors(reference), _tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), (
        "the resumed checkpoint differs from the uninterrupted one"
    )


# --- config ---------------------------------------------------------------------------------------
def test_block_ptq_config_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="block_ptq: .*unknown key 'n_outer_loop'"):
        PTQConfig(block_ptq={"n_outer_loop": 10})
    with pytest.raises(ConfigError, match="beta_end must not exceed beta_start"):
        PTQConfig(block_ptq={"beta_start": 2, "beta_end": 20})
    with pytest.raises(ConfigError, match="block_ptq tunes quantized weights"):
        PTQConfig(weight_dtype=None, kvcache_dtype="int8", block_ptq={})
    with pytest.raises(ConfigError, match="n_outer_loops"):
        PTQConfig(block_ptq={"n_outer_loops": 0})
    with pytest.raises(ConfigError, match="block_ptq: .*invalid value 'both' for 'inputs'"):
        PTQConfig(block_ptq={"inputs": "both"})
    with pytest.raises(ConfigError, match="contradicts weight_dtype int4"):
        PTQConfig(weight_dtype="int4", weights={"num_bits": 8})
    with pytest.raises(ConfigError, match="strategy 'group' and group_size go together"):
        PTQConfig(weight_dtype="int4", weights={"strategy": "group"})
    with pytest.raises(ConfigError, match="for weights only"):
        PTQConfig(
            activation_dtype="int8", activations={"strategy": "group", "group_size": 32, "dynamic": True}
        )


def test_int4_dtype_sets_four_bits_and_round_trips() -> None:
    config = PTQConfig(weight_dtype="int4", weights={"strategy": "group", "group_size": 64})
    assert config.weights.num_bits == 4 and config.scheme_name == "w4a16"
    assert PTQConfig.from_yaml(config.to_yaml()) == config


def test_mindformers_ptq_is_block_ptq() -> None:
    config = PTQConfig.from_mindformers(
        {
            "quant_method": "ptq",
            "weight_dtype": "int8",
            "activation_dtype": "int8",
            "outliers_suppression": "smooth",
            "algorithm_args": {"alpha": 0.6, "n_outer_loops": 500, "lr_weight": 0.3},
        }
    )
    assert config.block_ptq is not None and config.block_ptq.n_outer_loops == 500
    assert config.algorithm_args.smooth_alpha == 0.6
    assert PTQConfig.from_mindformers(config.to_mindformers()) == config
    with pytest.raises(ConfigError, match="n_outer_loops"):
        PTQConfig.from_mindformers({"quant_method": "rtn", "algorithm_args": {"n_outer_loops": 5}})


def test_without_calibration_block_ptq_says_what_to_pass() -> None:
    with pytest.raises(ConfigError, match="needs calibration data"):
        PTQ(_config("w4a16-ptq")).apply(build_tiny("llama"))


def test_block_ptq_runs_on_top_of_the_alpha_search() -> None:
    config = _config("w8a8-ptq").with_updates(algorithm_args={"smooth_alpha_grid": [0.3, 0.8]})
    model = quantize(build_tiny("llama"), config, calibration=_calibration())
    calibration = quant_state(model).calibration
    assert len(calibration["smooth_alpha_per_block"]) == 2
    assert set(calibration["smooth_alpha_per_block"]) <= {0.3, 0.8}
    assert all(e["ptq_mse"] < e["rtn_mse"] for e in calibration["block_ptq"]["blocks"])


def test_resume_fingerprint_hashes_the_recipe_and_what_it_quantizes() -> None:
    from quantmint.algorithms.block_ptq import _fingerprint
    from quantmint.algorithms.ptq import BlockSteps, QuantState

    model = build_tiny("llama")
    samples = _calibration(2)

    def fingerprint(config: PTQConfig) -> str:
        ptq = PTQ(config)
        layout = ptq.layout(model)
        targets = ptq.targets(layout)
        state = QuantState(config=ptq.config, family=layout.family.name)
        return _fingerprint(BlockSteps(ptq, model, layout, targets, state), samples)

    base = get_preset("w8a16-ptq")
    steps = [{"name": step.name, **step.model_dump(mode="json")} for step in base.recipe()]
    as_recipe = PTQConfig.from_dict({"recipe": steps})
    assert fingerprint(as_recipe) == fingerprint(base)  # the same steps, however the config is written
    assert fingerprint(base.with_updates(block_ptq={"seed": 1})) != fingerprint(base)
    assert fingerprint(base.with_updates(ignore=["lm_head", "down_proj"])) != fingerprint(base)


# --- early stop (issue 21): fewer steps, the best state kept, the old behaviour one config away --------
EARLY = {"early_stop": True, "eval_every": 5, "patience": 2, "holdout_batches": 1}


def test_old_style_config_runs_every_step_on_every_batch() -> None:
    """`early_stop: false` (and a config written before the key existed) tunes exactly n_outer_loops steps."""
    text = _config("w4a16-ptq", n_outer_loops=23).to_yaml()
    old_style = "\n".join(line for line in text.splitlines() if not line.strip().startswith(tuple(EARLY)))
    assert "early_stop" not in old_style
    config = PTQConfig.from_yaml(old_style)
    assert config.block_ptq is not None and config.block_ptq.early_stop is False
    model = quantize(build_tiny("llama"), config, calibration=_calibration())
    record = quant_state(model).calibration["block_ptq"]
    assert record["steps_per_block"] == 23 and "early_stop" not in record
    assert "early_stop" not in config.to_dict()["block_ptq"]  # written only when set: old bytes kept
    for entry in _block_log(model):  # no early-stop keys in the log either
        assert not {"steps", "best_step", "checks", "holdout"} & set(entry), entry


def test_early_stop_stops_and_keeps_the_best_state() -> None:
    """Scales blown up by a huge lr never beat the start: tuning stops after `patience` checks and the
    block keeps its starting (RTN) rounding and scales, so its MSE is RTN's."""
    config = _config("w4a16-ptq", n_outer_loops=200, lr_weight_clip=1e3, **EARLY)
    model = quantize(build_tiny("llama"), config, calibration=_calibration())
    for entry in _block_log(model):
        assert entry["steps"] == EARLY["eval_every"] * EARLY["patience"], entry
        assert entry["best_step"] == 0 and entry["holdout"] == 1, entry
        assert len(entry["checks"]) == 1 + EARLY["patience"], entry
        assert entry["ptq_mse"] == pytest.approx(entry["rtn_mse"], rel=1e-5), entry


def test_early_stop_freezes_the_best_checked_state() -> None:
    """With one calibration batch the checks run on it (nothing to hold out, the log says 0), so the
    frozen block's MSE is exactly the best check's: the state kept is the best one seen, not the last."""
    config = _config("w4a16-ptq", n_outer_loops=60, n_batches=1, **{**EARLY, "patience": 1000})
    model = quantize(build_tiny("llama"), config, calibration=_calibration())
    for entry in _block_log(model):
        checks, every = entry["checks"], EARLY["eval_every"]
        assert entry["holdout"] == 0 and entry["steps"] == 60 and len(checks) == 1 + 60 // every, entry
        assert entry["best_step"] == every * checks.index(min(checks)), entry
        assert entry["ptq_mse"] / entry["rtn_mse"] == pytest.approx(min(checks), rel=1e-4, abs=1e-6), entry


def test_early_stop_keys_round_trip_and_are_checked() -> None:
    config = PTQConfig(
        weight_dtype="int4",
        weights={"strategy": "group", "group_size": 64},
        block_ptq={
            "n_outer_loops": 90,
            "early_stop": True,
            "eval_every": 7,
            "patience": 2,
            "holdout_batches": 3,
        },
    )
    again = PTQConfig.from_yaml(config.to_yaml())
    assert again == config and again.block_ptq is not None
    assert (again.block_ptq.early_stop, again.block_ptq.eval_every, again.block_ptq.patience) == (True, 7, 2)
    for key in ("eval_every", "patience", "holdout_batches"):
        with pytest.raises(ConfigError, match=key):
            PTQConfig(block_ptq={key: 0})


SIGN = {"rounding_method": "signround", "warmup_ratio": 0.0}


@pytest.mark.parametrize(
    ("family", "preset"), [("llama", "w4a16-ptq"), ("llama", "w8a8-ptq"), ("gpt2", "w4a16-ptq")]
)
def test_signround_tunes_every_block_below_rtn_within_one_grid_step(
    family: str, preset: str, input_ids: torch.Tensor
) -> None:
    """SignRound moves each weight at most to the grid point next to RTN's, and beats RTN. One fixed alpha:
    the alpha search scores the first samples of the first batches, which block PTQ's batches (4 samples
    here) and calibration's differ in, so the two runs could smooth a block differently."""
    config = _config(preset, **SIGN).with_updates(algorithm_args={"smooth_alpha_grid": []})
    model = quantize(build_tiny(family), config, calibration=_calibration())
    rtn = quantize(build_tiny(family), config.with_updates(block_ptq=None), calibration=_calibration())
    for entry in _block_log(model):
        assert entry["kept"] == "ptq" and entry["ptq_mse"] < 0.9 * entry["rtn_mse"], entry
    tuned_cells = {n: m for n, m in model.named_modules() if hasattr(m, "weight_scale")}
    rtn_cells = dict(rtn.named_modules())
    moved = 0
    for name, cell in tuned_cells.items():
        # the integer codes against RTN's, both on the RTN scale's grid (SignRound keeps its integer grid)
        q_rtn = rtn_cells[name].weight.float()
        diff = (cell.weight.float() - q_rtn).abs()
        assert float(diff.max()) <= 1.0, name
        moved += int((diff > 0).sum())
    assert moved > 0  # tuning changed some rounding
    reference = model_output(build_tiny(family), input_ids)
    assert quant_math.sqnr_db(reference, model_output(model, input_ids)) > quant_math.sqnr_db(
        reference, model_output(rtn, input_ids)
    )


def test_signround_starts_exactly_at_rtn_and_trains_what_it_freezes() -> None:
    """Its offsets start at zero: the learnable layer's weight is RTN's, bit for bit, and there is no soft
    state: the forward pass trained is the one frozen."""
    from quantmint.algorithms.block_ptq import LearnableQuantLinear

    model = PTQ(_config("w4a16-ptq").with_updates(block_ptq=None)).apply(build_tiny("llama"))
    cell = model.model.layers[0].mlp.down_proj  # the fake-quantized RTN layer block PTQ starts from
    weight = build_tiny("llama").model.layers[0].mlp.down_proj.weight
    assert torch.equal(
        LearnableQuantLinear(weight, cell, 4, "signround").freeze(torch.float32).weight, cell.weight
    )
    learnable = LearnableQuantLinear(weight, cell, 4, "signround")
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        learnable.rounding.uniform_(-0.5, 0.5)
        soft = learnable(x)
        frozen = learnable.freeze(torch.float32)
    assert torch.allclose(soft, frozen(x), rtol=1e-5, atol=1e-6)


def test_signround_keys_round_trip_are_checked_and_written_only_when_set() -> None:
    config = _config("w4a16-ptq", **SIGN, sign_lr=0.01)
    again = PTQConfig.from_yaml(config.to_yaml())
    assert again == config and again.block_ptq is not None
    assert (again.block_ptq.rounding_method, again.block_ptq.sign_lr) == ("signround", 0.01)
    plain = _config("w8a16-ptq").to_dict()["block_ptq"]  # AdaRound, every batch compared
    assert "rounding_method" not in plain and "sign_lr" not in plain
    with pytest.raises(ConfigError, match="rounding_method"):
        PTQConfig(block_ptq={"rounding_method": "signsgd"})
    with pytest.raises(ConfigError, match="sign_lr"):
        PTQConfig(block_ptq={"sign_lr": 2.0})


def test_compare_batches_measures_rtn_and_tuned_mse_on_the_first_batches() -> None:
    """`compare_batches` = every batch is today's behaviour, byte for byte; fewer batches change the
    first block's RTN MSE (its inputs are the same in both runs) and are written into the config."""
    everything = quantize(
        build_tiny("llama"), _config("w4a16-ptq", **SIGN, compare_batches=0), calibration=_calibration()
    )
    same = quantize(
        build_tiny("llama"), _config("w4a16-ptq", **SIGN, compare_batches=4), calibration=_calibration()
    )
    a, b = everything.state_dict(), same.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = _config("w4a16-ptq", **SIGN, compare_batches=1)
    one = quantize(build_tiny("llama"), first, calibration=_calibration())
    assert _block_log(one)[0]["rtn_mse"] != _block_log(everything)[0]["rtn_mse"]
    assert first.to_dict()["block_ptq"]["compare_batches"] == 1
    assert "compare_batches" not in _config("w4a16-ptq", compare_batches=0).to_dict()["block_ptq"]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_compared_outputs_are_reused_bit_for_bit_whichever_block_is_kept(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `inputs: quantized` the comparison's outputs of the kept block (RTN's or the tuned one's) on
    the first `compare_batches` batches are the next block's inputs there, not computed again: every
    block hands on the same quantized stream as when each output is recomputed, with blocks kept either
    way, and no scratch is left."""
    from quantmint.algorithms.block_ptq import BlockPTQ

    # 4 signed steps of 0.5 flip most roundings: every block keeps RTN; 40 steps of the default tune
    settings = {"kept ptq": {"n_outer_loops": 40}, "kept rtn": {"n_outer_loops": 4, "sign_lr": 0.5}}
    tune, write = BlockPTQ._tune_block, BlockPTQ._write_outputs

    def run(config: PTQConfig, recompute: bool, work: Path | None = None) -> list[torch.Tensor]:
        handed_on: list[torch.Tensor] = []

        def tune_block(self, block, calls, fp_in, q_in, fp_out, q_out):  # type: ignore[no-untyped-def]
            entry = tune(self, block, calls, fp_in, q_in, fp_out, q_out)
            handed_on.extend(q_out.get(i) for i in range(len(calls)))
            return entry

        def write_every_output(self, block, call_with, q_in, q_out, fp_out, n, first=0):  # type: ignore[no-untyped-def]
            write(self, block, call_with, q_in, q_out, fp_out, n, 0 if recompute else first)

        with monkeypatch.context() as patch:
            patch.setattr(BlockPTQ, "_tune_block", tune_block)
            patch.setattr(BlockPTQ, "_write_outputs", write_every_output)
            model = quantize(build_tiny("llama"), config, calibration=_calibration(), work_dir=work)
        kept.update(e["kept"] for e in _block_log(model))
        return handed_on

    for what, extra in settings.items():
        config = _config("w8a8-ptq", **SIGN, compare_batches=2, inputs="quantized", cache=cache, **extra)
        kept: set[str] = set()
        work = tmp_path / what.replace(" ", "-")
        reused = run(config, recompute=False, work=work)
        assert kept == {what.split()[1]}
        assert not [p.name for p in work.rglob("tuned-*")]
        again = run(config, recompute=True)
        assert len(reused) == len(again) == 2 * 4  # 2 blocks, 4 batches
        assert all(torch.equal(a, b) for a, b in zip(reused, again, strict=True))


def test_token_relative_loss_divides_out_each_tokens_scale() -> None:
    """`loss: token_relative` weighs each token's error by its float output's mean square: a token 1000x
    larger with the same relative error counts as much as a small one (plain MSE: 10^6 times more);
    `mse+token_relative` adds the whole output's relative error; a float output of zeros does not divide
    by zero, and an unknown name is refused."""
    from quantmint.algorithms.block_ptq import block_loss

    ref = torch.tensor([[[1.0, -1.0, 1.0, -1.0], [1000.0, -1000.0, 1000.0, -1000.0]]])
    out = ref * 1.1  # 10% off on both tokens
    assert float(block_loss(out, ref, "token_relative")) == pytest.approx(0.01, rel=1e-5)
    only_big = ref.clone()
    only_big[0, 1] *= 1.1
    only_small = ref.clone()
    only_small[0, 0] *= 1.1
    rel_big, rel_small = (float(block_loss(o, ref, "token_relative")) for o in (only_big, only_small))
    assert rel_big == pytest.approx(rel_small, rel=1e-5)
    mse_big, mse_small = (float(block_loss(o, ref, "mse")) for o in (only_big, only_small))
    assert mse_big == pytest.approx(1e6 * mse_small, rel=1e-4)
    assert float(block_loss(ref, ref, "token_relative")) == 0.0
    # the sum: the whole output's relative error (the big token's, here) plus the token-relative one
    both_big, both_small = (float(block_loss(o, ref, "mse+token_relative")) for o in (only_big, only_small))
    power = float(ref.pow(2).mean())
    assert both_big == pytest.approx(mse_big / power + rel_big, rel=1e-5)
    assert both_small == pytest.approx(mse_small / power + rel_small, rel=1e-5)
    assert both_big > 2.5 * both_small  # the big token's error counts twice: in both terms
    zeros = torch.zeros(1, 2, 4)
    for kind in ("token_relative", "mse+token_relative"):  # nothing to divide by: the plain MSE
        assert float(block_loss(torch.full((1, 2, 4), 0.5), zeros, kind)) == 0.25
    with pytest.raises(ConfigError, match="token_relative"):
        block_loss(out, ref, "l1")


def test_token_relative_loss_tunes_and_is_written_only_when_chosen() -> None:
    """mse is the default and is written nowhere; token_relative and mse+token_relative tune to other
    blocks, still better than RTN by their own measure, and round-trip through the config."""
    from quantmint.config import BlockPTQArgs

    assert BlockPTQArgs().loss == "mse"
    mse = _config("w4a16-ptq", **SIGN, loss="mse")
    a = quantize(build_tiny("llama"), mse, calibration=_calibration()).state_dict()
    for loss in ("token_relative", "mse+token_relative"):
        config = _config("w4a16-ptq", **SIGN, loss=loss)
        relative = quantize(build_tiny("llama"), config, calibration=_calibration())
        c = relative.state_dict()
        assert any(not torch.equal(a[k], c[k]) for k in a), loss
        for entry in _block_log(relative):
            assert entry["kept"] == "ptq" and entry["ptq_mse"] < entry["rtn_mse"], entry
        assert config.to_dict()["block_ptq"]["loss"] == loss
        assert PTQConfig.from_yaml(config.to_yaml()) == config
    assert "loss" not in _config("w4a16-ptq", loss="mse").to_dict()["block_ptq"]
    with pytest.raises(ConfigError, match="loss"):
        PTQConfig(block_ptq={"loss": "l1"})


@pytest.mark.parametrize(("hadamard", "chosen"), [(True, "token_relative"), (False, "mse+token_relative")])
def test_auto_loss_is_token_relative_with_the_rotation_and_keeps_the_mse_without(
    hadamard: bool, chosen: str
) -> None:
    """`loss: auto` (the w8a8-ptq preset's) tunes each block exactly as the loss it picks: token_relative
    where the block's down projection is rotated, mse+token_relative where nothing is; the report names it."""
    assert get_preset("w8a8-ptq").block_ptq.loss == "auto"

    def run(loss: str) -> torch.nn.Module:
        config = _config("w8a8-ptq", loss=loss, n_outer_loops=8)
        config = config.with_updates(algorithm_args={"hadamard": hadamard, "smooth_alpha_grid": []})
        return quantize(build_tiny("llama"), config, calibration=_calibration())

    auto, explicit = run("auto"), run(chosen)
    assert [e["loss"] for e in _block_log(auto)] == [chosen, chosen]
    assert all("loss" not in e for e in _block_log(explicit))
    a, b = auto.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="loss"):
        PTQConfig(algorithm_args={"smooth_search_loss": "auto"})
