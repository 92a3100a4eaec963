"""Strategies by name: config says ``strategy: cma-es`` and gets a :class:`Strategy`.

Each strategy module registers its class at import time with :func:`register_strategy`;
``evolution.strategies`` imports them all, so the built-in names ``cma-es`` (:mod:`.cma_es`),
``ga`` (:mod:`.genetic`) and ``random`` (:mod:`.random_search`) are known as soon as the package
is imported. An unknown name raises :class:`UnknownNameError` listing the known ones; so does an
unknown setting, listing the strategy's settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from evolution._exceptions import EvolutionError, UnknownNameError
from evolution.strategies._base import Strategy
from evolution.strategies._candidate import StrategyState
from evolution.strategies._space import GenomeSpace

__all__ = [
    "get_strategy",
    "known_strategies",
    "register_strategy",
    "strategy_class",
    "strategy_from_state",
]

T = TypeVar("T", bound=type[Strategy[Any]])

_STRATEGIES: dict[str, type[Strategy[Any]]] = {}


def known_strategies() -> list[str]:
    """Sorted names of every registered strategy.

    Example:
        >>> known_strategies()
        ['cma-es', 'ga', 'random']
    """
    return sorted(_STRATEGIES)


def strategy_class(name: str) -> type[Strategy[Any]]:
    """The class registered under ``name``.

    Args:
        name: a registered name, e.g. ``"cma-es"``.

    Returns:
        The :class:`Strategy` subclass.

    Raises:
        UnknownNameError: no such strategy; the message lists the known ones.

    Example:
        >>> strategy_class("ga").__name__
        'GeneticAlgorithm'
    """
    try:
        return _STRATEGIES[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown strategy {name!r}; known: {', '.join(known_strategies())}",
            name=name,
            known=known_strategies(),
        ) from None


def get_strategy(name: str, space: GenomeSpace, **settings: Any) -> Strategy[Any]:
    """Build the strategy ``name`` over ``space`` with keyword ``settings``.

    Args:
        name: a registered name (see :func:`known_strategies`).
        space: the genome space to search.
        **settings: fields of the strategy's settings dataclass (e.g. ``popsize=8, seed=1``
            for ``cma-es``); unset fields keep their defaults.

    Returns:
        A fresh strategy.

    Raises:
        UnknownNameError: unknown strategy or setting name; the message lists the known ones.
        hive.ConfigError: a setting has a bad value (the message names it).

    Example:
        >>> s = get_strategy("cma-es", GenomeSpace(dims=4, low=-1.0, high=1.0), popsize=6, seed=7)
        >>> type(s).__name__, s.settings.popsize
        ('CMAES', 6)
    """
    cls = strategy_class(name)
    fields = [f.name for f in dataclasses.fields(cls.settings_type)]
    for key in settings:
        if key not in fields:
            raise UnknownNameError(
                f"unknown setting {key!r} for strategy {name!r}; known: {', '.join(sorted(fields))}",
                name=key,
                strategy=name,
                known=sorted(fields),
            )
    return cls(space, cls.settings_type(**settings))


def strategy_from_state(state: Mapping[str, Any] | StrategyState) -> Strategy[Any]:
    """Rebuild a strategy from :meth:`Strategy.state_dict` output; it continues exactly.

    Args:
        state: the saved state (a dict, its JSON round trip, or a :class:`StrategyState`).

    Returns:
        A strategy of the saved kind, space and settings, in the saved state.

    Raises:
        UnknownNameError: the state names a strategy this process does not know.
        EvolutionError: the state cannot be loaded (e.g. saved with another ``cma`` version).
        pydantic.ValidationError: the state is malformed.

    Example:
        >>> s = get_strategy("random", GenomeSpace(dims=2), seed=4)
        >>> strategy_from_state(s.state_dict()).ask() == s.ask()
        True
    """
    st = state if isinstance(state, StrategyState) else StrategyState.model_validate(dict(state))
    cls = strategy_class(st.strategy)
    strategy = cls(st.space, cls.settings_type(**st.settings))
    strategy.load_state_dict(st)
    return strategy


def register_strategy(cls: T) -> T:
    """Class decorator: register a :class:`Strategy` subclass under its ``name``.

    Args:
        cls: the subclass; it must set the class attributes ``name`` and ``settings_type``.

    Returns:
        ``cls``, unchanged.

    Raises:
        EvolutionError: ``name``/``settings_type`` missing, or the name is taken by another class
            (re-registering the same class, e.g. after a module reload, is fine).

    Example:
        >>> @register_strategy                                          # doctest: +SKIP
        ... class Sobol(Strategy[SobolSettings]):
        ...     name = "sobol"
        ...     settings_type = SobolSettings
        ...     ...
    """
    name = getattr(cls, "name", None)
    if (
        not isinstance(name, str)
        or not name
        or not isinstance(getattr(cls, "settings_type", None), type)
    ):
        raise EvolutionError(
            f"{cls.__name__} must set the class attributes name and settings_type to register"
        )
    existing = _STRATEGIES.get(name)
    if existing is not None and _qualname(existing) != _qualname(cls):
        raise EvolutionError(
            f"strategy name {name!r} is already registered by {existing.__qualname__}; "
            "give the new strategy another name",
            name=name,
        )
    _STRATEGIES[name] = cls
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
