"""EvolutionScheduler end to end on a local Ray: lineage, gate, rollback, faults, resume.

One hive (home, Coordinator, two Evaluator agents) serves the whole module: spawning
evaluators costs seconds on the 2-core machines, and runs are isolated by name anyway.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hive
from evolution import UnknownNameError
from evolution._checksum import sha256_dir
from evolution._config import EvolutionConfig
from evolution._exceptions import RollbackError, RunConfigError, RunNotFoundError
from evolution._gate import RegressionGate
from evolution._scheduler import EvolutionScheduler, store_path
from evolution._store import CandidateRecord
from evolution.tasks import CallableTask, Perplexity
from tests.evolution.helpers import TinySet
from tests.factories import REPO_ROOT, ensure_local_ray, wait_until

WIKI = Perplexity("wiki", ["Hello world, this is a text.", "The quick brown fox jumps."])


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hive.Client]:
    ensure_local_ray()
    c = hive.init(home=tmp_path_factory.mktemp("hive-home"))
    yield c
    hive.shutdown(stop_cluster=True)


def _cfg(tiny: TinySet, **kw: Any) -> EvolutionConfig:
    base: dict[str, Any] = {
        "base_model": str(tiny.base), "models": [str(p) for p in tiny.models[:2]],
        "method": "task_arithmetic", "strategy": "ga", "population": 4, "generations": 3,
        "tasks": [WIKI], "tolerances": {"wiki": 0.02}, "baseline_repeats": 2, "evaluators": 2,
        "seed": 3,
    }  # fmt: skip
    base.update(kw)
    return EvolutionConfig(**base)


def _search(sched: EvolutionScheduler) -> list[CandidateRecord]:
    return list(sched.result().search)


# ------------------------------------------------------------------ a round


@pytest.fixture(scope="module")
def round_run(client: hive.Client, llamas: TinySet) -> tuple[EvolutionScheduler, Any]:
    """The module's shared run "round" (GA, seed 3), run once: the tests below read it, and the
    rollback test changes its champions, in file order; each one also runs on its own."""
    sched = EvolutionScheduler.launch(_cfg(llamas), "round", client=client)
    return sched, sched.run_round(progress=False)


def test_round_persists_lineage_champions_and_events(
    client: hive.Client, llamas: TinySet, round_run: tuple[EvolutionScheduler, Any]
) -> None:
    sched, result = round_run
    rows = result.search
    assert len(rows) == 4 + 3 + 3  # GA: a population, then 3 children per generation (elitism 1)
    assert all(r.status == "ok" and r.tell_seq is not None for r in rows)
    assert [r.tell_seq for r in rows] == sorted(r.tell_seq for r in rows)  # told in ask order
    assert result.lineage and all(p in {r.id for r in rows} for p, _ in result.lineage)
    df = result.to_pandas()
    assert {"id", "status", "combined", "score.wiki", "gene.all.m0.weight"} <= set(df.columns)
    assert len(df) == len(rows) + 2  # + two baseline repeats
    # the store on disk holds it all, readable by any process
    db = sqlite3.connect(store_path(Path(client.config.home), "round"))
    assert db.execute("SELECT COUNT(*) FROM candidates WHERE kind='search'").fetchone()[0] == 10
    # champion 0 is the baseline; its checkpoint matches the recorded sha256
    champ = sched.champion()
    assert champ.path.startswith(str(Path(client.config.home) / "evolution" / "round" / "champions"))
    assert sha256_dir(champ.path) == champ.sha256
    assert (Path(champ.path) / "merge_recipe.yaml").is_file()
    assert result.best_recipe is not None and result.best_recipe.to_dict() == champ.recipe
    topics = [e.topic for e in client.events(types="ext.event") if e.data.get("run") == "round"]
    assert topics.count("evolution.candidate_evaluated") == 12
    assert topics.count("evolution.champion_promoted") == len(result.champions)
    assert topics[-1] == "evolution.round_finished"
    # the same name with the same config attaches; another config is refused
    assert EvolutionScheduler.launch(_cfg(llamas), "round", client=client).run_id == sched.run_id
    with pytest.raises(RunConfigError, match="already exists"):
        EvolutionScheduler.launch(_cfg(llamas, seed=4), "round", client=client)
    with pytest.raises(RunNotFoundError, match="known runs: round"):
        EvolutionScheduler.attach("nope", client=client)


def test_gate_decisions_follow_the_rule(
    client: hive.Client, llamas: TinySet, round_run: Any
) -> None:
    """Replay the stored tells through the gate: every verdict matches, both kinds occur."""
    sched = EvolutionScheduler.attach("round", client=client)
    result = sched.result()
    base = result.champions[0]
    gate = RegressionGate(tolerances={"wiki": 0.02})
    champion = base.combined
    verdicts = []
    for row in sorted(result.search, key=lambda r: r.tell_seq or 0):
        decision = gate.check(row.scores, base.scores, base.noise, champion)
        assert row.gate_passed == decision.passed, row.id
        if decision.passed:
            champion = decision.combined
        verdicts.append((decision.passed, bool(decision.shortfall)))
    assert (True, False) in verdicts, "no candidate was promoted"
    assert (False, True) in verdicts, "no candidate regressed beyond tolerance"
    promoted = [c.candidate_id for c in result.champions[1:]]
    assert promoted == [r.id for r in sorted(result.search, key=lambda r: r.tell_seq or 0) if r.gate_passed]


# ------------------------------------------------------------------ rollback


def _distance_to(path: str, model: Any, tokenizer: Any) -> float:
    """Minus the L2 distance of the model's weights to the checkpoint at ``path``."""
    from safetensors.torch import load_file

    ref = load_file(str(Path(path) / "model.safetensors"))
    live = model.state_dict()
    return -sum(float((live[k].float() - v.float()).norm()) for k, v in ref.items())


