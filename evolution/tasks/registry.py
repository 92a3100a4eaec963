"""Fitness tasks by name: ``register_task`` a class, ``get_task(name)``, ``task_from_spec(dict)``.

Every task module registers its class at import time; ``evolution.tasks`` imports them all, so
the built-in names ``perplexity``, ``exact_match`` and ``callable`` are known as soon as the
package is imported. An unknown name raises ``UnknownNameError`` listing the known ones.

Example:
    >>> from evolution.tasks import task_from_spec
    >>> task_from_spec({"task": "exact_match", "domain": "math", "data": [["1+1=", "2"]]}).domain
    'math'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from evolution._exceptions import UnknownNameError
from evolution.tasks._base import FitnessTask

__all__ = ["get_task", "known_tasks", "register_task", "task_from_spec"]

T = TypeVar("T", bound=type[FitnessTask])

_TASKS: dict[str, type[FitnessTask]] = {}


def register_task(cls: T) -> T:
    """Class decorator: register a :class:`FitnessTask` subclass under ``cls.name``.

    Args:
        cls: the subclass; ``name`` must be set and unique.

    Returns:
        ``cls`` unchanged.

    Raises:
        ValueError: no ``name``, or the name is taken by another class.

    Example:
        >>> @register_task                                              # doctest: +SKIP
        ... class Rouge(FitnessTask):
        ...     name = "rouge"
        ...     task: str = "rouge"
    """
    name = cls.name
    if not name:
        raise ValueError(f"{cls.__qualname__} must set the class attribute `name` to register")
    existing = _TASKS.get(name)
    if existing is not None and _qualname(existing) != _qualname(cls):
        raise ValueError(
            f"fitness task name {name!r} is already registered by {existing.__qualname__}; "
            "give the new task another name"
        )
    _TASKS[name] = cls
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def known_tasks() -> list[str]:
    """Sorted names of every registered task.

    Example:
        >>> known_tasks()
        ['callable', 'exact_match', 'perplexity']
    """
    return sorted(_TASKS)


def get_task(name: str) -> type[FitnessTask]:
    """The task class registered as ``name``.

    Args:
        name: a registered name ("perplexity", ...).

    Returns:
        The :class:`FitnessTask` subclass.

    Raises:
        UnknownNameError: no such task; the message lists the known ones.

    Example:
        >>> get_task("perplexity").__name__
        'Perplexity'
    """
    try:
        return _TASKS[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown fitness task {name!r}; known tasks: {', '.join(known_tasks())} "
            "(set `task:` of each entry under `tasks:` to one of them)",
            name=name,
            known=known_tasks(),
        ) from None


def task_from_spec(spec: FitnessTask | Mapping[str, Any]) -> FitnessTask:
    """A task from its dict form (``{"task": name, "domain": ..., ...}``); tasks pass through.

    Raises:
        UnknownNameError: unknown ``task`` name (known ones listed).
        pydantic.ValidationError: bad or missing fields.
        ValueError: the dict has no ``task`` key.
    """
    if isinstance(spec, FitnessTask):
        return spec
    if not isinstance(spec, Mapping) or "task" not in spec:
        raise ValueError(
            f"a fitness task needs a `task:` name ({', '.join(known_tasks())}), got {spec!r}"
        )
    return get_task(str(spec["task"])).model_validate(dict(spec))
