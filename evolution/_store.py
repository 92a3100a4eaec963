"""The lineage store: one SQLite database per run, ``<home>/evolution/<name>.db`` (WAL).

Everything a run needs to resume lives here, written by the scheduler (one writer) in small
transactions, so a SIGKILL at any point leaves a consistent state:

``meta``        key/value: run id, name, config JSON, created time
``candidates``  one row per evaluated recipe, in ask order (``seq``): genome, parents, recipe,
                status (``pending`` until its result is in, then ``ok``/``failed``/``rejected``),
                scores, combined score, error + traceback, evaluator, attempt, timings, and once
                the strategy was told: ``tell_seq``, the fitness told, the gate verdict
``strategy``    the strategy's ``state_dict()`` after the latest ask or tell (one row)
``champions``   champion history: n, candidate, checkpoint path, sha256, scores, noise, status
                (``pending`` while being written, ``active``, ``retired``, ``rolled_back``)
``rollbacks``   every rollback: from/to champion, reason, verified sha256

An ask is stored with the strategy state it produced in one transaction, and so is a tell
(with the gate verdict and a new champion row), which is what makes resume exact.

Example:
    >>> store = RunStore.open(home / "evolution" / "demo.db")           # doctest: +SKIP
    >>> [c.id for c in store.candidates()]                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["CandidateRecord", "ChampionRecord", "RunStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,
    generation INTEGER, genome TEXT NOT NULL, parents TEXT NOT NULL, recipe TEXT NOT NULL,
    status TEXT NOT NULL, scores TEXT NOT NULL DEFAULT '{}', combined REAL, error TEXT,
    traceback TEXT, task_id TEXT, agent_id TEXT, attempt INTEGER, timings TEXT NOT NULL DEFAULT '{}',
    tell_seq INTEGER, fitness REAL, gate_passed INTEGER, gate_reasons TEXT,
    created REAL NOT NULL, finished REAL);
CREATE TABLE IF NOT EXISTS strategy (id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS champions (
    n INTEGER PRIMARY KEY, candidate_id TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT,
    recipe TEXT NOT NULL, scores TEXT NOT NULL, combined REAL NOT NULL, noise TEXT NOT NULL,
    status TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollbacks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, from_n INTEGER NOT NULL, to_n INTEGER NOT NULL,
    reason TEXT NOT NULL, sha256 TEXT NOT NULL, ts REAL NOT NULL);
"""


class CandidateRecord(BaseModel):
    """One row of ``candidates`` (frozen; what results and tables are built from)."""

    model_config = ConfigDict(frozen=True)

    seq: int  # ask order over the whole run (baseline and recheck rows included)
    id: str  # strategy id ("g1-9"), "baseline-<i>" or "recheck-<k>-<i>"
    kind: str  # "search", "baseline" or "recheck"
    generation: int | None  # strategy generation (None outside the search)
    genome: tuple[float, ...]  # genes (empty for recipes not from the search)
    parents: tuple[str, ...]  # ids bred from (GA); () when sampled
    recipe: dict[str, Any]  # the MergeRecipe as JSON data
    status: str  # "pending", "ok", "failed" or "rejected"
    scores: dict[str, float]  # domain -> score (status "ok")
    combined: float | None  # gate's combined score (status "ok")
    error: str | None  # why it failed / was rejected
    traceback: str | None  # evaluator-side traceback
    task_id: str | None  # hive task of the (last) evaluation
    agent_id: str | None  # evaluator that produced the result
    attempt: int | None  # hive attempt that produced it
    timings: dict[str, Any]  # merge_seconds, task_seconds, load_seconds
    tell_seq: int | None  # order in which the strategy was told (None: not yet)
    fitness: float | None  # fitness told (None: failure)
    gate_passed: bool | None  # regression gate verdict (None: not judged)
    gate_reasons: tuple[str, ...] | None  # why the gate refused it
    created: float  # unix time asked
    finished: float | None  # unix time the result came in


class ChampionRecord(BaseModel):
    """One row of ``champions``."""

    model_config = ConfigDict(frozen=True)

    n: int  # champion number, 0 = the baseline
    candidate_id: str  # the candidate it came from
    path: str  # materialised checkpoint directory
    sha256: str | None  # digest of its weight files (None while being written)
    recipe: dict[str, Any]  # its MergeRecipe as JSON data
    scores: dict[str, float]  # domain -> score when promoted
    combined: float  # combined score when promoted
    noise: dict[str, float]  # domain -> noise std (baseline repeats)
    status: str  # "pending", "active", "retired" or "rolled_back"
    created: float  # unix time


_JSON = {"genome", "parents", "recipe", "scores", "timings", "gate_reasons", "noise"}


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = {k: (json.loads(row[k]) if k in _JSON and row[k] is not None else row[k]) for k in row.keys()}  # noqa: SIM118 (sqlite3.Row)
    if "gate_passed" in out and out["gate_passed"] is not None:
        out["gate_passed"] = bool(out["gate_passed"])
    return out