def test_recheck_rolls_back_to_the_previous_champion(
    client: hive.Client, llamas: TinySet, round_run: Any
) -> None:
    sched = EvolutionScheduler.attach("round", client=client)
    with pytest.raises(RollbackError, match="no earlier good champion"):
        EvolutionScheduler.launch(_cfg(llamas, generations=1, population=2, strategy="random"),
                                  "lonely", client=client).rollback()  # fmt: skip
    champs = sched.result().champions
    assert len(champs) >= 2
    active, previous = champs[-1], champs[-2]
    # a new domain that prefers the previous champion: closeness to its weights
    from functools import partial

    near_previous = CallableTask("near_previous", partial(_distance_to, previous.path))
    report = sched.recheck([WIKI, near_previous])
    assert report.previous == previous.n and not report.passed and report.rolled_back
    assert any(r.startswith("near_previous") for r in report.reasons)
    restored = sched.champion()
    assert restored.n == previous.n and sha256_dir(restored.path) == restored.sha256
    assert [c.status for c in sched.result().champions][active.n] == "rolled_back"
    events = [e for e in client.events(types="rollback.executed") if "round" in e.target]
    assert events and events[-1].restored == previous.path and "near_previous" in events[-1].reason
    assert sched.store.rollbacks()[-1]["to_n"] == previous.n
    # a damaged checkpoint is re-merged from its recipe and verified before it is restored
    older = sched.champions.previous_good(restored)
    assert older is not None  # seed 3 promotes at least twice: baseline, c1, c2
    (Path(older.path) / "model.safetensors").write_bytes(b"garbage")
    assert sched.rollback("manual").n == older.n
    assert sha256_dir(older.path) == older.sha256


# ------------------------------------------------------------------ faults


def _slow(model: Any, tokenizer: Any) -> float:
    time.sleep(0.4)
    return 0.0


def test_evaluator_killed_mid_evaluation_is_retried(client: hive.Client, llamas: TinySet) -> None:
    cfg = _cfg(llamas, strategy="random", population=4, generations=2, baseline_repeats=1,
               tasks=[WIKI, CallableTask("slow", _slow)])  # fmt: skip
    sched = EvolutionScheduler.launch(cfg, "kill", client=client)
    sched.ensure_evaluators()
    box: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: box.update(result=sched.run_round(progress=False)))
    runner.start()

    def busy_evaluator() -> dict[str, Any] | None:
        started = [c for c in sched.store.candidates("search") if c.task_id]
        return next((a for a in client.agents() if a["kind"] == "evaluator"
                     and a["outstanding"] and a.get("pid")), None) if started else None  # fmt: skip

    victim = wait_until(busy_evaluator, 60, message="an evaluator busy with a search candidate")
    os.kill(victim["pid"], signal.SIGKILL)
    runner.join(120)
    assert not runner.is_alive()
    rows = box["result"].search
    assert len(rows) == 8 and all(r.status == "ok" for r in rows)
    assert max(r.attempt or 1 for r in box["result"].candidates) >= 2  # one ran again elsewhere


_CALLS = {"n": 0}


def _every_third_raises(model: Any, tokenizer: Any) -> float:
    _CALLS["n"] += 1  # per evaluator process
    if _CALLS["n"] % 3 == 0:
        raise ValueError(f"fitness callable failed on call {_CALLS['n']}")
    return 1.0


