"""An honest demonstration: an evolved merge of two specialists against the usual baselines.

Per seed, from scratch, on CPU (about two minutes a seed on a busy 2-core machine):

1. a tiny Llama base (2 layers, 64 wide, the character tokenizer of ``hive demo``) is
   pre-trained on the *format* of both tasks of :mod:`evolution._demonstration_data` (it scores 0
   on both);
2. two **specialists** are fine-tuned from it, one per task, and a **multitask** model on both
   with the same step budget (the upper bound); all are real HF safetensors checkpoints;
3. the baselines are merged with :func:`evolution.merge`: uniform averaging (``linear``), plain
   task arithmetic (weights 1, 1) and TIES (default density 0.2);
4. an :class:`EvolutionScheduler` round on hive (CMA-ES over per-layer-group ``task_arithmetic``
   weights, starting from plain task arithmetic) is scored on the **validation** split; its
   champion checkpoint is then scored, like every other model, on the **held-out test** split.

Scores are exact-match accuracy in points (0-100, :class:`ExactMatch`, greedy decoding); the
combined score is the mean over the two tasks. The claim checked is
``evolved - max(specialists) >= 5`` points on the combined test score in at least 4 of 5 seeds.

Example:
    >>> result = run_demonstration(seeds=range(5))                      # doctest: +SKIP
    >>> print(result.markdown()); result.holds()                        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

import hive
from evolution._demonstration_data import TASKS, Pair, Splits, format_example, make_splits

__all__ = ["METHODS", "DemonstrationResult", "DemonstrationSettings", "MethodScore",
           "run_demonstration"]  # fmt: skip

# Table rows, in order: (method, what it is)
METHODS = {
    "base": "pre-trained on the format only",
    "inc-specialist": "fine-tuned on inc",
    "upper-specialist": "fine-tuned on upper",
    "uniform-average": "linear, weights 0.5 / 0.5",
    "task-arithmetic": "task_arithmetic, weights 1 / 1",
    "ties": "ties, density 0.2, weights 1 / 1",
    "evolved": "champion of a CMA-ES round (validation split)",
    "multitask": "fine-tuned on inc + upper (upper bound)",
}
PARENTS = ("inc-specialist", "upper-specialist")


@dataclass
class DemonstrationSettings:
    """Sizes and budgets of one seed's run (the defaults are the documented run)."""

    hidden_size: int = 64  # model width
    layers: int = 2  # decoder layers
    pretrain_steps: int = 300  # base pre-training steps (format only)
    pretrain_lr: float = 3e-3  # its AdamW learning rate (warm-up, then linear decay)
    finetune_steps: int = 100  # steps of each specialist and of the multitask model
    finetune_lr: float = 1e-3  # their AdamW learning rate
    batch_size: int = 64  # sequences per step
    n_val: int = 50  # validation pairs per task (the search's fitness)
    n_test: int = 100  # held-out test pairs per task (the reported figures)
    population: int = 8  # CMA-ES candidates per generation
    generations: int = 3  # CMA-ES generations
    layer_groups: int = 2  # decoder-layer groups with their own weights (plus "all")
    max_weight: float = 1.5  # upper bound of each task-vector weight (lower bound 0)
    tolerance: float = 0.1  # regression gate: allowed validation drop per task (fraction)
    evaluators: int = 2  # Evaluator agents of the round
    torch_threads: int = 1  # torch threads of this process while training and scoring


class MethodScore(BaseModel):
    """One table row: a method's held-out test accuracy per task, in points."""

    model_config = ConfigDict(frozen=True)

    seed: int  # the seed of the run
    method: str  # a key of METHODS
    scores: dict[str, float]  # task -> exact-match accuracy on the test split (0-100)
    combined: float  # mean of the task accuracies


