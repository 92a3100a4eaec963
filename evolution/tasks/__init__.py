"""Fitness tasks: each scores one domain of a loaded model, higher is better.

One task per module, registered by name (``perplexity``, ``exact_match``, ``callable``); a run
config names them by string and ``get_task(name)`` fails with the known names on a typo. See
:mod:`._base` for what every score means.

Example:
    >>> from evolution.tasks import ExactMatch, Perplexity
    >>> tasks = [Perplexity("wiki", ["Some text."]), ExactMatch("math", [("1+1=", "2")])]
    >>> [t.describe() for t in tasks]
    ['perplexity[wiki]', 'exact_match[math]']
"""

from evolution.tasks._base import FitnessTask
from evolution.tasks.registry import get_task, known_tasks, register_task, task_from_spec

# Importing a task module registers it.
from evolution.tasks.callable_task import CallableTask  # isort: skip
from evolution.tasks.exact_match import ExactMatch  # isort: skip
from evolution.tasks.perplexity import Perplexity  # isort: skip

__all__ = [
    "CallableTask",
    "ExactMatch",
    "FitnessTask",
    "Perplexity",
    "get_task",
    "known_tasks",
    "register_task",
    "task_from_spec",
]
