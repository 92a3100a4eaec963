"""The regression gate rule and its noise estimate (pure functions, no Ray)."""

from __future__ import annotations

import math

import pytest

from evolution._gate import RegressionGate, mean_and_noise

BASE = {"math": 0.70, "code": 0.50}


def test_gate_rejects_a_regression_beyond_tolerance_and_accepts_one_within() -> None:
    gate = RegressionGate(tolerances={"math": 0.05}, noise_k=2.0)
    noise = {"math": 0.01, "code": 0.0}  # floor math = 0.70 - (0.05 + 2 * 0.01) = 0.63
    within = gate.check({"math": 0.64, "code": 0.70}, BASE, noise, champion_combined=1.2)
    assert within.passed and within.reasons == ()
    beyond = gate.check({"math": 0.62, "code": 0.90}, BASE, noise, champion_combined=1.2)
    assert not beyond.passed
    assert beyond.shortfall == {"math": pytest.approx(0.01)}
    assert beyond.reasons[0].startswith("math: 0.6200 < floor 0.6300")


def test_gate_needs_a_better_combined_score_than_the_champion() -> None:
    gate = RegressionGate(weights={"code": 2.0})
    scores = {"math": 0.70, "code": 0.55}
    assert gate.combined(scores) == pytest.approx(1.8)
    assert gate.check(scores, BASE, {}, champion_combined=1.7).passed
    tie = gate.check(scores, BASE, {}, champion_combined=1.8)
    assert not tie.passed and "does not beat" in tie.reasons[0]
    assert gate.check(scores, BASE, {}, champion_combined=None).passed  # recheck: floors only


def test_missing_or_non_finite_domain_fails_and_penalty_follows_shortfall() -> None:
    gate = RegressionGate()
    missing = gate.check({"math": 0.9}, BASE, {}, None)
    assert not missing.passed and missing.shortfall["code"] == math.inf
    assert gate.penalised(missing, 1.0) == -math.inf
    short = gate.check({"math": 0.60, "code": 0.50}, BASE, {}, None)
    assert gate.penalised(short, 2.0) == pytest.approx(1.10 - 2 * 0.10)


def test_noise_is_the_sample_std_of_repeats() -> None:
    mean, noise = mean_and_noise([{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 2.0}])
    assert mean == {"a": 2.0, "b": 2.0}
    assert noise["a"] == pytest.approx(math.sqrt(2.0)) and noise["b"] == 0.0
    assert mean_and_noise([{"a": 5.0}]) == ({"a": 5.0}, {"a": 0.0})