def test_raising_fitness_fails_only_that_candidate(client: hive.Client, llamas: TinySet) -> None:
    cfg = _cfg(llamas, strategy="random", population=4, generations=2, baseline_repeats=1,
               tasks=[WIKI, CallableTask("flaky", _every_third_raises)])  # fmt: skip
    result = EvolutionScheduler.launch(cfg, "flaky", client=client).run_round(progress=False)
    rows = result.search
    failed = [r for r in rows if r.status == "failed"]
    assert len(rows) == 8 and failed and len(failed) < len(rows)
    assert all("fitness callable failed" in (r.error or "") for r in failed)
    assert all("_every_third_raises" in (r.traceback or "") for r in failed)
    assert all(r.tell_seq is not None and r.fitness is None for r in failed)


def test_nan_merge_rejects_the_candidate(client: hive.Client, llamas: TinySet) -> None:
    good = _cfg(llamas).layout().to_recipe([0.5, 0.5])
    cfg = _cfg(llamas, strategy="random", population=3, generations=1, baseline_repeats=1,
               dtype="float16", bounds={"weight": (1e7, 1e8)}, baseline=good)  # fmt: skip
    result = EvolutionScheduler.launch(cfg, "nan", client=client).run_round(progress=False)
    assert [r.status for r in result.search] == ["rejected"] * 3
    assert all("NaN/inf" in (r.error or "") for r in result.search)
    assert result.champion is not None and result.champion.n == 0  # the baseline stays


def test_unknown_names_are_listed(llamas: TinySet) -> None:
    with pytest.raises(UnknownNameError, match="cma-es, ga, random"):
        _cfg(llamas, strategy="annealing")
    with pytest.raises(UnknownNameError, match="known methods"):
        _cfg(llamas, method="average")
    with pytest.raises(UnknownNameError, match="known tasks"):
        _cfg(llamas, tasks=[{"task": "rouge", "domain": "x"}])


# ------------------------------------------------------------------ resume after SIGKILL


def _lineage(sched: EvolutionScheduler) -> list[tuple[Any, ...]]:
    return [(r.id, r.genome, r.parents, r.status, r.scores, r.tell_seq, r.fitness, r.gate_passed)
            for r in sched.result().search]  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_lineage(client: hive.Client, llamas: TinySet,
                                                     tmp_path: Path) -> None:  # fmt: skip
    cfg = _cfg(llamas, strategy_settings={"steady_state": True}, generations=3,
               tasks=[WIKI, CallableTask("slow", _slow)], baseline_repeats=1)  # fmt: skip
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    address = ray_address()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.evolution._resume_driver", address,
         str(client.config.home), str(tmp_path / "cfg.json"), "killed"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    db = store_path(Path(client.config.home), "killed")

    def evaluated() -> int:
        if proc.poll() is not None:
            raise AssertionError(f"driver exited early:\n{proc.stdout.read().decode()[-3000:]}")  # type: ignore[union-attr]
        if not db.exists():
            return 0
        with sqlite3.connect(db) as con:
            sql = "SELECT COUNT(*) FROM candidates WHERE kind='search' AND status != 'pending'"
            return int(con.execute(sql).fetchone()[0])

    wait_until(lambda: evaluated() >= 5, 120, message="5 evaluations by the driver")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed = EvolutionScheduler.attach("killed", client=client)
    before = killed.store.candidates("search")
    assert 5 <= sum(r.status != "pending" for r in before) < 12  # really cut mid-round
    killed.resume(progress=False)
    fresh = EvolutionScheduler.launch(cfg, "uninterrupted", client=client)
    fresh.run_round(progress=False)
    assert len(_lineage(fresh)) == 12
    assert _lineage(killed) == _lineage(fresh)
    assert [c.candidate_id for c in killed.result().champions] == [
        c.candidate_id for c in fresh.result().champions
    ]


def ray_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def test_status_cli_and_plot_read_the_store(client: hive.Client, round_run: Any) -> None:
    from typer.testing import CliRunner

    from evolution._cli import app

    home = str(client.config.home)
    out = CliRunner().invoke(app, ["status", "round", "--home", home])
    assert out.exit_code == 0, out.output
    assert "ga" in out.output and "ok=10" in out.output and "sha256 " in out.output
    missing = CliRunner().invoke(app, ["status", "nope", "--home", home])
    assert missing.exit_code == 1 and "no evolution run 'nope'" in missing.output
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    ax = EvolutionScheduler.attach("round", client=client).result().plot()
    assert ax.get_ylabel().startswith("combined score") and ax.collections


def test_generation_bars_open_one_bar_per_generation_told_and_no_empty_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from evolution._scheduler_round import _GenerationBars

    bars = _GenerationBars(True, 2)
    for generation, now in [(0, 0), (0, 1), (1, 1), (1, 2)]:  # two generations of two, told
        bars.told(generation, now)
    bars.close()
    err = capsys.readouterr().err
    assert "generation 0" in err and "generation 1" in err
    assert "generation 2" not in err  # the round ended on a boundary: no bar for generation 2
    assert "2/2" in err
