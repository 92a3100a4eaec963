"""Errors raised by the evolution package.

Tree::

    HiveError (hive)
    └── EvolutionError
        ├── UnknownNameError      unknown merge method / strategy / task name (lists known ones)
        ├── MergeError            mismatched tensors, missing tensors; ``tensor`` names it
        │   └── NonFiniteError    a merged tensor holds NaN/inf; ``tensor``, ``count``
        ├── ChecksumError         a checkpoint whose sha256 does not match its record
        ├── RunNotFoundError      no evolution run of that name in the hive home; ``name``
        ├── RunConfigError        a run exists under that name with another config; ``name``
        └── RollbackError         no earlier good champion to roll back to; ``name``
"""

from __future__ import annotations

from hive import HiveError

__all__ = [
    "ChecksumError",
    "EvolutionError",
    "MergeError",
    "NonFiniteError",
    "RollbackError",
    "RunConfigError",
    "RunNotFoundError",
    "UnknownNameError",
]


class EvolutionError(HiveError):
    """Base of every evolution error."""


class UnknownNameError(EvolutionError):
    """A registry lookup failed; the message lists the known names."""


class MergeError(EvolutionError):
    """A merge cannot proceed; ``tensor`` names the offending tensor."""


class NonFiniteError(MergeError):
    """A merged tensor holds NaN or inf; ``tensor`` names it. Reject the candidate and go on."""


class ChecksumError(EvolutionError):
    """A checkpoint's sha256 differs from the recorded one; it is refused."""


class RunNotFoundError(EvolutionError):
    """No run of that name exists in the hive home; ``name`` and ``home`` say where we looked."""


class RunConfigError(EvolutionError):
    """A run of that name already exists with a different config; ``name`` names it."""


class RollbackError(EvolutionError):
    """There is no earlier good champion to restore; ``name`` names the run."""
