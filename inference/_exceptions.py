"""Errors raised by the inference package.

Tree::

    HiveError (hive)
    └── InferenceError
        ├── CheckpointError       a checkpoint directory that cannot be read
        ├── PlanError             a model that does not fit, a bad manual layer range
        └── StageError            a stage actor failed; ``stage`` names it
"""

from __future__ import annotations

from hive import HiveError

__all__ = ["CheckpointError", "InferenceError", "PlanError", "StageError"]


class InferenceError(HiveError):
    """Base of every inference error."""


class CheckpointError(InferenceError):
    """A checkpoint cannot be read; ``path`` names it."""


class PlanError(InferenceError):
    """No valid sharding plan; the message says how much memory is missing where."""


class StageError(InferenceError):
    """A pipeline stage failed; ``stage`` names it."""
