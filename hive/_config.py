"""In-process settings of the hive runtime and where its state lives on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hive._exceptions import ConfigError

__all__ = ["HiveConfig", "resolve_home"]

NAMESPACE = "hive"  # Ray namespace every hive actor lives in
COORDINATOR_NAME = "hive-coordinator"  # name of the Coordinator's Ray actor


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The hive home: ``home`` if given, else ``$HIVE_HOME``, else ``./.hive``.

    Args:
        home: an explicit directory, or None.

    Returns:
        The absolute path (created if missing).

    Raises:
        ConfigError: the path exists and is not a directory, or cannot be created.

    Example:
        >>> resolve_home("/tmp/hive-doc").name
        'hive-doc'
    """
    raw = home if home is not None else os.environ.get("HIVE_HOME") or ".hive"
    path = Path(raw).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"hive home {path} exists and is not a directory; pass another home= or set HIVE_HOME", path=str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create hive home {path}: {exc}; pass home= or set HIVE_HOME to a writable directory", path=str(path)) from exc
    return path


@dataclass(frozen=True)
class HiveConfig:
    """Settings of one hive runtime (Coordinator + EventLog). Defaults suit a laptop."""

    home: Path = field(default_factory=lambda: resolve_home(None))  # state directory (events.db, checkpoints)
    max_queue: int = 10_000  # bounded task queue; submit raises QueueFullError past it
    max_attempts: int = 3  # default attempts per task before it is dead-lettered
    heartbeat_interval_s: float = 1.0  # how often each agent reports in
    heartbeat_timeout_s: float = 5.0  # silence after which an agent is declared failed
    event_busy_timeout_s: float = 5.0  # wait this long for another process's lock on events.db
    durability: str = "normal"  # "normal": survives process kill (WAL, synchronous=NORMAL); "full": also power loss
    critical_threshold: float = 0.7  # reputation an agent needs to run tasks marked critical
    cross_check_threshold: float = 0.4  # results from agents below this are re-run on a second agent
    reputation_half_life_s: float = 600.0  # old outcomes lose half their weight after this long

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {self.max_queue}", setting="max_queue")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}", setting="max_attempts")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})", setting="heartbeat_timeout_s")
        if self.durability not in ("normal", "full"):
            raise ConfigError(f"durability must be 'normal' or 'full', got {self.durability!r}", setting="durability")
        if not 0.0 <= self.cross_check_threshold <= self.critical_threshold <= 1.0:
            raise ConfigError("need 0 <= cross_check_threshold <= critical_threshold <= 1", setting="critical_threshold")

    @property
    def events_path(self) -> Path:
        """The SQLite event database."""
        return self.home / "events.db"

    @property
    def checkpoints_dir(self) -> Path:
        """Where agent checkpoints are written."""
        return self.home / "checkpoints"
