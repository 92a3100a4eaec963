"""Reputation scores: the formula of hive/_reputation.py, decay, autonomy levels, validation."""

from __future__ import annotations

import math
import pickle
import random
import statistics
import time
from collections import deque

import pytest

from hive._exceptions import ConfigError
from hive._reputation import AutonomyLevel, ReputationBook, ReputationPolicy

H = 600.0  # default half-life


def test_unknown_agent_has_the_prior() -> None:
    book = ReputationBook(ReputationPolicy(prior=0.55))
    assert book.score("new", now=0.0) == 0.55
    assert book.score("new") == 0.55
    assert book.level("new", now=0.0) is AutonomyLevel.STANDARD
    assert book.snapshot(now=0.0) == {}


def test_success_raises_and_failure_lowers_the_score() -> None:
    book = ReputationBook()
    book.record_outcome("good", "echo", ok=True, latency_s=1.0, now=0.0)
    book.record_outcome("bad", "echo", ok=False, latency_s=1.0, now=0.0)
    assert book.score("good", now=0.0) == pytest.approx((0.7 * 2 + 1.0) / 3)
    assert book.score("bad", now=0.0) == pytest.approx((0.7 * 2 + 0.0) / 3)
    for _ in range(20):
        book.record_outcome("good", "echo", ok=True, latency_s=1.0, now=0.0)
        book.record_outcome("bad", "echo", ok=False, latency_s=1.0, now=0.0)
    assert book.score("good", now=0.0) == pytest.approx((1.4 + 21) / 23)  # 0.974
    assert book.score("bad", now=0.0) == pytest.approx(1.4 / 23)  # 0.061


def test_slow_successes_score_lower_than_fast_ones_relative_to_the_median() -> None:
    book = ReputationBook()
    for _ in range(5):  # the reference: median latency 1.0 for "echo"
        book.record_outcome("ref", "echo", ok=True, latency_s=1.0, now=0.0)
    assert book.reference_latency("echo") == 1.0
    book.record_outcome("fast", "echo", ok=True, latency_s=0.5, now=0.0)
    book.record_outcome("slow", "echo", ok=True, latency_s=5.0, now=0.0)
    fast, slow = book.score("fast", now=0.0), book.score("slow", now=0.0)
    assert fast == pytest.approx((1.4 + 1.0) / 3)  # at or under the median: q = 1
    assert slow == pytest.approx((1.4 + 0.8 + 0.2 * (1.0 / 5.0)) / 3)  # q = 1 - λ + λ·ref/lat
    assert slow < fast
    # another task type has its own reference: the first success of it has no penalty
    book.record_outcome("other", "train", ok=True, latency_s=50.0, now=0.0)
    assert book.score("other", now=0.0) == pytest.approx(fast)


def test_latency_weight_zero_ignores_speed() -> None:
    book = ReputationBook(ReputationPolicy(latency_weight=0.0))
    book.record_outcome("ref", "echo", ok=True, latency_s=1.0, now=0.0)
    book.record_outcome("slow", "echo", ok=True, latency_s=100.0, now=0.0)
    assert book.score("slow", now=0.0) == pytest.approx(book.score("ref", now=0.0))


def test_disagreement_lowers_more_than_a_failure() -> None:
    book = ReputationBook()
    book.record_outcome("failed", "echo", ok=False, latency_s=1.0, now=0.0)
    book.record_disagreement("disagreed", now=0.0)
    assert book.score("disagreed", now=0.0) == pytest.approx(1.4 / 4)  # weight D = 2
    assert book.score("failed", now=0.0) == pytest.approx(1.4 / 3)
    assert book.score("disagreed", now=0.0) < book.score("failed", now=0.0)


def test_scores_decay_back_toward_the_prior() -> None:
    book = ReputationBook()
    for _ in range(10):
        book.record_outcome("bad", "echo", ok=False, latency_s=1.0, now=0.0)
        book.record_outcome("good", "echo", ok=True, latency_s=1.0, now=0.0)
    # exactly one half-life later the evidence weighs half: (1.4 + 0) / (2 + 5)
    assert book.score("bad", now=H) == pytest.approx(1.4 / 7)
    bad = [book.score("bad", now=k * H) for k in range(11)]
    good = [book.score("good", now=k * H) for k in range(11)]
    assert bad == sorted(bad) and len(set(bad)) == len(bad)  # strictly rising back to 0.7
    assert good == sorted(good, reverse=True) and len(set(good)) == len(good)
    assert abs(bad[-1] - 0.7) < 0.005 and abs(good[-1] - 0.7) < 0.005  # 10 half-lives
    assert bad[-1] < 0.7 < good[-1]  # approaches the prior without crossing it
    # a fresh outcome after the gap counts fully against the decayed evidence
    book.record_outcome("bad", "echo", ok=True, latency_s=1.0, now=10 * H)
    w = 10 * 2.0**-10
    assert book.score("bad", now=10 * H) == pytest.approx((1.4 + 1.0) / (2 + w + 1))


