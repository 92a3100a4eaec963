"""The demonstration's two synthetic tasks and their disjoint train / validation / test splits.

Two tasks on three-character operands, told apart by a two-character marker:

=========  =====================  ==========  ===========================================
task       prompt -> answer       operands    mapping
=========  =====================  ==========  ===========================================
``inc``    ``"i:372=" -> "483"``  10^3        every digit + 1 (mod 10)
``upper``  ``"u:abc=" -> "ABC"``  26^3        every letter upper-cased
=========  =====================  ==========  ===========================================

Per task and seed, every operand is drawn at most once: the operands are shuffled with the seed
and cut into a **test** slice, a **validation** slice and the rest, the **train** pool. Training
(base pre-training included) only ever sees train operands, the search only validation ones and
the reported figures only test ones (:meth:`Splits.check_disjoint`).

The base model is pre-trained on the tasks' *format* only (:func:`format_example`): the same
prompts answered with the operand copied or with random characters of the task's output
alphabet. It learns the layout, the answer length and the alphabet, never the mapping: a copied
operand is wrong for every item of both tasks.

Example:
    >>> splits = make_splits(seed=0, n_val=2, n_test=3)
    >>> [len(splits.test[t]) for t in TASKS], splits.check_disjoint()
    ([3, 3], None)
    >>> TASKS["inc"].example("372")
    ('i:372=', '483')
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TASKS", "Splits", "SyntheticTask", "format_example", "make_splits"]

Pair = tuple[str, str]  # (prompt, answer)


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task: a marker, an operand alphabet and a per-character mapping."""

    name: str  # domain name in scores and tables
    marker: str  # prompt prefix that names the task ("i:")
    alphabet: str  # operand characters
    output_alphabet: str  # answer characters (format pre-training samples from it)
    mapping: Callable[[str], str]  # one operand character -> one answer character
    length: int = 3  # operand length

    def example(self, operand: str) -> Pair:
        """``(prompt, answer)`` for one operand."""
        return f"{self.marker}{operand}=", "".join(self.mapping(c) for c in operand)

    def operands(self) -> list[str]:
        """Every operand, in a fixed order."""
        return ["".join(p) for p in itertools.product(self.alphabet, repeat=self.length)]


TASKS: dict[str, SyntheticTask] = {
    "inc": SyntheticTask("inc", "i:", string.digits, string.digits,
                         lambda c: str((int(c) + 1) % 10)),
    "upper": SyntheticTask("upper", "u:", string.ascii_lowercase, string.ascii_uppercase,
                           str.upper),
}  # fmt: skip


def format_example(task: SyntheticTask, operand: str, rng: random.Random) -> Pair:
    """A pre-training pair with the task's prompt but a wrong answer of the right format.

    Half of the time the operand copied, else random characters of the output alphabet.
    """
    prompt, answer = task.example(operand)
    if rng.random() < 0.5:
        return prompt, operand
    return prompt, "".join(rng.choice(task.output_alphabet) for _ in answer)


@dataclass(frozen=True)
class Splits:
    """Per task: train operands (a pool) and validation / test pairs, pairwise disjoint."""

    seed: int  # the seed the operands were shuffled with
    train: dict[str, tuple[str, ...]]  # task -> train operands (training samples from these)
    val: dict[str, tuple[Pair, ...]]  # task -> validation pairs (the search's fitness)
    test: dict[str, tuple[Pair, ...]]  # task -> held-out pairs (the reported figures)

    def check_disjoint(self) -> None:
        """Raise ``AssertionError`` if an operand (or prompt) is in two splits of a task."""
        for name, task in TASKS.items():
            train = {task.example(o)[0] for o in self.train[name]}
            val = {p for p, _ in self.val[name]}
            test = {p for p, _ in self.test[name]}
            assert len(val) == len(self.val[name]) and len(test) == len(self.test[name]), name
            assert not (train & val or train & test or val & test), f"{name}: splits overlap"


def make_splits(seed: int, n_val: int = 50, n_test: int = 100) -> Splits:
    """Shuffle each task's operands with ``seed`` and cut test, validation and train slices.

    Args:
        seed: fixes the shuffle (the same seed gives the same splits).
        n_val: validation pairs per task.
        n_test: held-out test pairs per task.

    Returns:
        The :class:`Splits`; every operand not in test or validation is in train.

    Raises:
        ValueError: ``n_val + n_test`` leaves fewer than half of a task's operands for training.
    """
    rng = random.Random(f"hive-demonstration-{seed}")
    train, val, test = {}, {}, {}
    for name, task in TASKS.items():
        ops = task.operands()
        if 2 * (n_val + n_test) > len(ops):
            raise ValueError(f"n_val + n_test = {n_val + n_test} leaves too few of the {len(ops)} "
                             f"{name!r} operands to train on; lower n_val or n_test")  # fmt: skip
        rng.shuffle(ops)
        test[name] = tuple(task.example(o) for o in ops[:n_test])
        val[name] = tuple(task.example(o) for o in ops[n_test : n_test + n_val])
        train[name] = tuple(ops[n_test + n_val :])
    return Splits(seed, train, val, test)
