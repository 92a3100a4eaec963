"""The durable, append-only EventLog: one SQLite database in WAL mode.

Durability guarantees:

- ``append``/``append_many`` return only after the transaction holding the event(s) has
  committed. With ``durability="normal"`` (``synchronous=NORMAL``) a committed event survives
  SIGKILL of the writing process (the WAL is in the OS page cache) but may be lost on power
  loss or an OS crash; ``durability="full"`` (``synchronous=FULL``) fsyncs the WAL on every
  commit, so it survives those too, at the cost of one fsync per transaction.
- ``append_many`` is one transaction (group commit): all of the batch is stored, or none.
- Sequence numbers (``seq``) are assigned in commit order, start at 1 and never repeat.
- Nothing is silently lost or overwritten: a file that is not a SQLite database, fails
  ``PRAGMA quick_check`` when opened for writing, fails ``check()`` (``integrity_check``) or
  has a damaged page that a read touches raises ``EventLogCorruptError`` and is left
  untouched; a row that does not decode raises ``EventDecodeError`` rather than being
  skipped; a write lock held by another process past ``busy_timeout_s`` raises
  ``EventLogLockedError``.

Several processes may open the same file: one writes at a time, readers never block (WAL).
One ``EventLog`` may be shared between threads (one connection behind a lock).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from hive._events import EVENT_TYPES, _EventBase, decode_event
from hive._exceptions import ConfigError, EventLogCorruptError, EventLogError, EventLogLockedError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["EventLog"]

SCHEMA_VERSION = 1  # bump, with a migration, when the tables change
_SCHEMA = [
    ("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,"
     " type TEXT NOT NULL, version INTEGER NOT NULL, agent_id TEXT, task_id TEXT,"
     " body TEXT NOT NULL)"),
    *(f"CREATE INDEX IF NOT EXISTS events_{c} ON events({c})"
      for c in ("type", "agent_id", "task_id", "ts")),
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}')",
]
_INSERT = "INSERT INTO events (ts, type, version, agent_id, task_id, body) VALUES (?,?,?,?,?,?)"
_BUSY, _LOCKED, _CORRUPT, _NOTADB = 5, 6, 11, 26  # SQLite primary result codes
_RESTORE = ("hive never overwrites it: move the file (and its -wal/-shm files) aside and "
            "restore a backup, or point HIVE_HOME at a fresh home")
Types: TypeAlias = "Iterable[str] | str | None"  # one event type name or several
E = TypeVar("E", bound=_EventBase)


class EventLog:
    """Append-only store of hive events in one SQLite file.

    Args:
        path: the database file (``HiveConfig.events_path``); its parent is created.
        durability: ``"normal"`` (survives SIGKILL) or ``"full"`` (also survives power loss).
        busy_timeout_s: how long to wait for another process's write lock.
        readonly: open an existing log for reading only; nothing is created.

    Raises:
        ConfigError: ``durability`` is not ``"normal"`` or ``"full"``.
        EventLogCorruptError: the file is not a SQLite database or is damaged.
        EventLogError: readonly and the file is missing; a foreign database; a newer schema.

    Example:
        >>> from hive._events import AgentReady
        >>> with EventLog("/tmp/hive-doc/events.db") as log:
        ...     log.append(AgentReady(agent_id="a1")).seq >= 1
        True
    """

    def __init__(self, path: str | os.PathLike[str], *, durability: str = "normal",
                 busy_timeout_s: float = 5.0, readonly: bool = False) -> None:
        if durability not in ("normal", "full"):
            raise ConfigError(f"durability must be 'normal' or 'full', got {durability!r}",
                              setting="durability")
        self._path = Path(os.fspath(path)).expanduser().absolute()
        self._busy_timeout_s = busy_timeout_s
        self._readonly = readonly
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if readonly and not self._path.is_file():
            raise EventLogError(f"no event log at {self._path}: run `hive up` or hive.init() "
                                "first, or point HIVE_HOME at the right hive home",
                                path=str(self._path))
        if not readonly:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise EventLogError(f"cannot create {self._path.parent}: {exc}; set HIVE_HOME "
                                    "to a writable directory", path=str(self._path)) from exc
        with self._mapped("open"):
            conn = sqlite3.connect(self._path.as_uri() + "?mode=ro" if readonly else self._path,
                                   uri=readonly, timeout=busy_timeout_s,
                                   check_same_thread=False, isolation_level=None)
            try:
                self._open(conn, durability)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def _open(self, conn: sqlite3.Connection, durability: str) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        # Only reads until the file is known good: a damaged one is left exactly as it was.
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if (tables or self._readonly) and not {"events", "meta"} <= tables:
            raise EventLogError(f"{self._path} is not a hive event log (tables: {sorted(tables)})"
                                "; point HIVE_HOME at a hive home or move the file aside",
                                path=str(self._path))
        if tables:
            if not self._readonly:  # O(file size): once per writer; readers stay cheap to open
                self._integrity(conn, "quick_check")
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if int(row[0] if row else 0) > SCHEMA_VERSION:
                raise EventLogError(f"event log {self._path} has schema_version {row[0]}, this "
                                    f"hive reads up to {SCHEMA_VERSION}; upgrade hive to open it",
                                    path=str(self._path))
        if self._readonly:
            return
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {durability.upper()}")
        if not tables:
            with self._transaction(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # ---- plumbing ------------------------------------------------------------------------

    def _translate(self, exc: sqlite3.Error, action: str) -> EventLogError:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # Python >= 3.11
        text, path = str(exc).lower(), str(self._path)
        if code in (_BUSY, _LOCKED) or "locked" in text or "busy" in text:
            return EventLogLockedError(
                f"event log {path} stayed locked by another process for longer than "
                f"busy_timeout_s={self._busy_timeout_s}s during {action} ({exc}); stop the other "
                "writer (e.g. `hive down`) or raise busy_timeout_s",
                path=path, busy_timeout_s=self._busy_timeout_s)
        if code in (_CORRUPT, _NOTADB) or "malformed" in text or "not a database" in text:
            return EventLogCorruptError(
                f"event log {path} is not a SQLite database or is damaged ({exc}). {_RESTORE}",
                path=path)
        return EventLogError(f"event log {path}: {action} failed: {exc}", path=path)

    @contextmanager
    def _mapped(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise self._translate(exc, action) from exc

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now, waiting up to busy_timeout
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    def _integrity(self, conn: sqlite3.Connection, pragma: str) -> None:
        problems = [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}")]
        if problems != ["ok"]:
            raise EventLogCorruptError(f"event log {self._path} failed its integrity check "
                                       f"({'; '.join(problems[:5])}). {_RESTORE}",
                                       path=str(self._path))

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise EventLogError(f"event log {self._path} is closed", path=str(self._path))
        return self._conn

    def _rows(self, sql: str, params: Sequence[Any], action: str) -> list[Any]:
        with self._lock, self._mapped(action):
            return self._connection().execute(sql, params).fetchall()

    def _select(self, types: Types, where: dict[str, Any], *, order: str = "ASC",
                limit: int | None = None, action: str = "query", what: str = "seq, body") -> Any:
        """Rows (decoded events when ``what`` is ``seq, body``) matching ``types`` and ``where``
        (``{"column op ?": value}``; None values are left out)."""
        clauses = [c for c, v in where.items() if v is not None]
        params = [v for v in where.values() if v is not None]
        if types is not None:
            names = [types] if isinstance(types, str) else list(types)
            clauses.append(f"type IN ({','.join('?' * len(names))})" if names else "0")
            params += names
        sql = f"SELECT {what} FROM events" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        if what != "seq, body":
            return self._rows(sql, params, action)
        sql += f" ORDER BY seq {order}" + ("" if limit is None else f" LIMIT {int(limit)}")
        return [decode_event(body, seq) for seq, body in self._rows(sql, params, action)]

    # ---- writing -------------------------------------------------------------------------

    def append(self, event: E) -> E:
        """Append one event in its own transaction.

        Args:
            event: a hive event (its ``seq`` is ignored).

        Returns:
            A copy of ``event`` with ``seq`` set; it is committed when this returns.

        Raises:
            EventLogLockedError: another process held the write lock past ``busy_timeout_s``.
            EventLogError: readonly or closed log, an unregistered event class, a SQLite failure.

        Example:
            >>> log.append(AgentReady(agent_id="a1")).seq  # doctest: +SKIP
            1
        """
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[E]) -> list[E]:
        """Append a batch in ONE transaction (group commit): all of it is stored, or none.

        Args:
            events: hive events (their ``seq`` is ignored), stored in this order.

        Returns:
            Copies of the events with consecutive ``seq`` set; committed when this returns.

        Raises:
            EventLogLockedError: another process held the write lock past ``busy_timeout_s``.
            EventLogError: readonly or closed log, an unregistered event class, a SQLite failure.

        Example:
            >>> [e.seq for e in log.append_many([AgentReady(), AgentSuspended()])]  # doctest: +SKIP
            [2, 3]
        """
        if self._readonly:
            raise EventLogError(f"event log {self._path} was opened readonly; open it without "
                                "readonly=True to append", path=str(self._path))
        rows = []
        for ev in events:
            if not isinstance(ev, _EventBase) or EVENT_TYPES.get(ev.type) is not type(ev):
                raise EventLogError(f"cannot append {type(ev).__name__}: not a registered hive "
                                    f"event type (known: {sorted(EVENT_TYPES)})",
                                    path=str(self._path))
            rows.append((ev.ts, ev.type, ev.version, ev.agent_id, ev.task_id,
                         ev.model_dump_json(exclude={"seq"})))
        if not rows:
            return []
        with self._lock, self._mapped("append"):
            conn = self._connection()
            with self._transaction(conn):
                seqs = [conn.execute(_INSERT, row).lastrowid for row in rows]
        return [ev.model_copy(update={"seq": seq}) for ev, seq in zip(events, seqs)]

    # ---- reading -------------------------------------------------------------------------

    def query(self, *, types: Types = None, agent_id: str | None = None,
              task_id: str | None = None, since: float | None = None, until: float | None = None,
              after_seq: int | None = None, limit: int | None = None,
              descending: bool = False) -> list[_EventBase]:
        """Events matching every given filter, ordered by seq.

        Args:
            types: one event type name (``"task.submitted"``) or several.
            agent_id: only this agent's events.  task_id: only this task's events.
            since: only events with ``ts >= since``.  until: only events with ``ts < until``.
            after_seq: only events with ``seq > after_seq``.
            limit: at most this many events.  descending: newest first.

        Returns:
            The decoded events.

        Raises:
            EventDecodeError: a matching row has an unknown type or a newer version.
            EventLogError: closed log or a SQLite failure (Corrupt/Locked subclasses).

        Example:
            >>> log.query(types="agent.ready", agent_id="a1", limit=10)  # doctest: +SKIP
            [AgentReady(type='agent.ready', ..., seq=1, agent_id='a1', ...)]
        """
        where = {"agent_id = ?": agent_id, "task_id = ?": task_id, "ts >= ?": since,
                 "ts < ?": until, "seq > ?": after_seq}
        return list(self._select(types, where, order="DESC" if descending else "ASC",
                                 limit=limit))

    def iter_events(self, after_seq: int = 0, batch: int = 5000) -> Iterator[_EventBase]:
        """Stream the whole log in seq order without loading it all.

        Args:
            after_seq: start after this seq (0: from the first event).
            batch: rows read per round trip.

        Returns:
            An iterator of decoded events (appends made meanwhile are included).

        Raises:
            EventDecodeError: a row has an unknown type or a newer version.
            EventLogError: closed log or a SQLite failure.

        Example:
            >>> sum(1 for _ in log.iter_events())  # doctest: +SKIP
            3
        """
        while True:
            events = self._select(None, {"seq > ?": after_seq}, limit=batch, action="iter_events")
            yield from events
            if len(events) < batch:
                return
            after_seq = events[-1].seq or after_seq

    def last_seq(self) -> int:
        """The highest seq in the log, 0 when it is empty.

        Raises:
            EventLogError: closed log or a SQLite failure.

        Example:
            >>> log.last_seq()  # doctest: +SKIP
            3
        """
        return int(self._rows("SELECT MAX(seq) FROM events", (), "last_seq")[0][0] or 0)

    def count(self, types: Types = None) -> int:
        """How many events the log holds.

        Args:
            types: count only these event type names (one or several); None counts all.

        Returns:
            The number of events.

        Raises:
            EventLogError: closed log or a SQLite failure.

        Example:
            >>> log.count("task.submitted")  # doctest: +SKIP
            2
        """
        return int(self._select(types, {}, action="count", what="COUNT(*)")[0][0])

    def follow(self, *, after_seq: int | None = None, types: Types = None, poll_s: float = 0.2,
               stop: threading.Event | None = None,
               timeout_s: float | None = None) -> Iterator[_EventBase]:
        """Tail the log: the events after ``after_seq``, then new ones as they commit.

        Appends from other threads and processes show up within about ``poll_s``.

        Args:
            after_seq: start after this seq; None starts at the end as of this call.
            types: only these event type names.
            poll_s: how often to look for new events once caught up.
            stop: the iteration ends once this is set.
            timeout_s: the iteration ends after this many seconds.

        Returns:
            An iterator of decoded events in seq order.

        Raises:
            EventDecodeError: a row has an unknown type or a newer version.
            EventLogError: the log was closed, or a SQLite failure.

        Example:
            >>> for ev in log.follow(after_seq=0, timeout_s=1.0):  # doctest: +SKIP
            ...     print(ev.seq, ev.type)
        """
        start = self.last_seq() if after_seq is None else after_seq  # now, not at first next()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return self._follow(start, types, poll_s, stop or threading.Event(), deadline)

    def _follow(self, cursor: int, types: Types, poll_s: float, stop: threading.Event,
                deadline: float | None) -> Iterator[_EventBase]:
        names = types if types is None or isinstance(types, str) else list(types)  # reusable
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            events = self._select(names, {"seq > ?": cursor}, limit=1000, action="follow")
            for ev in events:
                yield ev
                cursor = ev.seq or cursor
                if stop.is_set():
                    return
            if not events:
                left = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
                stop.wait(max(left, 0.0))

    # ---- maintenance ---------------------------------------------------------------------

    def check(self) -> None:
        """Run SQLite's full ``PRAGMA integrity_check``.

        Raises:
            EventLogCorruptError: the database is damaged (the message lists the problems).

        Example:
            >>> log.check()  # doctest: +SKIP
        """
        with self._lock, self._mapped("check"):
            self._integrity(self._connection(), "integrity_check")

    def close(self) -> None:
        """Close the database; later calls raise ``EventLogError``. Closing twice is fine."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