def test_an_outcome_timestamped_before_the_last_update_counts_at_the_last_update() -> None:
    skewed, ordered = ReputationBook(), ReputationBook()
    skewed.record_outcome("a", "echo", ok=False, latency_s=1.0, now=1000.0)
    skewed.record_outcome("a", "echo", ok=False, latency_s=1.0, now=400.0)  # clock skew
    ordered.record_outcome("a", "echo", ok=False, latency_s=1.0, now=1000.0)
    ordered.record_outcome("a", "echo", ok=False, latency_s=1.0, now=1000.0)
    for t in (0.0, 1000.0, 2500.0):
        assert skewed.score("a", now=t) == ordered.score("a", now=t)
    # a query from before the last update reads the evidence as of that update, never more
    assert skewed.score("a", now=0.0) == skewed.score("a", now=1000.0) == pytest.approx(1.4 / 4)


def test_default_now_is_wall_clock_time() -> None:
    book = ReputationBook()
    book.record_outcome("a", "echo", ok=False, latency_s=1.0)  # now = time.time()
    # with a monotonic clock the outcome would lie years in the past and have decayed away
    assert book.score("a", now=time.time()) == pytest.approx(1.4 / 3, rel=1e-3)
    assert book.score("a") == pytest.approx(1.4 / 3, rel=1e-3)


def test_levels_follow_the_thresholds() -> None:
    book = ReputationBook()  # critical 0.7, cross-check 0.4, prior 0.7
    assert book.level("new", now=0.0) is AutonomyLevel.TRUSTED  # score == critical: trusted
    book.record_outcome("std", "echo", ok=False, latency_s=1.0, now=0.0)  # 0.467
    assert book.level("std", now=0.0) is AutonomyLevel.STANDARD
    assert not book.may_run_critical("std", now=0.0) and not book.needs_cross_check("std", now=0.0)
    book.record_disagreement("low", now=0.0)  # 0.35
    assert book.level("low", now=0.0) is AutonomyLevel.RESTRICTED
    assert book.needs_cross_check("low", now=0.0) and not book.may_run_critical("low", now=0.0)
    assert book.may_run_critical("new", now=0.0) and not book.needs_cross_check("new", now=0.0)
    # decay lifts it back to STANDARD; it stays below the prior 0.7, so never TRUSTED by decay
    assert book.level("low", now=10 * H) is AutonomyLevel.STANDARD
    # score exactly at cross_check_threshold is STANDARD, not RESTRICTED
    edge = ReputationBook(ReputationPolicy(prior=0.4))
    assert edge.level("new", now=0.0) is AutonomyLevel.STANDARD
    assert AutonomyLevel.TRUSTED == "trusted"  # str enum: serialises as its value


def test_snapshot_reports_counts_and_levels_and_forget_drops_an_agent() -> None:
    book = ReputationBook()
    book.record_outcome("a", "echo", ok=True, latency_s=1.0, now=0.0)
    book.record_outcome("a", "echo", ok=False, latency_s=1.0, now=0.0)
    book.record_disagreement("a", now=0.0)
    book.record_outcome("b", "echo", ok=True, latency_s=1.0, now=0.0)
    snap = book.snapshot(now=0.0)
    assert list(snap) == ["a", "b"]
    assert snap["a"] == {"score": pytest.approx((1.4 + 1.0) / 6), "level": "restricted",
                         "outcomes": 2, "failures": 1, "disagreements": 1}
    assert snap["b"]["level"] == "trusted" and snap["b"]["outcomes"] == 1
    pickle.dumps(snap)  # plain data: may cross to another process
    book.forget("a")
    book.forget("never-seen")
    assert list(book.snapshot(now=0.0)) == ["b"]
    assert book.score("a", now=0.0) == 0.7


def test_reference_latency_is_a_bounded_median_of_successes() -> None:
    book = ReputationBook(ReputationPolicy(latency_window=3))
    assert book.reference_latency("echo") is None
    for lat in (1.0, 2.0, 3.0, 100.0, 100.0):
        book.record_outcome("a", "echo", ok=True, latency_s=lat, now=0.0)
    assert book.reference_latency("echo") == 100.0  # window [3, 100, 100]
    book.record_outcome("a", "echo", ok=False, latency_s=0.001, now=0.0)  # failures stay out
    assert book.reference_latency("echo") == 100.0
    book.record_outcome("a", "echo", ok=True, latency_s=4.0, now=0.0)
    assert book.reference_latency("echo") == 100.0  # [100, 100, 4]
    assert book.reference_latency("other") is None


def test_zero_latency_success_has_full_quality() -> None:
    book = ReputationBook()
    book.record_outcome("a", "echo", ok=True, latency_s=0.0, now=0.0)
    book.record_outcome("b", "echo", ok=True, latency_s=0.0, now=0.0)  # ref is 0 now
    assert book.score("b", now=0.0) == pytest.approx(2.4 / 3)


