"""``callable``: a user function ``fn(model, tokenizer) -> float`` as a fitness task.

The function travels to the evaluators inside each request (cloudpickle: a function defined in
a notebook is pickled by value, one from an importable module by reference, so that module
must be importable on the workers). It must return a finite number, higher is better; an
exception or a non-finite value fails the candidate with its traceback. In a run's JSON (the
lineage store) the function is kept as a base64 cloudpickle: load runs only from stores you
trust, as with any pickle.

Example:
    >>> def param_norm(model, tokenizer):
    ...     return -sum(float(p.norm()) for p in model.parameters())
    >>> CallableTask("size", param_norm).domain
    'size'
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import cloudpickle
from pydantic import field_serializer, field_validator

from evolution.tasks._base import FitnessTask
from evolution.tasks.registry import register_task

__all__ = ["CallableTask"]


@register_task
class CallableTask(FitnessTask):
    """Score = ``fn(model, tokenizer)``; higher is better."""

    name = "callable"

    task: str = "callable"  # registry name
    fn: Callable[[Any, Any], float]  # the scoring function (picklable with cloudpickle)

    def __init__(self, domain: str | None = None, fn: Callable[[Any, Any], float] | None = None,
                 **data: Any) -> None:  # fmt: skip
        if domain is not None:
            data["domain"] = domain
        if fn is not None:
            data["fn"] = fn
        super().__init__(**data)

    @field_validator("fn", mode="before")
    @classmethod
    def _unpickle(cls, value: Any) -> Any:
        if isinstance(value, str):  # the JSON form written by _pickle
            return cloudpickle.loads(base64.b64decode(value))
        return value

    @field_serializer("fn", when_used="json")
    def _pickle(self, fn: Callable[[Any, Any], float]) -> str:
        return base64.b64encode(cloudpickle.dumps(fn)).decode("ascii")

    def score(self, model: Any, tokenizer: Any) -> float:
        """``float(fn(model, tokenizer))``.

        Raises:
            TypeError: ``fn`` returned something that is not a number.
        """
        value = self.fn(model, tokenizer)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"callable task {self.domain!r}: fn returned {value!r}; it must return a float"
            ) from None

    def describe(self) -> str:
        """``callable[domain](fn name)``."""
        return f"callable[{self.domain}]({getattr(self.fn, '__name__', type(self.fn).__name__)})"