class RunStore:
    """The SQLite lineage store of one run (see the module docstring). One writer at a time."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0,
                                   check_same_thread=False)  # fmt: skip
        self._db.row_factory = sqlite3.Row
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process kills
            self._db.executescript(_SCHEMA)

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> RunStore:
        """Open (creating unless ``readonly``) the store at ``path``."""
        p = Path(path)
        if not readonly:
            p.parent.mkdir(parents=True, exist_ok=True)
        return cls(p, readonly)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ meta and strategy

    def meta(self) -> dict[str, str]:
        """All meta keys."""
        return {r["key"]: r["value"] for r in self._db.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values: str) -> None:
        """Upsert meta keys."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    def strategy_state(self) -> dict[str, Any] | None:
        """The latest strategy ``state_dict()``, or None before the first ask."""
        row = self._db.execute("SELECT state FROM strategy WHERE id = 1").fetchone()
        return None if row is None else json.loads(row["state"])

    def _put_state(self, db: sqlite3.Connection, state: dict[str, Any] | None) -> None:
        if state is not None:
            db.execute("INSERT OR REPLACE INTO strategy VALUES (1, ?)", (json.dumps(state),))

    # ------------------------------------------------------------------ candidates

    def add_candidate(self, cid: str, kind: str, recipe: dict[str, Any], *, generation: int | None = None,
                      genome: tuple[float, ...] = (), parents: tuple[str, ...] = (),
                      strategy_state: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Record an asked candidate (and the strategy state right after the ask)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO candidates (id, kind, generation, genome, parents, recipe, status, "
                "created) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                (cid, kind, generation, json.dumps(list(genome)), json.dumps(list(parents)),
                 json.dumps(recipe), time.time()),
            )  # fmt: skip
            self._put_state(db, strategy_state)

    def set_task(self, cid: str, task_id: str) -> None:
        """Remember the hive task evaluating ``cid``."""
        with self._tx() as db:
            db.execute("UPDATE candidates SET task_id = ? WHERE id = ?", (task_id, cid))

    def record_result(self, cid: str, status: str, scores: dict[str, float], combined: float | None,
                      error: str | None, traceback: str | None, agent_id: str | None,
                      attempt: int | None, timings: dict[str, Any]) -> None:  # fmt: skip
        """Store an evaluation's outcome (the strategy is told later: ``record_tell``)."""
        with self._tx() as db:
            db.execute(
                "UPDATE candidates SET status = ?, scores = ?, combined = ?, error = ?, "
                "traceback = ?, agent_id = ?, attempt = ?, timings = ?, finished = ? WHERE id = ?",
                (status, json.dumps(scores), combined, error, traceback, agent_id, attempt,
                 json.dumps(timings), time.time(), cid),
            )  # fmt: skip

    def record_tell(self, cid: str, fitness: float | None, gate_passed: bool | None,
                    gate_reasons: tuple[str, ...], strategy_state: dict[str, Any] | None,
                    champion: ChampionRecord | None = None) -> int:  # fmt: skip
        """Record that the strategy was told ``cid`` (+ its new state, + a new champion row).

        Returns:
            The tell sequence number given to ``cid``.
        """
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(tell_seq), -1) + 1 FROM candidates").fetchone()[0]
            db.execute(
                "UPDATE candidates SET tell_seq = ?, fitness = ?, gate_passed = ?, gate_reasons = ? "
                "WHERE id = ?",
                (seq, fitness, None if gate_passed is None else int(gate_passed),
                 json.dumps(list(gate_reasons)), cid),
            )  # fmt: skip
            self._put_state(db, strategy_state)
            if champion is not None:
                self._insert_champion(db, champion)
        return int(seq)

    def candidates(self, kind: str | None = None) -> list[CandidateRecord]:
        """Rows in ask order, optionally of one ``kind``."""
        sql = "SELECT * FROM candidates" + (" WHERE kind = ?" if kind else "") + " ORDER BY seq"
        rows = self._db.execute(sql, (kind,) if kind else ()).fetchall()
        return [CandidateRecord.model_validate(_row(r)) for r in rows]

    def candidate(self, cid: str) -> CandidateRecord | None:
        """One row by id."""
        row = self._db.execute("SELECT * FROM candidates WHERE id = ?", (cid,)).fetchone()
        return None if row is None else CandidateRecord.model_validate(_row(row))

    # ------------------------------------------------------------------ champions

    def _insert_champion(self, db: sqlite3.Connection, c: ChampionRecord) -> None:
        db.execute(
            "INSERT INTO champions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (c.n, c.candidate_id, c.path, c.sha256, json.dumps(c.recipe), json.dumps(c.scores),
             c.combined, json.dumps(c.noise), c.status, c.created),
        )  # fmt: skip

    def add_champion(self, champion: ChampionRecord) -> None:
        """Insert a champion row."""
        with self._tx() as db:
            self._insert_champion(db, champion)

    def champions(self) -> list[ChampionRecord]:
        """Every champion, oldest first."""
        rows = self._db.execute("SELECT * FROM champions ORDER BY n").fetchall()
        return [ChampionRecord.model_validate(_row(r)) for r in rows]

    def activate_champion(self, n: int, sha256: str) -> None:
        """Mark champion ``n`` written (``sha256``) and active; the active one before retires."""
        with self._tx() as db:
            db.execute("UPDATE champions SET status = 'retired' WHERE status = 'active' AND n != ?", (n,))
            db.execute("UPDATE champions SET status = 'active', sha256 = ? WHERE n = ?", (sha256, n))

    def record_rollback(self, from_n: int, to_n: int, reason: str, sha256: str) -> None:
        """Champion ``from_n`` is rolled back, ``to_n`` active again; log it."""
        with self._tx() as db:
            db.execute("UPDATE champions SET status = 'rolled_back' WHERE n = ?", (from_n,))
            db.execute("UPDATE champions SET status = 'active' WHERE n = ?", (to_n,))
            db.execute("INSERT INTO rollbacks (from_n, to_n, reason, sha256, ts) VALUES (?, ?, ?, ?, ?)",
                       (from_n, to_n, reason, sha256, time.time()))  # fmt: skip

    def rollbacks(self) -> list[dict[str, Any]]:
        """Every rollback, oldest first."""
        return [dict(r) for r in self._db.execute("SELECT * FROM rollbacks ORDER BY id")]