def _direct_score(policy: ReputationPolicy, events: list[tuple[float, float, float]],
                  t: float) -> float:
    """The module docstring's formula evaluated from scratch over (t_i, w_i0, q_i)."""
    num = policy.prior * policy.prior_weight
    den = policy.prior_weight
    for t_i, w_i0, q_i in events:
        w = w_i0 * 2.0 ** (-(t - t_i) / policy.half_life_s)
        num += w * q_i
        den += w
    return num / den


@pytest.mark.parametrize("seed", range(40))
def test_incremental_score_equals_direct_recomputation(seed: int) -> None:
    rng = random.Random(seed)
    policy = ReputationPolicy(half_life_s=rng.choice([1.0, 30.0, 600.0]),
                              prior=rng.random(), prior_weight=rng.uniform(0.1, 5.0),
                              latency_weight=rng.random(), disagreement_weight=rng.uniform(0, 4),
                              critical_threshold=0.9, cross_check_threshold=0.1,
                              latency_window=rng.randint(1, 6))
    book = ReputationBook(policy)
    agents, types = ["a", "b", "c"], ["echo", "train"]
    windows: dict[str, deque[float]] = {k: deque(maxlen=policy.latency_window) for k in types}
    history: dict[str, list[tuple[float, float, float]]] = {a: [] for a in agents}
    t = rng.uniform(0, 1e6)
    for _ in range(rng.randint(1, 120)):
        t += rng.choice([0.0, rng.expovariate(1 / policy.half_life_s)])
        agent, kind = rng.choice(agents), rng.random()
        if kind < 0.15:
            book.record_disagreement(agent, now=t)
            history[agent].append((t, policy.disagreement_weight, 0.0))
            continue
        task_type, ok = rng.choice(types), kind < 0.75
        latency = rng.choice([0.0, rng.lognormvariate(0, 1)])
        book.record_outcome(agent, task_type, ok=ok, latency_s=latency, now=t)
        q = 0.0
        if ok:
            win = windows[task_type]
            ref = statistics.median(win) if win else None
            factor = 1.0 if ref is None or latency == 0 else min(1.0, ref / latency)
            q = 1 - policy.latency_weight + policy.latency_weight * factor
            win.append(latency)
        history[agent].append((t, 1.0, q))
        for probe in (t, t + rng.uniform(0, 5 * policy.half_life_s)):
            for a in agents:
                expected = _direct_score(policy, history[a], probe) if history[a] else policy.prior
                assert book.score(a, now=probe) == pytest.approx(expected, rel=1e-9, abs=1e-12)
                assert 0.0 <= book.score(a, now=probe) <= 1.0
    for task_type in types:
        win = windows[task_type]
        assert book.reference_latency(task_type) == (statistics.median(win) if win else None)


@pytest.mark.parametrize(("field", "value"), [
    ("half_life_s", 0.0), ("half_life_s", -5.0), ("half_life_s", math.inf), ("half_life_s", "600"),
    ("prior", 1.5), ("prior", -0.1), ("prior", math.nan),
    ("prior_weight", 0.0), ("prior_weight", -1.0),
    ("latency_weight", 1.01), ("latency_weight", -0.5),
    ("disagreement_weight", -1.0), ("disagreement_weight", math.inf),
    ("critical_threshold", 1.2), ("cross_check_threshold", -0.1),
    ("latency_window", 0), ("latency_window", 2.5), ("latency_window", True),
])
def test_policy_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        ReputationPolicy(**{field: value})  # type: ignore[arg-type]
    assert info.value.setting == field  # type: ignore[attr-defined]


def test_policy_thresholds_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match="cross_check_threshold") as info:
        ReputationPolicy(critical_threshold=0.5, cross_check_threshold=0.6)
    assert info.value.setting == "cross_check_threshold"  # type: ignore[attr-defined]
    ReputationPolicy(critical_threshold=0.5, cross_check_threshold=0.5)  # equal is fine
    ReputationPolicy(disagreement_weight=0.0, latency_weight=1.0, prior=0.0)  # edges are fine


@pytest.mark.parametrize(("kwargs", "setting"), [
    ({"latency_s": -1.0}, "latency_s"), ({"latency_s": math.nan}, "latency_s"),
    ({"latency_s": math.inf}, "latency_s"), ({"latency_s": 1.0, "now": math.nan}, "now"),
])
def test_record_outcome_rejects_bad_latency_and_time(kwargs: dict[str, float],
                                                     setting: str) -> None:
    book = ReputationBook()
    with pytest.raises(ConfigError, match=setting) as info:
        book.record_outcome("a", "echo", ok=True, **kwargs)
    assert info.value.setting == setting  # type: ignore[attr-defined]
    assert book.snapshot(now=0.0) == {} and book.reference_latency("echo") is None
