"""Creating and opening evolution runs: the store's place, the config check, the hive client.

``create_or_open`` makes run ``name`` (or opens it when it exists with the same config:
``RunConfigError`` otherwise); ``open_existing`` opens a run by name (``RunNotFoundError``
lists the known ones). Both return what ``EvolutionScheduler`` is built from; the config of
an existing run always comes from its store.

Example:
    >>> name, cfg, store, client = open_existing("demo", home=None, client=None)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import hive
from evolution._config import EvolutionConfig
from evolution._evaluator import default_evaluators
from evolution._exceptions import EvolutionError, RunConfigError, RunNotFoundError
from evolution._store import RunStore

__all__ = ["create_or_open", "open_existing", "store_path"]


def store_path(home: Path, name: str) -> Path:
    """``<home>/evolution/<name>.db``."""
    return home / "evolution" / f"{name}.db"


def _fingerprint(cfg: EvolutionConfig) -> str:
    """Config JSON with callable tasks reduced to their function names (pickles vary)."""
    data = cfg.model_dump(mode="json")
    for task, obj in zip(data["tasks"], cfg.tasks):
        if "fn" in task:
            task["fn"] = getattr(getattr(obj, "fn", None), "__qualname__", "fn")
    return json.dumps(data, sort_keys=True)


def _client(home: str | Path | None, client: hive.Client | None) -> hive.Client:
    if client is not None:
        return client
    if hive.is_initialized():
        return hive.client()
    return hive.init(home=home)


def create_or_open(
    cfg: EvolutionConfig, name: str, home: str | Path | None, client: hive.Client | None
) -> tuple[EvolutionConfig, RunStore, hive.Client]:
    """Create run ``name`` with ``cfg``, or open it when it exists with the same config.

    Returns:
        (the run's config as stored, its store, the hive client).

    Raises:
        EvolutionError: ``name`` is not a plain file name.
        RunConfigError: a run of that name exists with another config.
    """
    if not name or "/" in name or name.startswith("."):
        raise EvolutionError(f"run name {name!r} must be a plain file name", name=name)
    c = _client(home, client)
    path = store_path(Path(c.config.home), name)
    store = RunStore.open(path)
    meta = store.meta()
    if "config" in meta:
        if _fingerprint(EvolutionConfig.from_json(meta["config"])) != _fingerprint(cfg):
            store.close()
            raise RunConfigError(
                f"run {name!r} already exists in {path} with another config; attach to it "
                "with EvolutionScheduler.attach(name), or launch under a new name",
                name=name,
            )
        return EvolutionConfig.from_json(meta["config"]), store, c
    evaluators = cfg.evaluators or default_evaluators()
    store.set_meta(run_id=uuid.uuid4().hex[:12], name=name, config=cfg.to_json(),
                   window=str(cfg.max_in_flight or evaluators), created=str(time.time()))  # fmt: skip
    return cfg, store, c


def open_existing(
    name: str, home: str | Path | None, client: hive.Client | None
) -> tuple[EvolutionConfig, RunStore, hive.Client]:
    """Open existing run ``name``: (its stored config, its store, the hive client).

    Raises:
        RunNotFoundError: no run ``name`` in the home; the message lists the known ones.
    """
    c = _client(home, client)
    path = store_path(Path(c.config.home), name)
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.db")) if path.parent.exists() else []
        raise RunNotFoundError(
            f"no evolution run {name!r} in {path.parent}; known runs: {', '.join(known) or 'none'} "
            "(start one with EvolutionScheduler.launch / `hive evolve start`)",
            name=name, home=str(c.config.home),
        )  # fmt: skip
    store = RunStore.open(path)
    return EvolutionConfig.from_json(store.meta()["config"]), store, c
