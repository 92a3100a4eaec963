"""Evolutionary model merging on hive.

Merge methods stream tensor by tensor from safetensors; search strategies (CMA-ES, GA,
random) propose merge recipes through one ask/tell interface; Evaluator agents merge each
candidate in place into a resident model and score it per domain; the EvolutionScheduler
persists every candidate in SQLite, keeps a champion behind a regression gate, rolls back,
and resumes after a crash.

Example:
    >>> import hive, evolution
    >>> # hive.init()
    >>> # cfg = evolution.EvolutionConfig(base_model="base", models=["math", "code"], method="ties",
    >>> #     strategy="cma-es", population=8, generations=4,
    >>> #     tasks=[evolution.tasks.ExactMatch("math", data=[("1+1=", "2")])], tolerances={"math": 0.03})
    >>> # sched = evolution.EvolutionScheduler.launch(cfg, name="exp-1"); result = sched.run_round()
"""

from evolution import tasks
from evolution._checksum import sha256_dir, verify
from evolution._config import EvolutionConfig
from evolution._demonstration import DemonstrationResult, DemonstrationSettings, run_demonstration
from evolution._evaluator import EvaluationRequest, EvaluationResult, Evaluator
from evolution._exceptions import (
    ChecksumError,
    EvolutionError,
    MergeError,
    NonFiniteError,
    RollbackError,
    RunConfigError,
    RunNotFoundError,
    UnknownNameError,
)
from evolution._gate import GateDecision, RegressionGate
from evolution._genome import GenomeLayout
from evolution._merge import MergeResult, merge
from evolution._recipe import LayerGroup, MergeRecipe, ModelOverride, ModelSpec
from evolution._result import RoundResult
from evolution._scheduler import EvolutionScheduler, RecheckReport
from evolution.merge_methods import get_method, known_methods
from evolution.strategies import Candidate, GenomeSpace, Strategy, get_strategy, known_strategies
from evolution.tasks import CallableTask, ExactMatch, FitnessTask, Perplexity

__all__ = [
    "CallableTask",
    "Candidate",
    "ChecksumError",
    "DemonstrationResult",
    "DemonstrationSettings",
    "EvaluationRequest",
    "EvaluationResult",
    "Evaluator",
    "EvolutionConfig",
    "EvolutionError",
    "EvolutionScheduler",
    "ExactMatch",
    "FitnessTask",
    "GateDecision",
    "GenomeLayout",
    "GenomeSpace",
    "LayerGroup",
    "MergeError",
    "MergeRecipe",
    "MergeResult",
    "ModelOverride",
    "ModelSpec",
    "NonFiniteError",
    "Perplexity",
    "RecheckReport",
    "RegressionGate",
    "RollbackError",
    "RoundResult",
    "RunConfigError",
    "RunNotFoundError",
    "Strategy",
    "UnknownNameError",
    "get_method",
    "get_strategy",
    "known_methods",
    "known_strategies",
    "merge",
    "run_demonstration",
    "sha256_dir",
    "tasks",
    "verify",
]
