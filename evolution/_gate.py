"""The regression gate: when a candidate may replace the champion.

Rule. With per-domain scores ``s[d]`` (higher is better), the protected **baseline** scores
``b[d]`` (the mean of ``baseline_repeats`` evaluations of the run's baseline recipe), the
per-domain **noise** ``n[d]`` and the configured **tolerance** ``tol[d]`` (default 0), a candidate
passes the gate when

* for every domain: ``s[d] >= b[d] - (tol[d] + k * n[d])``  (no regression beyond tolerance
  plus ``k`` noise standard deviations; ``k = noise_k``, default 2), and
* its combined score ``C(s) = sum_d w[d] * s[d]`` (``w[d]`` = ``domain_weights``, default 1)
  is strictly greater than the current champion's.

The floors are measured against the *baseline*, not the current champion, so a chain of
promotions each within tolerance can never drift a domain further than one tolerance below
what the run started from. Improvement is measured against the current champion.

Noise. ``n[d]`` is the sample standard deviation (ddof=1) of domain ``d`` over the repeated
baseline evaluations, which the scheduler spreads over different evaluators: it measures
evaluation nondeterminism (GPU kernels, differing devices). On CPU with fixed inputs every
task here is deterministic, so ``n[d]`` is 0 and the tolerance alone decides; with one repeat
it is 0 as well. It does not measure the sampling error of a small benchmark: choose ``tol``
for that.

Recheck. ``recheck()`` compares the champion with the previous good champion under the same
per-domain rule, the previous champion's re-measured scores playing the baseline.

Example:
    >>> gate = RegressionGate(tolerances={"math": 0.05}, noise_k=2.0)
    >>> gate.check({"math": 0.70, "code": 0.9}, baseline={"math": 0.74, "code": 0.8},
    ...            noise={"math": 0.0, "code": 0.0}, champion_combined=1.5).passed
    True
    >>> gate.check({"math": 0.60, "code": 0.99}, baseline={"math": 0.74, "code": 0.8},
    ...            noise={"math": 0.0, "code": 0.0}, champion_combined=1.5).reasons
    ('math: 0.6000 < floor 0.6900 (baseline 0.7400 - tol 0.0500 - 2.0 x noise 0.0000)',)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["GateDecision", "RegressionGate", "mean_and_noise"]


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on one candidate."""

    passed: bool  # every floor held and the combined score improved
    combined: float  # the candidate's combined score
    floors: dict[str, float]  # domain -> lowest score allowed
    shortfall: dict[str, float]  # domain -> how far below its floor (only failing domains)
    reasons: tuple[str, ...]  # why it failed, one line per broken rule (empty when passed)


@dataclass(frozen=True)
class RegressionGate:
    """Per-domain floors plus combined-score improvement (see the module docstring)."""

    tolerances: Mapping[str, float] = field(default_factory=dict)  # domain -> allowed drop
    noise_k: float = 2.0  # noise standard deviations added to each tolerance
    weights: Mapping[str, float] = field(default_factory=dict)  # domain -> weight in C (default 1)

    def combined(self, scores: Mapping[str, float]) -> float:
        """``sum_d w[d] * scores[d]``.

        Example:
            >>> RegressionGate(weights={"a": 2.0}).combined({"a": 1.0, "b": 0.5})
            2.5
        """
        return float(sum(self.weights.get(d, 1.0) * s for d, s in sorted(scores.items())))

    def floors(self, baseline: Mapping[str, float], noise: Mapping[str, float]) -> dict[str, float]:
        """Domain -> ``baseline - (tol + k * noise)``."""
        return {
            d: b - (self.tolerances.get(d, 0.0) + self.noise_k * noise.get(d, 0.0))
            for d, b in baseline.items()
        }

    def check(
        self,
        scores: Mapping[str, float],
        baseline: Mapping[str, float],
        noise: Mapping[str, float],
        champion_combined: float | None,
    ) -> GateDecision:
        """Judge a candidate's scores.

        Args:
            scores: the candidate's per-domain scores.
            baseline: the protected per-domain scores (floors are computed from these).
            noise: per-domain noise standard deviations (missing: 0).
            champion_combined: the current champion's combined score; None skips the
                improvement rule (used by recheck, which only asks about regressions).

        Returns:
            A :class:`GateDecision`; a domain of ``baseline`` missing from ``scores`` fails.
        """
        floors = self.floors(baseline, noise)
        reasons: list[str] = []
        shortfall: dict[str, float] = {}
        for d, floor in sorted(floors.items()):
            s = scores.get(d)
            if s is None or not math.isfinite(s) or s < floor:
                shortfall[d] = math.inf if s is None or not math.isfinite(s) else floor - s
                shown = "missing" if s is None else f"{s:.4f}"
                reasons.append(
                    f"{d}: {shown} < floor {floor:.4f} (baseline {baseline[d]:.4f} - tol "
                    f"{self.tolerances.get(d, 0.0):.4f} - {self.noise_k} x noise "
                    f"{noise.get(d, 0.0):.4f})"
                )
        combined = self.combined(scores)
        if champion_combined is not None and not combined > champion_combined:
            reasons.append(
                f"combined score {combined:.4f} does not beat the champion's {champion_combined:.4f}"
            )
        return GateDecision(not reasons, combined, floors, shortfall, tuple(reasons))

    def penalised(self, decision: GateDecision, penalty: float) -> float:
        """The fitness a strategy is told: ``combined - penalty * sum_d w[d] * shortfall[d]``."""
        lost = sum(self.weights.get(d, 1.0) * v for d, v in decision.shortfall.items())
        return decision.combined - penalty * lost if math.isfinite(lost) else -math.inf


def mean_and_noise(
    repeats: Sequence[Mapping[str, float]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-domain mean and sample standard deviation (ddof=1; 0 for one repeat).

    Example:
        >>> mean_and_noise([{"a": 1.0}, {"a": 3.0}])
        ({'a': 2.0}, {'a': 1.4142135623730951})
    """
    if not repeats:
        raise ValueError("need at least one evaluation to estimate scores and noise")
    domains = sorted(repeats[0])
    mean = {d: statistics.fmean(r[d] for r in repeats) for d in domains}
    noise = {d: statistics.stdev([r[d] for r in repeats]) if len(repeats) > 1 else 0.0 for d in domains}
    return mean, noise
