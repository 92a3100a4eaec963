"""Search strategies: optimisation, determinism, exact resume, failures, bounds, steady state, registry."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from evolution import EvolutionError, UnknownNameError
from evolution.strategies import (
    CMAES,
    Candidate,
    CMAESSettings,
    GASettings,
    GeneticAlgorithm,
    GenomeSpace,
    Strategy,
    StrategyState,
    get_strategy,
    known_strategies,
    strategy_from_state,
)
from hive import ConfigError

OPTIMUM = np.array([0.3, -0.5, 0.7, 0.1])
SPACE = GenomeSpace(dims=4, low=-1.0, high=1.0)

# (name, settings) of every mode under test; small budgets keep the file well under 20 s.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "cma-es": ("cma-es", {"popsize": 8, "max_generations": 60}),
    "cma-es-steady": ("cma-es", {"popsize": 8, "max_generations": 60, "steady_state": True}),
    "ga": ("ga", {"population_size": 20, "max_generations": 40}),
    "ga-steady": ("ga", {"population_size": 20, "max_generations": 40, "steady_state": True}),
}


def neg_sphere(genome: tuple[float, ...]) -> float:
    """Maximum 0 at OPTIMUM (inside SPACE)."""
    return -float(np.sum((np.asarray(genome) - OPTIMUM) ** 2))


def serial_of(candidate_id: str) -> int:
    return int(candidate_id.rsplit("-", 1)[1])


def fitness_of(c: Candidate, fail_every: int = 0) -> float | None:
    """The test fitness; every ``fail_every``-th candidate (by serial) fails."""
    if fail_every and serial_of(c.id) % fail_every == fail_every - 1:
        return None
    return neg_sphere(c.genome)


def drive(
    strategy: Strategy[Any], steps: int, workers: int = 3, fail_every: int = 0
) -> list[tuple[Any, ...]]:
    """Simulate ``workers`` evaluators for ``steps`` ask/tell events; returns the event trace.

    Which pending candidate finishes next is a function of the strategy's own state (pending
    order and evaluation count), so a resumed strategy sees the same interleaving.
    """
    trace: list[tuple[Any, ...]] = []
    for _ in range(steps):
        if strategy.done and not strategy.pending:
            break
        if strategy.can_ask and len(strategy.pending) < workers:
            c = strategy.ask()
            trace.append(("ask", c.id, c.genome, c.generation, c.parents))
        else:
            pending = strategy.pending
            c = pending[(strategy.evaluations * 7) % len(pending)]
            fit = fitness_of(c, fail_every)
            strategy.tell(c.id, fit)
            trace.append(("tell", c.id, fit, strategy.generation))
    return trace


def run_to_end(strategy: Strategy[Any]) -> None:
    while not strategy.done:
        c = strategy.ask()
        strategy.tell(c.id, neg_sphere(c.genome))


# -- genome space ------------------------------------------------------------------------------------


def test_space_broadcasts_and_centers() -> None:
    space = GenomeSpace(dims=3, low=0.0, high=[1.0, 2.0, 4.0], names=["a", "b", "c"])
    assert space.low == (0.0, 0.0, 0.0) and space.high == (1.0, 2.0, 4.0)
    assert space.initial == (0.5, 1.0, 2.0)
    assert space.named((0.1, 0.2, 0.3)) == {"a": 0.1, "b": 0.2, "c": 0.3}
    assert GenomeSpace.model_validate_json(space.model_dump_json()) == space


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dims": 2, "low": 1.0, "high": 1.0},
        {"dims": 2, "low": [0.0], "high": 1.0},
        {"dims": 2, "initial": [0.5, 1.5]},
        {"dims": 2, "names": ["a", "a"]},
        {"dims": 0},
    ],
)
def test_space_rejects_bad_definitions(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GenomeSpace(**kwargs)


def test_space_reflect_and_clip_land_inside() -> None:
    space = GenomeSpace(dims=3, low=[-1.0, 0.0, 10.0], high=[1.0, 0.5, 20.0])
    rng = np.random.default_rng(0)
    for point in rng.normal(0.0, 50.0, size=(500, 3)):
        assert space.contains(space.reflect(point)) and space.contains(space.clip(point))
    inside = (0.25, 0.125, 15.0)
    assert space.reflect(inside) == inside and space.clip(inside) == inside
    assert space.reflect([1.5, -0.25, 21.0]) == (0.5, 0.25, 19.0)
    assert space.reflect([np.inf, -np.inf, 10.0]) == (1.0, 0.0, 10.0)


# -- optimisation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_strategies_find_the_maximum(config: str) -> None:
    name, settings = CONFIGS[config]
    strategy = get_strategy(name, SPACE, seed=1, **settings)
    drive(strategy, steps=10_000, workers=3)
    assert strategy.done
    best, fitness = strategy.best()
    assert fitness > -1e-3, fitness
    assert np.max(np.abs(np.asarray(best.genome) - OPTIMUM)) < 0.03
    # ...and beats random search given the same number of evaluations by a wide margin
    rand = get_strategy("random", SPACE, seed=1, batch_size=strategy.evaluations, max_generations=1)
    run_to_end(rand)
    assert fitness > 100 * rand.best()[1]


def test_cma_mean_converges() -> None:
    es = get_strategy("cma-es", SPACE, seed=3, popsize=8, max_generations=60)
    run_to_end(es)
    assert isinstance(es, CMAES)
    assert np.allclose(es.mean, OPTIMUM, atol=1e-3) and es.sigma < 0.01


# -- determinism and resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_same_seed_same_run_other_seed_other_run(config: str) -> None:
    name, settings = CONFIGS[config]
    a = drive(get_strategy(name, SPACE, seed=5, **settings), steps=120, fail_every=5)
    b = drive(get_strategy(name, SPACE, seed=5, **settings), steps=120, fail_every=5)
    c = drive(get_strategy(name, SPACE, seed=6, **settings), steps=120, fail_every=5)
    assert a == b
    assert a != c


@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_reproduces_the_exact_candidate_sequence(config: str) -> None:
    name, settings = CONFIGS[config]
    settings = {**settings, "seed": 11, "max_generations": 12}
    uninterrupted = get_strategy(name, SPACE, **settings)
    full = drive(uninterrupted, steps=400, workers=3, fail_every=4)
    cuts_with_pending = 0
    for cut in (
        1,
        5,
        13,
        37,
        101,
        150,
    ):  # inside generation 0, mid-generation later, across barriers
        first = get_strategy(name, SPACE, **settings)
        head = drive(first, steps=cut, workers=3, fail_every=4)
        cuts_with_pending += bool(first.pending)
        saved = json.loads(json.dumps(first.state_dict()))  # what a scheduler persists
        resumed = strategy_from_state(saved)
        assert resumed.pending == first.pending
        tail = drive(resumed, steps=400 - cut, workers=3, fail_every=4)
        assert head + tail == full, f"resume after {cut} events diverged"
        assert resumed.best() == uninterrupted.best()
        assert resumed.generation == uninterrupted.generation
    assert cuts_with_pending >= 4


def test_load_state_dict_into_an_existing_strategy_and_extend_max_generations() -> None:
    ga = get_strategy("ga", SPACE, seed=2, population_size=6, max_generations=3)
    run_to_end(ga)
    assert ga.done and not ga.can_ask
    longer = GeneticAlgorithm(SPACE, GASettings(seed=2, population_size=6, max_generations=5))
    longer.load_state_dict(ga.state_dict())
    assert not longer.done and longer.generation == 3
    reference = get_strategy("ga", SPACE, seed=2, population_size=6, max_generations=5)
    run_to_end(reference)
    run_to_end(longer)
    assert (
        longer.best() == reference.best()
        and longer.evaluations == reference.evaluations == 6 + 4 * 5
    )


def test_load_state_dict_refuses_another_strategy_space_or_settings() -> None:
    state = get_strategy("cma-es", SPACE, seed=1).state_dict()
    with pytest.raises(EvolutionError, match="strategy 'cma-es'"):
        get_strategy("ga", SPACE).load_state_dict(state)
    with pytest.raises(EvolutionError, match="genome space"):
        get_strategy("cma-es", GenomeSpace(dims=4), seed=1).load_state_dict(state)
    with pytest.raises(EvolutionError, match="sigma0"):
        get_strategy("cma-es", SPACE, seed=1, sigma0=0.5).load_state_dict(state)
    assert StrategyState.model_validate(state).strategy == "cma-es"


def test_generational_results_do_not_depend_on_tell_order() -> None:
    for name, settings in (("cma-es", {"popsize": 6}), ("ga", {"population_size": 6})):
        runs = []
        for reverse in (False, True):
            s = get_strategy(name, SPACE, seed=4, **settings)
            batch = [s.ask() for _ in range(6)]
            for c in reversed(batch) if reverse else batch:
                s.tell(c.id, neg_sphere(c.genome))
            runs.append([s.ask() for _ in range(5)])
        assert runs[0] == runs[1], name


def test_cma_leaves_numpy_global_random_state_alone_and_instances_independent() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    solo = get_strategy("cma-es", SPACE, seed=9, popsize=6, max_generations=4)
    run_to_end(solo)
    a = get_strategy("cma-es", SPACE, seed=9, popsize=6, max_generations=4)
    b = get_strategy("cma-es", SPACE, seed=10, popsize=6, max_generations=4)
    while not a.done:  # interleaved with another instance
        for s in (a, b):
            c = s.ask()
            s.tell(c.id, neg_sphere(c.genome))
    assert a.best() == solo.best()
    assert (
        np.random.random() == expected
    )  # numpy's global generator was neither seeded nor drawn from


# -- failures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_failed_candidates_rank_last_and_do_not_crash(config: str) -> None:
    name, settings = CONFIGS[config]
    s = get_strategy(name, SPACE, seed=3, **{**settings, "max_generations": 25})
    with pytest.raises(EvolutionError, match="no successful result"):
        s.best()
    for i in range(40):  # a stretch where everything fails (whole generations included)
        s.tell(s.ask().id, None if i % 2 else float("nan"))
    with pytest.raises(EvolutionError, match="no successful result"):
        s.best()
    trace = drive(s, steps=5_000, fail_every=3)
    assert s.done
    failed = {t[1] for t in trace if t[0] == "tell" and t[2] is None}
    assert failed and s.best()[0].id not in failed
    assert s.best()[1] > -0.05


def test_cma_failure_penalty_is_the_fitness_failures_get() -> None:
    runs = []
    for penalised in (True, False):
        es = get_strategy(
            "cma-es", SPACE, seed=0, popsize=6, failure_penalty=-0.5 if penalised else None
        )
        for i, c in enumerate([es.ask() for _ in range(6)]):
            failed = i in (1, 4)
            es.tell(c.id, (None if penalised else -0.5) if failed else neg_sphere(c.genome))
        runs.append([es.ask().genome for _ in range(6)])
    assert runs[0] == runs[1]
    with pytest.raises(ConfigError, match="cma_options"):
        get_strategy("cma-es", SPACE, cma_options={"bounds": [0, 1]})


# -- bounds ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_candidates_stay_inside_bounds(config: str) -> None:
    name, settings = CONFIGS[config]
    space = GenomeSpace(
        dims=3, low=[0.0, -5.0, 100.0], high=[0.1, 5.0, 101.0], initial=[0.0, 5.0, 100.5]
    )
    extra = (
        {"mutation_sigma": 2.0, "mutation_rate": 1.0, "blend_alpha": 2.0}
        if name == "ga"
        else {"sigma0": 3.0}
    )
    s = get_strategy(name, space, seed=0, **{**settings, "max_generations": 15}, **extra)
    seen = 0
    while not s.done:
        c = s.ask()
        assert space.contains(c.genome), c.genome
        seen += 1
        s.tell(c.id, float(np.sum(c.genome)))  # pushes towards the upper corner
    assert seen >= 15 * 8
    assert s.best()[1] > sum(space.high) - 0.5


# -- steady state -------------------------------------------------------------------------------------------


def test_cma_steady_state_asks_without_tells() -> None:
    es = get_strategy("cma-es", SPACE, seed=0, popsize=5, steady_state=True)
    first = [es.ask() for _ in range(13)]  # beyond popsize: more samples of the same distribution
    assert len({c.genome for c in first}) == 13 and {c.generation for c in first} == {0}
    assert es.can_ask
    for c in reversed(first[:5]):
        es.tell(c.id, neg_sphere(c.genome))
    assert es.generation == 1 and isinstance(es, CMAES) and es.late_results == 0
    nxt = es.ask()
    assert nxt.generation == 1
    for c in first[5:]:  # late results: count for best(), not for the update
        es.tell(c.id, 10.0 if c is first[-1] else neg_sphere(c.genome))
    assert es.late_results == 8 and es.generation == 1
    assert es.best() == (first[-1], 10.0)


def test_ga_steady_state_breeds_from_whatever_is_told() -> None:
    ga = get_strategy("ga", SPACE, seed=0, population_size=4, max_generations=3, steady_state=True)
    initial = [ga.ask() for _ in range(6)]  # 4 initial + 2 random: nothing told yet
    assert initial[0].genome == SPACE.initial and all(c.parents == () for c in initial)
    for c in initial[:3]:
        ga.tell(c.id, neg_sphere(c.genome))
    child = ga.ask()
    assert child.parents and set(child.parents) <= {c.id for c in initial[:3]}
    for c in initial[3:] + [child]:
        ga.tell(c.id, neg_sphere(c.genome))
    assert isinstance(ga, GeneticAlgorithm) and len(ga.population) == 4
    best = ga.best()
    assert best in [(c, f) for c, f in ga.population]  # replace-worst never drops the best
    while ga.can_ask:
        ga.ask()
    assert ga.evaluations + len(ga.pending) == 12 and not ga.done  # budget handed out, results due
    for c in ga.pending:
        ga.tell(c.id, None)
    assert ga.done and ga.best() == best
    assert all(f is not None for _, f in ga.population)  # failures never enter a full population
    assert best in [(c, f) for c, f in ga.population]


def test_generational_mode_has_a_barrier() -> None:
    for s in (
        get_strategy("cma-es", SPACE, popsize=4),
        get_strategy("ga", SPACE, population_size=4),
    ):
        cs = [s.ask() for _ in range(4)]
        assert not s.can_ask
        with pytest.raises(EvolutionError, match="steady_state=True"):
            s.ask()
        for c in cs:
            s.tell(c.id, 0.0)
        assert s.can_ask and s.ask().generation == 1


def test_ga_records_parents_from_the_previous_generation() -> None:
    ga = get_strategy("ga", SPACE, seed=1, population_size=6, elitism=2)
    gen0 = [ga.ask() for _ in range(6)]
    for c in gen0:
        ga.tell(c.id, neg_sphere(c.genome))
    children = [ga.ask() for _ in range(4)]  # population_size - elitism
    assert not ga.can_ask
    ids = {c.id for c in gen0}
    assert all(c.parents and set(c.parents) <= ids for c in children)
    for c in children:
        ga.tell(c.id, -1e9)
    assert isinstance(ga, GeneticAlgorithm)
    top2 = sorted(gen0, key=lambda c: neg_sphere(c.genome), reverse=True)[:2]
    assert [c for c, _ in ga.population[:2]] == top2  # elites carried, not re-evaluated


# -- protocol misuse and registry -------------------------------------------------------------------------


def test_tell_unknown_or_twice_and_ask_when_done() -> None:
    s = get_strategy("ga", SPACE, population_size=2, max_generations=1)
    a = s.ask()
    with pytest.raises(EvolutionError, match="no pending candidate 'nope'"):
        s.tell("nope", 1.0)
    s.tell(a.id, 1.0)
    with pytest.raises(EvolutionError, match="already told"):
        s.tell(a.id, 1.0)
    s.tell(s.ask().id, 2.0)
    assert s.done
    with pytest.raises(EvolutionError, match="raise max_generations"):
        s.ask()


def test_unknown_names_list_the_known_ones() -> None:
    assert known_strategies() == ["cma-es", "ga", "random"]
    with pytest.raises(
        UnknownNameError, match=r"unknown strategy 'nope'; known: cma-es, ga, random"
    ) as info:
        get_strategy("nope", SPACE)
    assert info.value.context["name"] == "nope"
    with pytest.raises(UnknownNameError, match=r"unknown setting 'popsiz'.*popsize"):
        get_strategy("cma-es", SPACE, popsiz=4)
    with pytest.raises(UnknownNameError, match=r"unknown crossover 'sbx'; known: blend, uniform"):
        get_strategy("ga", SPACE, crossover="sbx")
    with pytest.raises(ConfigError, match="elitism"):
        get_strategy("ga", SPACE, population_size=4, elitism=4)
    with pytest.raises(ConfigError, match="popsize"):
        CMAES(SPACE, CMAESSettings(popsize=1))
