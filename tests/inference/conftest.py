"""Fixtures of the inference tests: more tiny architectures.

``tests/conftest.py`` gives ``tiny_gpt2``, ``tiny_llama`` and ``tiny_llama_tied``; this adds
``tiny_qwen2`` (qkv biases; layers 2-3 slide over a 4-token window), ``tiny_mistral`` (every
layer slides over 4 tokens) and ``tiny_llama8`` (8 layers, for the memory test). The window is
shorter than the test prompts, so sliding-window masks and caches are exercised. Parametrize
``model_dir`` indirectly with names from ``helpers.ARCHES`` to run a test on each architecture.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import make_tiny_model
from tests.inference.helpers import TINY_LLAMA_LIKE, make_tiny_from_config


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Qwen2Config

    config = Qwen2Config(
        **TINY_LLAMA_LIKE, use_sliding_window=True, sliding_window=4, max_window_layers=2
    )
    return make_tiny_from_config(config, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MistralConfig

    config = MistralConfig(**TINY_LLAMA_LIKE, sliding_window=4)
    return make_tiny_from_config(config, tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def tiny_llama8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama8"), n_layers=8)


@pytest.fixture
def model_dir(request: pytest.FixtureRequest) -> Path:
    """The checkpoint fixture named by an indirect parametrization (one of ``helpers.ARCHES``)."""
    return Path(request.getfixturevalue(request.param))
