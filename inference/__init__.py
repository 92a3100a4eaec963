"""Sharded (pipeline-parallel) inference of Hugging Face causal LMs on hive.

Example:
    >>> import hive, inference
    >>> # hive.init()
    >>> # plan = inference.plan("path/to/checkpoint", max_batch=8, max_seq_len=2048); print(plan)
    >>> # session = inference.deploy(plan)
    >>> # for chunk in session.generate("Hello", max_new_tokens=32, stream=True): print(chunk.text, end="")
"""

from inference._checkpoint import Checkpoint, TensorInfo
from inference._costs import LayerCosts, layer_costs_from_config
from inference._exceptions import CheckpointError, InferenceError, PlanError, StageError
from inference._gguf import convert_gguf, smollm2_checkpoint
from inference._inventory import inventory, measure_throughput
from inference._local import LocalPipeline
from inference._partition import Placement, partition
from inference._pipeline import GenerationStats, TokenEvent, run_generation, run_generation_steps
from inference._plan import DeviceInfo, ShardingPlan, StagePlan
from inference._planner import plan
from inference._rebalance import replan_with_throughput
from inference._sampling import SampleSpec, SamplingParams, pick_tokens, sample_next, token_generator
from inference._session import Completion, InferenceSession, TokenChunk, attach, deploy, deployments
from inference._sharding import ShardingCoordinator
from inference._stage import StageCompute, position_ids_from_mask
from inference._stage_actor import StageActor
from inference._transport import (
    LocalTransport,
    RayTransport,
    StageLostError,
    StepInput,
    ThreadedTransport,
    Transport,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Completion",
    "DeviceInfo",
    "GenerationStats",
    "InferenceError",
    "InferenceSession",
    "LayerCosts",
    "LocalPipeline",
    "LocalTransport",
    "Placement",
    "PlanError",
    "RayTransport",
    "SampleSpec",
    "SamplingParams",
    "ShardingCoordinator",
    "ShardingPlan",
    "StageActor",
    "StageCompute",
    "StageError",
    "StageLostError",
    "StagePlan",
    "StepInput",
    "TensorInfo",
    "ThreadedTransport",
    "TokenChunk",
    "TokenEvent",
    "Transport",
    "attach",
    "convert_gguf",
    "deploy",
    "deployments",
    "inventory",
    "layer_costs_from_config",
    "measure_throughput",
    "partition",
    "pick_tokens",
    "plan",
    "position_ids_from_mask",
    "replan_with_throughput",
    "run_generation",
    "run_generation_steps",
    "sample_next",
    "smollm2_checkpoint",
    "token_generator",
]
