"""Errors raised by the evolution package.

Tree::

    HiveError (hive)
    └── EvolutionError
        ├── UnknownNameError      unknown merge method / strategy / task name (lists known ones)
        ├── MergeError            mismatched tensors, missing tensors; ``tensor`` names it
        └── ChecksumError         a checkpoint whose sha256 does not match its record
"""

from __future__ import annotations

from hive import HiveError

__all__ = ["ChecksumError", "EvolutionError", "MergeError", "UnknownNameError"]


class EvolutionError(HiveError):
    """Base of every evolution error."""


class UnknownNameError(EvolutionError):
    """A registry lookup failed; the message lists the known names."""


class MergeError(EvolutionError):
    """A merge cannot proceed; ``tensor`` names the offending tensor."""


class ChecksumError(EvolutionError):
    """A checkpoint's sha256 differs from the recorded one; it is refused."""