@dataclass(frozen=True)
class DemonstrationResult:
    """Every seed's rows, splits and champion, and the claim's check."""

    rows: tuple[MethodScore, ...]  # seed by seed, METHODS order
    splits: dict[int, Splits]  # seed -> the splits it used
    champions: dict[int, str] = field(default_factory=dict)  # seed -> champion checkpoint dir

    def score(self, seed: int, method: str) -> MethodScore:
        """The row of ``method`` for ``seed``."""
        return next(r for r in self.rows if r.seed == seed and r.method == method)

    def margins(self) -> dict[int, float]:
        """Seed -> evolved combined minus the better specialist's combined (points)."""
        seeds = sorted({r.seed for r in self.rows})
        return {s: self.score(s, "evolved").combined
                - max(self.score(s, p).combined for p in PARENTS) for s in seeds}  # fmt: skip

    def holds(self, min_margin: float = 5.0, min_seeds: int = 4) -> bool:
        """Whether the evolved merge beats both specialists by ``min_margin`` in ``min_seeds``."""
        return sum(m >= min_margin for m in self.margins().values()) >= min_seeds

    def to_pandas(self) -> Any:
        """One row per (seed, method): the task accuracies and the combined score."""
        import pandas as pd

        return pd.DataFrame([{"seed": r.seed, "method": r.method, **r.scores, "combined": r.combined}
                             for r in self.rows])  # fmt: skip

    def markdown(self) -> str:
        """Methods down, seeds across (combined test score), plus the margin row."""
        seeds = sorted(self.splits)
        head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
        lines = [head, "|---" * (len(seeds) + 2) + "|"]
        for method in METHODS:
            vals = [self.score(s, method).combined for s in seeds]
            lines.append(f"| {method} | " + " | ".join(f"{v:.1f}" for v in vals)
                         + f" | {sum(vals) / len(vals):.1f} |")  # fmt: skip
        margins = [self.margins()[s] for s in seeds]
        lines.append("| evolved - best specialist | " + " | ".join(f"{m:+.1f}" for m in margins)
                     + f" | {sum(margins) / len(margins):+.1f} |")  # fmt: skip
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- training


@contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars (one per saved or loaded checkpoint otherwise)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _model_config(s: DemonstrationSettings) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=s.hidden_size, intermediate_size=4 * s.hidden_size,
        num_hidden_layers=s.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )  # fmt: skip


def _batch(tokenizer: Any, pairs: list[Pair]) -> tuple[Any, Any, Any]:
    """Right-padded ``(input_ids, attention_mask, labels)``; loss on the answer + newline only."""
    import torch

    seqs, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + "\n", add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)  # (B, T)
    lab = torch.full((len(seqs), width), -100)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, (seq, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(seq)] = torch.tensor(seq)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(seq)] = 1
    return ids, mask, lab


def _train(model: Any, tokenizer: Any, sample: Callable[[random.Random], Pair], steps: int,
           lr: float, batch_size: int, seed: int) -> Any:  # fmt: skip
    """AdamW with 20 warm-up steps and linear decay to 0, gradient clipping at 1."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 20) * (1 - k / steps)
    )
    model.train()
    for _ in range(steps):
        ids, mask, labels = _batch(tokenizer, [sample(rng) for _ in range(batch_size)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay.step()
    return model.eval()


def build_checkpoints(root: Path, splits: Splits, s: DemonstrationSettings) -> dict[str, Path]:
    """Pre-train the base, fine-tune both specialists and the multitask model; save all four.

    Returns:
        ``{"base", "inc", "upper", "multitask"}`` -> checkpoint directory.
    """
    import torch
    from transformers import LlamaForCausalLM

    from evolution._demo import _tokenizer

    tokenizer = _tokenizer()
    seed = splits.seed

    def fmt(rng: random.Random) -> Pair:
        task = TASKS[rng.choice(list(TASKS))]
        return format_example(task, rng.choice(splits.train[task.name]), rng)

    def real(*names: str) -> Callable[[random.Random], Pair]:
        def sample(rng: random.Random) -> Pair:
            task = TASKS[rng.choice(names)]
            return task.example(rng.choice(splits.train[task.name]))

        return sample

    paths = {}
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        base = LlamaForCausalLM(_model_config(s))
        _train(base, tokenizer, fmt, s.pretrain_steps, s.pretrain_lr, s.batch_size, seed * 10 + 1)
        jobs = [("base", None), ("inc", real("inc")), ("upper", real("upper")),
                ("multitask", real("inc", "upper"))]  # fmt: skip
        for k, (name, sample) in enumerate(jobs):
            model = base
            if sample is not None:
                model = LlamaForCausalLM(_model_config(s))
                model.load_state_dict(base.state_dict())
                _train(model, tokenizer, sample, s.finetune_steps, s.finetune_lr, s.batch_size,
                       seed * 10 + 1 + k)  # fmt: skip
            model.save_pretrained(root / name)  # safetensors
            tokenizer.save_pretrained(root / name)
            paths[name] = root / name
    return paths


# ---------------------------------------------------------------------------------- scoring


def _tasks(pairs: dict[str, tuple[Pair, ...]]) -> tuple[Any, ...]:
    from evolution.tasks import ExactMatch

    return tuple(ExactMatch(name, data=pairs[name], max_new_tokens=TASKS[name].length + 1)
                 for name in TASKS)  # fmt: skip


def _score(path: Path, splits: Splits, seed: int, method: str) -> MethodScore:
    """Exact-match accuracy of the checkpoint at ``path`` on the test split, in points."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    scores = {t.domain: round(100 * t.score(model, tokenizer), 2) for t in _tasks(splits.test)}
    return MethodScore(seed=seed, method=method, scores=scores,
                       combined=round(sum(scores.values()) / len(scores), 2))  # fmt: skip


