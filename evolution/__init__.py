"""Evolutionary model merging on hive.

Merge methods, search strategies and the scheduler land with the evolution issue;
today the package exposes its error tree.
"""

from evolution._exceptions import ChecksumError, EvolutionError, MergeError, UnknownNameError

__all__ = ["ChecksumError", "EvolutionError", "MergeError", "UnknownNameError"]
