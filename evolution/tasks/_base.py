"""What a fitness task is: a frozen, picklable description that scores one loaded model.

A task scores the model an evaluator holds (``transformers`` causal LM + tokenizer) on one
**domain** and returns one float where **higher is better** — every task, without exception, so
that the scheduler can add domains up and the regression gate can compare them the same way:

=============  ==============================================  ==========================
task           score                                           range
=============  ==============================================  ==========================
perplexity     minus the mean token negative log-likelihood     (-inf, 0]; exp(-s) = ppl
exact_match    fraction of prompts whose answer matches          [0, 1]
callable       whatever ``fn(model, tokenizer)`` returns         user-defined, higher better
=============  ==============================================  ==========================

Tasks are frozen pydantic models: they are validated when built (from Python or from the YAML
of a run config: ``{task: perplexity, domain: wiki, texts: [...]}``), persisted with the run and
pickled into every evaluation request. Each subclass sets ``task`` to its registry name.

Example:
    >>> from evolution.tasks import Perplexity
    >>> t = Perplexity("wiki", ["Hello world"], max_length=64)
    >>> t.domain, t.task
    ('wiki', 'perplexity')
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["FitnessTask"]


class FitnessTask(BaseModel, abc.ABC):
    """Base of every fitness task: ``score(model, tokenizer)`` -> one float, higher is better.

    Subclasses declare their fields (frozen), set ``name`` and a ``task`` field whose default is
    that name, and implement :meth:`score`. Register them with
    :func:`evolution.tasks.register_task`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: ClassVar[str] = ""  # registry name, e.g. "perplexity"

    task: str  # registry name again, as a field: it is what config files and the store carry
    domain: str = Field(min_length=1)  # what the score measures ("math", "code"); unique per run

    @model_validator(mode="after")
    def _task_is_name(self) -> FitnessTask:
        if self.task != type(self).name:
            raise ValueError(f"`task` of a {type(self).__name__} is {type(self).name!r}, got {self.task!r}")
        return self

    @abc.abstractmethod
    def score(self, model: Any, tokenizer: Any) -> float:
        """Score ``model`` on this task's data.

        Args:
            model: a ``transformers`` causal LM in eval mode, on its device.
            tokenizer: its tokenizer.

        Returns:
            One float, higher is better (see the table in the module docstring).

        Raises:
            Exception: anything; the evaluator records the traceback and fails the candidate.
        """

    def describe(self) -> str:
        """A one-line summary for tables (``perplexity[wiki]``)."""
        return f"{self.task}[{self.domain}]"
