"""The honest demonstration: its data splits (fast) and the claim itself (slow, ~6 min on 2 CPUs).

The slow test runs ``evolution.run_demonstration`` over five seeds exactly as
``examples/merge_demonstration.py`` does and checks the issue's claim: the evolved merge beats
both specialists on the combined held-out score by >= 5 points in >= 4 of 5 seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import hive
from evolution import DemonstrationResult, DemonstrationSettings, run_demonstration
from evolution._demo import _tokenizer
from evolution._demonstration import METHODS, PARENTS, MethodScore, _batch
from evolution._demonstration_data import TASKS, Splits, format_example, make_splits
from tests.factories import ensure_local_ray

# ------------------------------------------------------------------ data (fast)


def test_tasks_map_every_character() -> None:
    assert TASKS["inc"].example("390") == ("i:390=", "401")
    assert TASKS["upper"].example("qaz") == ("u:qaz=", "QAZ")
    assert len(TASKS["inc"].operands()) == 1000 and len(TASKS["upper"].operands()) == 26**3


def test_splits_are_disjoint_complete_and_seeded() -> None:
    a, b, other = make_splits(0, 50, 100), make_splits(0, 50, 100), make_splits(1, 50, 100)
    a.check_disjoint()
    assert a == b and a.test != other.test
    for name, task in TASKS.items():
        assert (len(a.val[name]), len(a.test[name])) == (50, 100)
        seen = [p[len(task.marker) : -1] for p, _ in a.test[name] + a.val[name]]
        assert sorted(seen + list(a.train[name])) == sorted(task.operands())  # a partition
        assert all(task.example(p[len(task.marker) : -1]) == (p, ans) for p, ans in a.val[name])


def test_check_disjoint_catches_a_leak() -> None:
    s = make_splits(3, 5, 5)
    leaked_op = s.test["inc"][0][0][2:-1]
    leaky = Splits(s.seed, {**s.train, "inc": s.train["inc"] + (leaked_op,)}, s.val, s.test)
    with pytest.raises(AssertionError, match="overlap"):
        leaky.check_disjoint()
    with pytest.raises(ValueError, match="n_val or n_test"):
        make_splits(0, 300, 300)


def test_format_pretraining_never_teaches_the_mapping() -> None:
    import random

    rng = random.Random(0)
    for task in TASKS.values():
        for op in task.operands()[:200]:
            prompt, answer = format_example(task, op, rng)
            assert prompt == task.example(op)[0] and len(answer) == len(op)
            assert set(answer) <= set(task.output_alphabet) | set(task.alphabet)
            if answer == op:  # the copied half: wrong for every item of both tasks
                assert answer != task.example(op)[1]


def test_loss_is_on_the_answer_only() -> None:
    tok = _tokenizer()
    ids, mask, labels = _batch(tok, [("i:12=", "23"), ("u:abc=", "ABC")])
    assert ids.shape == labels.shape == mask.shape == (2, 10)
    assert (
        tok.decode(labels[0][labels[0] >= 0]) == "23\n"
        and tok.decode(labels[1][labels[1] >= 0]) == "ABC\n"
    )
    assert mask[0].tolist() == [1] * 8 + [0] * 2 and (labels[0, 8:] == -100).all()


def test_result_margins_and_claim() -> None:
    def rows(seed: int, evolved: float) -> list[MethodScore]:
        combined = {m: 50.0 for m in METHODS} | {"evolved": evolved}
        return [MethodScore(seed=seed, method=m, scores={"inc": c, "upper": c}, combined=c)
                for m, c in combined.items()]  # fmt: skip

    splits = {s: make_splits(s, 2, 2) for s in range(5)}
    result = DemonstrationResult(
        tuple(r for s, e in enumerate([60, 55, 54.9, 70, 80]) for r in rows(s, e)), splits
    )
    assert result.margins() == {0: 10.0, 1: 5.0, 2: pytest.approx(4.9), 3: 20.0, 4: 30.0}
    assert result.holds() and not result.holds(min_seeds=5) and not result.holds(min_margin=10.5)
    assert "| evolved - best specialist | +10.0 | +5.0 | +4.9 |" in result.markdown()


# ------------------------------------------------------------------ the claim (slow)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hive.Client]:
    ensure_local_ray()
    c = hive.init(home=tmp_path_factory.mktemp("hive-home"))
    yield c
    hive.shutdown(stop_cluster=True)


@pytest.mark.slow
def test_evolved_merge_beats_both_specialists(client: hive.Client, tmp_path: Path) -> None:
    settings = DemonstrationSettings()
    result = run_demonstration(seeds=range(5), root=tmp_path, settings=settings, client=client,
                               progress=False)  # fmt: skip
    table = "\n" + result.markdown()
    print(table)  # shown with -s / -rP: the figures of this run
    margins = result.margins()
    assert sum(m >= 5.0 for m in margins.values()) >= 4, f"margins {margins}{table}"
    assert result.holds(min_margin=5.0, min_seeds=4)
    for seed, splits in result.splits.items():
        # the figures are on held-out data: disjoint from validation (search) and train pools
        splits.check_disjoint()
        assert splits == make_splits(seed, settings.n_val, settings.n_test)
        for name, task in TASKS.items():
            test_ops = {p[len(task.marker) : -1] for p, _ in splits.test[name]}
            val_ops = {p[len(task.marker) : -1] for p, _ in splits.val[name]}
            assert len(test_ops) == settings.n_test and not test_ops & val_ops
            assert not test_ops & set(splits.train[name])
        parents = [result.score(seed, p) for p in PARENTS]
        # each specialist is good at its own task and weak at the other one
        assert parents[0].scores["inc"] >= 90 and parents[0].scores["upper"] <= 20, table
        assert parents[1].scores["upper"] >= 90 and parents[1].scores["inc"] <= 20, table
        assert result.score(seed, "multitask").combined >= max(p.combined for p in parents), table
        assert Path(result.champions[seed], "model.safetensors").exists()
