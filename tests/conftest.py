"""Shared fixtures: tiny checkpoints in the real layouts, built once per test session."""

from __future__ import annotations

import pytest

from tests.fixtures import KINDS, build_pair, load_hf_pair


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{kind: (target_dir, drafter_dir)} with agreeing drafters."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: build_pair(kind, root) for kind in KINDS}


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory):
    """{kind: (target_dir, drafter_dir)} with plain random drafters (agree with nothing)."""
    root = tmp_path_factory.mktemp("random-checkpoints")
    return {kind: build_pair(kind, root, agreeing=False) for kind in KINDS}


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    """{kind: (transformers target, transformers drafter)}, the numerical oracle."""
    return {kind: load_hf_pair(*dirs) for kind, dirs in checkpoints.items()}
