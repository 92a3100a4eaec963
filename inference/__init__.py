"""Sharded (pipeline-parallel) inference of Hugging Face causal LMs on hive.

The planner, stage actors and pipelined generation land with the sharded-inference issue;
today the package exposes its error tree.
"""

from inference._exceptions import CheckpointError, InferenceError, PlanError, StageError

__all__ = ["CheckpointError", "InferenceError", "PlanError", "StageError"]
