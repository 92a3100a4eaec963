"""Fixtures of the evolution tests: tiny checkpoints to merge (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.evolution.helpers import TinySet, make_tiny_set


@pytest.fixture(scope="session")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> TinySet:
    """A tiny untied llama base and three fine-tunes of it (models differ by their seed)."""
    return make_tiny_set(tmp_path_factory.mktemp("llamas"), "llama")


@pytest.fixture(scope="session")
def gpt2s(tmp_path_factory: pytest.TempPathFactory) -> TinySet:
    """A tiny gpt2 base (tied embeddings) and three fine-tunes."""
    return make_tiny_set(tmp_path_factory.mktemp("gpt2s"), "gpt2")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Where a test writes its merge (does not exist yet)."""
    return tmp_path / "merged"