def _baseline_merges(root: Path, ckpt: dict[str, Path]) -> dict[str, Path]:
    """Uniform averaging, plain task arithmetic and TIES of the two specialists, on disk."""
    from evolution._merge import merge
    from evolution._recipe import MergeRecipe, ModelSpec

    base = str(ckpt["base"])
    ones = (ModelSpec(path=str(ckpt["inc"])), ModelSpec(path=str(ckpt["upper"])))
    halves = tuple(ModelSpec(path=m.path, weight=0.5) for m in ones)
    recipes = {
        "uniform-average": MergeRecipe(method="linear", base_model=base, models=halves),
        "task-arithmetic": MergeRecipe(method="task_arithmetic", base_model=base, models=ones),
        "ties": MergeRecipe(method="ties", base_model=base, models=ones),
    }  # fmt: skip
    for name, recipe in recipes.items():
        merge(recipe, root / name, progress=False, overwrite=True)
    return {name: root / name for name in recipes}


def _evolve(root: Path, ckpt: dict[str, Path], splits: Splits, s: DemonstrationSettings,
            client: hive.Client) -> Path:  # fmt: skip
    """Run one CMA-ES round on the validation split; returns the champion's checkpoint dir."""
    from evolution._config import EvolutionConfig
    from evolution._scheduler import EvolutionScheduler

    cfg = EvolutionConfig(
        base_model=str(ckpt["base"]), models=(str(ckpt["inc"]), str(ckpt["upper"])),
        method="task_arithmetic", genes=("weight",), bounds={"weight": (0.0, s.max_weight)},
        layer_groups=s.layer_groups, strategy="cma-es", population=s.population,
        generations=s.generations, tasks=_tasks(splits.val),
        tolerances={name: s.tolerance for name in TASKS}, baseline_repeats=1,
        evaluators=s.evaluators, seed=splits.seed,
    )  # fmt: skip
    name = f"demonstration-s{splits.seed}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"
    sched = EvolutionScheduler.launch(cfg, name, client=client)
    sched.run_round(progress=False)
    return Path(sched.champion().path)


# ---------------------------------------------------------------------------------- entry


def run_demonstration(seeds: Iterable[int] = range(5), root: str | Path | None = None,
                      settings: DemonstrationSettings | None = None,
                      client: hive.Client | None = None, progress: bool = True) -> DemonstrationResult:  # fmt: skip
    """Build, merge, evolve and score everything for each seed (see the module docstring).

    Args:
        seeds: one full run per seed (splits, weights, search).
        root: where checkpoints go (``<root>/seed-<n>/...``); default a new temporary directory.
        settings: sizes and budgets; default :class:`DemonstrationSettings()`.
        client: a hive client; default ``hive.client()``, else ``hive.init(home=<root>/hive-home)``.
        progress: a tqdm bar over seeds.

    Returns:
        The :class:`DemonstrationResult` (``markdown()``, ``to_pandas()``, ``holds()``).

    Raises:
        EvolutionError: the round failed (e.g. every baseline evaluation failed).

    Example:
        >>> r = run_demonstration(seeds=[0])                            # doctest: +SKIP
        >>> r.margins()                                                 # doctest: +SKIP
        {0: 46.5}
    """
    import torch
    from tqdm.auto import tqdm

    s = settings or DemonstrationSettings()
    top = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="hive-demonstration-"))
    if client is None:
        client = hive.client() if hive.is_initialized() else hive.init(home=top / "hive-home")
    threads = torch.get_num_threads()
    torch.set_num_threads(s.torch_threads)
    rows: list[MethodScore] = []
    all_splits, champions = {}, {}
    try:
        for seed in tqdm(list(seeds), desc="demonstration seeds", disable=not progress):
            here = top / f"seed-{seed}"
            splits = make_splits(seed, s.n_val, s.n_test)
            splits.check_disjoint()
            ckpt = build_checkpoints(here, splits, s)
            paths = {"base": ckpt["base"], "inc-specialist": ckpt["inc"],
                     "upper-specialist": ckpt["upper"], **_baseline_merges(here, ckpt),
                     "evolved": _evolve(here, ckpt, splits, s, client),
                     "multitask": ckpt["multitask"]}  # fmt: skip
            rows += [_score(paths[m], splits, seed, m) for m in METHODS]
            all_splits[seed], champions[seed] = splits, str(paths["evolved"])
    finally:
        torch.set_num_threads(threads)
    return DemonstrationResult(tuple(rows), all_splits, champions)
