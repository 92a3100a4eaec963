"""Fixtures every hive test shares. The machinery behind them is in ``tests/factories.py``.

Ray
    ``ray_local``   (function-scoped handle on one session-wide local Ray instance)
    ``ray_cluster`` (module-scoped simulated multi-node cluster: head + w1 + w2)
    Only one is connected at a time. ``ray_cluster`` shuts the local instance down for its module
    and the next ``ray_local`` user starts it again, so modules may use either, but one module
    must not use both.

State and models
    ``hive_home``   temporary ``$HIVE_HOME`` (function-scoped)
    ``tiny_gpt2``, ``tiny_llama``, ``tiny_llama_tied``   checkpoint directories (session-scoped)

Markers (registered in pyproject.toml, ``--strict-markers``)
    ``gpu``          skipped automatically when ``torch.cuda.is_available()`` is False
    ``slow``         runs by default; deselect with ``-m "not slow"``
    ``integration``  multi-process / multi-node / kill -9 tests
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.factories import (
    SimCluster,
    WorkerSpec,
    ensure_local_ray,
    make_tiny_model,
    shutdown_ray,
)

GPU_SKIP_REASON = "needs a CUDA GPU (none visible: torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests on machines without CUDA (``slow`` is never auto-skipped)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_shutdown_at_session_end() -> Iterator[None]:
    """Stops whatever Ray the tests left connected when the session ends."""
    yield
    shutdown_ray()


@pytest.fixture
def ray_local(ray_shutdown_at_session_end: None) -> Any:
    """A local Ray instance: 4 logical CPUs, namespace "hive", no dashboard.

    Started once and reused by every test that asks for it (restarted only if a
    ``ray_cluster`` module or a stray ``ray.init`` replaced it). Returns the ``RayContext`` of
    ``ray.init``. Workers get the checkout on ``PYTHONPATH``. Named actors a test creates outlive
    the test: give them unique names or kill them.
    """
    return ensure_local_ray()


@pytest.fixture(scope="module")
def ray_cluster(
    request: pytest.FixtureRequest, ray_shutdown_at_session_end: None
) -> Iterator[SimCluster]:
    """A simulated 3-node Ray cluster on this machine, with the driver connected to it.

    Nodes: head (1 CPU, ``{"head": 1}``), ``w1`` and ``w2`` (2 CPUs and
    ``{"sim_gpu": 2, "node_w1" | "node_w2": 1}`` each). The yielded ``SimCluster`` has
    ``.cluster``, ``.address``, ``.node_ids`` (``{"head": hex, "w1": hex, "w2": hex}``),
    ``.head_node_id``, ``.workers``, and ``.add_worker(WorkerSpec("w3"))`` /
    ``.remove_worker("w1")`` for tests that grow or lose nodes (restore what you removed if
    later tests of the module need it). Shut down at the end of the module.
    """
    sim = SimCluster.start(
        [WorkerSpec("w1"), WorkerSpec("w2")],
        head_cpus=1,
        owner=f"ray_cluster fixture of {request.module.__name__}",
    )
    try:
        yield sim
    finally:
        sim.shutdown()


# --------------------------------------------------------------------------------------------
# hive state directory
# --------------------------------------------------------------------------------------------


@pytest.fixture
def hive_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory set as ``$HIVE_HOME`` in this (driver) process for one test.

    Ray workers already running do not see the change; pass the path explicitly to actors.
    """
    home = tmp_path / "hive-home"
    home.mkdir()
    monkeypatch.setenv("HIVE_HOME", str(home))
    return home


# --------------------------------------------------------------------------------------------
# Tiny Hugging Face checkpoints (seed 0; build others with tests.factories.make_tiny_model)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2: 4 layers, n_embd 64, 4 heads, vocab 128, 128 positions, tied; + ASCII tokenizer."""
    return make_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama: 4 layers, hidden 64, 4 heads / 2 kv heads (GQA), mlp 128, vocab 128, untied."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama`` with ``tie_word_embeddings=True`` (lm_head shares embed_tokens)."""
    return make_tiny_model(
        "llama", tmp_path_factory.mktemp("tiny-llama-tied"), seed=0, tie_embeddings=True
    )
