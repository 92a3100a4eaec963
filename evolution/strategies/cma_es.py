"""CMA-ES (``"cma-es"``): the ``cma`` package behind the one-candidate-at-a-time interface.

How it maps onto ask/tell
    ``cma`` works in batches: ``ask()`` returns ``popsize`` points, ``tell(X, f)`` takes a whole
    generation. This strategy samples a batch on the first ask of a generation, hands the
    points out one by one, and calls ``cma.tell`` once ``popsize`` results of the generation
    are in. ``cma`` minimises; fitness here is maximised, so it receives ``-fitness``.

    The search runs in the unit cube (each gene scaled by its bounds), so ``sigma0`` is a
    fraction of each gene's range. Bounds are enforced with ``cma``'s ``BoundTransform``: every
    sampled point is already inside the box. Mirrored sampling is off (``CMA_mirrors=0``),
    because results arrive in any order and, in steady-state mode, not all points of a batch
    are used.

Failures
    A failed candidate (``tell(id, None)``) gets ``failure_penalty`` if set, otherwise a value
    just below the worst success of its generation (``worst - max(1, |worst|)``). CMA-ES only
    uses ranks, so this means "rank last". A generation in which every candidate failed is told
    as flat fitness; ``cma`` then widens its step size.

Steady state (``steady_state=True``)
    ``ask()`` never waits. It keeps handing out points sampled from the *current* search
    distribution; when the batch is used up it samples another batch from the same
    distribution. The generation completes with the first ``popsize`` results to arrive; the
    distribution is updated from those, and results of that generation arriving later are
    *late*: they count for :meth:`best` but not for the update (they were sampled from a
    distribution that no longer exists, and feeding them in would bias the covariance update).
    This is the rule Optuna's CMA-ES sampler uses for asynchronous workers. It trades a few
    evaluations per generation (at most one per busy evaluator) for no idle evaluators, and the
    updates stay those of standard CMA-ES. Which results count depends on arrival order, so a
    steady-state run is reproducible given the same interleaving of asks and tells. In
    generational mode (the default) the order of tells within a generation does not matter.

Saved state
    The ``cma`` object (mean, covariance, step size, evolution paths and our seeded random
    generator) is stored as a base64 pickle inside the JSON state: ``cma``'s documented way to
    save a run, and the only one that restores every internal float bit for bit. Load states
    only from storage you trust (the scheduler's own checkpoints), as with any pickle.
"""

from __future__ import annotations

import base64
import dataclasses
import pickle
import warnings
from typing import Any

import numpy as np

from evolution._exceptions import EvolutionError
from evolution.strategies._base import Strategy, StrategySettings, _check_float, _check_int
from evolution.strategies._candidate import Candidate
from evolution.strategies._space import GenomeSpace
from evolution.strategies.registry import register_strategy
from hive import ConfigError

with warnings.catch_warnings():  # cma warns at import when matplotlib is missing; we never plot
    warnings.simplefilter("ignore")
    import cma

__all__ = ["CMAES", "CMAESSettings"]

# cma options this strategy sets itself; cma_options may not override them.
RESERVED_OPTIONS = frozenset(
    {
        "bounds",
        "popsize",
        "randn",
        "seed",
        "verbose",
        "verb_disp",
        "verb_log",
        "verb_filenameprefix",
        "CMA_mirrors",
        "CMA_stds",
        "maxiter",
        "maxfevals",
    }
)


@dataclasses.dataclass
class CMAESSettings(StrategySettings):
    """Settings of :class:`CMAES` (``max_generations`` and ``seed`` come from StrategySettings).

    Example:
        >>> CMAESSettings(popsize=8, sigma0=0.3).steady_state
        False
    """

    popsize: int | None = None  # results per generation; None = cma's 4 + floor(3 ln dims)
    sigma0: float = 0.25  # initial step size, a fraction of each gene's range
    steady_state: bool = False  # True: ask() never waits for a generation (see module docs)
    failure_penalty: float | None = None  # fitness of a failure; None = below the worst success
    cma_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # more cma options (JSON)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.popsize is not None:
            _check_int(self, "popsize", 2)
        _check_float(self, "sigma0", 0.0, 10.0, open_low=True)
        if self.failure_penalty is not None:
            _check_float(self, "failure_penalty", -1e300, 1e300)
        if not isinstance(self.cma_options, dict):
            raise ConfigError(
                "cma_options must be a dict of cma option names to values", setting="cma_options"
            )
        reserved = sorted(RESERVED_OPTIONS & set(self.cma_options))
        if reserved:
            raise ConfigError(
                f"cma_options may not set {', '.join(reserved)}: use the CMAESSettings fields "
                "(popsize, seed, sigma0, max_generations) and the GenomeSpace bounds",
                setting="cma_options",
            )


