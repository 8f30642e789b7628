"""Typed configurations: validated on construction, each default written once, round-trips through metadata."""

import dataclasses

import pytest

import lowbit
from lowbit import AWQ, FP8, GPTQ, RTN, W8A8, FloatSpec, IntSpec, LLMInt8, LowbitError, QuantConfig, SmoothQuant
from lowbit.config import METHODS, config_for, option_names


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_round_trips_through_its_record(method):
    cfg = config_for(method, IntSpec(3, 32, False))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.method == method


def test_methods_that_fix_their_format_ignore_the_given_one():
    assert config_for("w8a8-smooth", IntSpec(4, 64)).spec == IntSpec(8, -1, True)
    assert config_for("fp8-e5m2").spec == FloatSpec("e5m2")
    assert config_for("gptq", IntSpec(3, 32, False)).spec == IntSpec(3, 32, False)


@pytest.mark.parametrize("make, message", [
    (lambda: GPTQ(damp=1.5), "damp must be in"),
    (lambda: GPTQ(block_size=0), "block_size must be a positive integer"),
    (lambda: GPTQ(block_size=12.5), "block_size must be an integer"),
    (lambda: GPTQ(act_order="yes"), "act_order must be true or false"),
    (lambda: AWQ(n_grid=0), "n_grid must be a positive integer"),
    (lambda: RTN(bits="4"), "bits must be an integer, got '4'"),
    (lambda: RTN(bits=9), "unsupported bit width 9"),
    (lambda: RTN(group_size=64.5), "group size must be an integer"),
    (lambda: RTN(group_size=0), "group size must be positive"),
    (lambda: RTN(symmetric=1), "symmetric must be true or false"),
    (lambda: SmoothQuant(alpha=2), "alpha must be in"),
    (lambda: SmoothQuant(act_granularity="row"), "activation granularity must be one of"),
    (lambda: LLMInt8(threshold=0), "outlier threshold must be positive"),
    (lambda: LLMInt8(outlier_fraction=1.0), "outlier fraction must be in"),
    (lambda: FP8(fmt="e3m4"), "unknown FP8 format"),
    (lambda: FP8(act="int8"), "FP8 act must be one of"),
    (lambda: config_for("gptq", options={"act_ordr": True}), r"unknown option\(s\) act_ordr; valid: .*act_order"),
    (lambda: config_for("rtn", options={"damp": 0.1}), r"rtn: unknown option\(s\) damp; valid: importance"),
    (lambda: config_for("gptq", FloatSpec()), "stores integer weights"),
    (lambda: config_for("nope"), "unknown method 'nope'"),
])
def test_invalid_settings_are_refused_with_a_clear_message(make, message):
    with pytest.raises(LowbitError, match=message):
        make()


def test_configurations_are_frozen_and_compare_by_value():
    assert GPTQ(bits=4) == GPTQ(bits=4) and hash(GPTQ(bits=4)) == hash(GPTQ(bits=4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPTQ().damp = 0.5
    assert GPTQ().replace(damp=0.02).damp == 0.02
    with pytest.raises(TypeError):
        GPTQ(4)            # keyword-only: GPTQ(bits=4)


def test_needs_calibration_comes_from_the_configuration():
    assert not RTN().needs_calibration and GPTQ().needs_calibration and AWQ().needs_calibration
    assert W8A8().needs_calibration and SmoothQuant().needs_calibration and not FP8().needs_calibration
    assert not LLMInt8().needs_calibration and LLMInt8(outlier_fraction=0.01).needs_calibration


def test_option_names_are_the_dataclass_fields():
    assert option_names("gptq") == ["block_size", "damp", "act_order", "true_sequential", "weighted_grid", "matmul"]
    assert option_names("rtn") == ["importance"]
    assert option_names("fp8-e5m2") == ["act"]
    assert lowbit.algorithms.gptq_quantize.__kwdefaults__ == {"block_size": GPTQ.block_size, "damp": GPTQ.damp,
                                                             "act_order": GPTQ.act_order,
                                                             "weighted_grid": GPTQ.weighted_grid}
