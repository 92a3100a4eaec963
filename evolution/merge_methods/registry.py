"""Merge methods by name: ``register`` a class, ``get_method(name)``, ``known_methods()``.

Each method module registers its class at import time; ``evolution.merge_methods`` imports them
all, so every built-in name is known as soon as the package is imported.

Example:
    >>> from evolution.merge_methods import get_method, known_methods
    >>> "ties" in known_methods(), get_method("ties").needs_base
    (True, True)
"""

from __future__ import annotations

from typing import TypeVar

from evolution._exceptions import UnknownNameError
from evolution.merge_methods._base import MergeMethod

__all__ = ["get_method", "known_methods", "register"]

M = TypeVar("M", bound=type[MergeMethod])

_REGISTRY: dict[str, MergeMethod] = {}


def register(cls: M) -> M:
    """Class decorator: add one instance of ``cls`` under ``cls.name``.

    Args:
        cls: a ``MergeMethod`` subclass with a unique ``name``.

    Returns:
        ``cls`` unchanged.

    Raises:
        ValueError: the name is already taken by another class.

    Example:
        >>> @register                                                  # doctest: +SKIP
        ... class Mean(MergeMethod):
        ...     name = "mean"
        ...     def merge_tensor(self, name, base, tensors, params):
        ...         return sum(tensors) / len(tensors)
    """
    name = cls.name
    existing = _REGISTRY.get(name)
    if existing is not None and _qualname(type(existing)) != _qualname(cls):  # reload is fine
        raise ValueError(
            f"merge method name {name!r} is already registered by {type(existing).__qualname__}; "
            "give the new method another name"
        )
    _REGISTRY[name] = cls()
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``.

    Args:
        name: a method name as a recipe writes it ("linear", "ties", ...).

    Returns:
        The method instance (methods are stateless; one instance is shared).

    Raises:
        UnknownNameError: no such method; the message lists the known ones.

    Example:
        >>> get_method("slerp").max_models
        2
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown merge method {name!r}; known methods: {', '.join(known_methods())} "
            "(set `method:` in the recipe to one of them)",
            name=name,
            known=known_methods(),
        ) from None


def known_methods() -> list[str]:
    """Sorted names of every registered method.

    Example:
        >>> known_methods()[:2]
        ['breadcrumbs', 'dare_linear']
    """
    return sorted(_REGISTRY)