class _Randn:
    """``cma``'s ``randn(lam, N)`` option backed by our own seeded generator.

    Without it ``cma`` draws from (and seeds) numpy's global generator, which two strategies in
    one process would share.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


@register_strategy
class CMAES(Strategy[CMAESSettings]):
    """Covariance matrix adaptation evolution strategy, one candidate at a time.

    Args:
        space: the genome space; the search starts at ``space.initial``.
        settings: :class:`CMAESSettings`; None for the defaults.

    Raises:
        ConfigError: a bad setting (the message names it).

    Example:
        >>> from evolution.strategies import GenomeSpace
        >>> es = CMAES(GenomeSpace(dims=3, low=-1.0, high=1.0), CMAESSettings(max_generations=30, seed=2))
        >>> while not es.done:
        ...     c = es.ask()
        ...     es.tell(c.id, -sum((g - 0.5) ** 2 for g in c.genome))
        >>> bool(es.best()[1] > -1e-3)
        True
    """

    name = "cma-es"
    settings_type = CMAESSettings

    def __init__(self, space: GenomeSpace, settings: CMAESSettings | None = None) -> None:
        super().__init__(space, settings)
        s = self.settings
        options: dict[str, Any] = {
            **s.cma_options,
            "bounds": [0.0, 1.0],  # unit cube; BoundTransform keeps every sample inside
            "randn": _Randn(s.seed),
            "seed": float("nan"),  # never touch numpy's global generator
            "CMA_mirrors": 0,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,  # no outcmaes/ files
        }
        if s.popsize is not None:
            options["popsize"] = s.popsize
        x0 = self.space.to_unit(self.space.initial)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._es = cma.CMAEvolutionStrategy(x0.tolist(), s.sigma0, options)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(
                f"cma rejected the options: {exc}; check cma_options", setting="cma_options"
            ) from exc
        self._popsize = int(self._es.popsize)
        # unit-cube points of this generation not handed out yet
        self._queue: list[list[float]] = []
        # candidate id -> unit-cube point, asked this generation
        self._unit: dict[str, list[float]] = {}
        # candidate id -> fitness (None: failed), this generation, in arrival order
        self._results: dict[str, float | None] = {}
        self._late = 0  # results that arrived after their generation was closed (steady state)

    # -- extras ----------------------------------------------------------------------------------

    @property
    def popsize(self) -> int:
        """Results per generation (``settings.popsize`` or cma's default)."""
        return self._popsize

    @property
    def mean(self) -> tuple[float, ...]:
        """The search distribution's mean, in genome space: the current estimate of the optimum."""
        return self.space.from_unit(np.asarray(self._es.result.xfavorite, dtype=np.float64))

    @property
    def sigma(self) -> float:
        """The current overall step size, as a fraction of the gene ranges."""
        return float(self._es.sigma)

    @property
    def late_results(self) -> int:
        """Steady-state results that arrived after their generation closed (not used for updates)."""
        return self._late

    # -- Strategy hooks ------------------------------------------------------------------------------

    def _can_ask(self) -> bool:
        return self.settings.steady_state or bool(self._queue) or not self._unit

    def _ask(self) -> Candidate:
        if not self._queue:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                batch = self._es.ask()
            self._queue = [[float(v) for v in x] for x in batch]
        unit = self._queue.pop(0)
        candidate = self._new_candidate(self.space.from_unit(unit))
        self._unit[candidate.id] = unit
        return candidate

    def _tell(self, candidate: Candidate, fitness: float | None) -> None:
        if candidate.generation != self._generation or candidate.id not in self._unit:
            self._late += 1
            return
        self._results[candidate.id] = fitness
        if len(self._results) >= self._popsize:
            self._update()

    def _update(self) -> None:
        ids = [i for i in self._unit if i in self._results]  # ask order: tell order does not matter
        fits = _with_penalty([self._results[i] for i in ids], self.settings.failure_penalty)
        solutions = [np.asarray(self._unit[i], dtype=np.float64) for i in ids]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._es.tell(solutions, [-f for f in fits])  # cma minimises
        self._generation += 1
        self._queue, self._unit, self._results = [], {}, {}

    def _state_data(self) -> dict[str, Any]:
        return {
            "cma": base64.b64encode(pickle.dumps(self._es, protocol=4)).decode("ascii"),
            "cma_version": str(cma.__version__),
            "popsize": self._popsize,
            "queue": self._queue,
            "unit": self._unit,
            "results": [[k, v] for k, v in self._results.items()],
            "late": self._late,
            "mean": list(self.mean),  # for people reading the state; not used to resume
            "sigma": self.sigma,  # ditto
        }

    def _load_state_data(self, data: dict[str, Any]) -> None:
        if data.get("cma_version") != str(cma.__version__):
            raise EvolutionError(
                f"state was saved with cma {data.get('cma_version')}, this process has cma {cma.__version__}; "
                "resume with the same cma version",
                strategy=self.name,
            )
        self._es = pickle.loads(
            base64.b64decode(data["cma"])
        )  # trusted checkpoint only, see module docs
        self._popsize = int(data["popsize"])
        self._queue = [[float(v) for v in x] for x in data["queue"]]
        self._unit = {str(k): [float(v) for v in x] for k, x in data["unit"].items()}
        self._results = {str(k): (None if v is None else float(v)) for k, v in data["results"]}
        self._late = int(data["late"])


def _with_penalty(fits: list[float | None], penalty: float | None) -> list[float]:
    """Replace failures (None) by ``penalty`` or by a value below the worst success."""
    ok = [f for f in fits if f is not None]
    if penalty is not None:
        fill = penalty
    elif ok:
        worst = min(ok)
        fill = worst - max(1.0, abs(worst))
    else:
        fill = 0.0  # all failed: flat fitness
    return [fill if f is None else f for f in fits]
