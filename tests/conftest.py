"""Shared fixtures: tiny checkpoints in the real layouts, built once per test session."""

from __future__ import annotations

import pytest
import torch

from mlx_gemma_mtp import costs, load_drafter
from mlx_gemma_mtp.load import load_target
from tests.fixtures import KINDS, build_pair, load_hf_pair

# transformers' tiny forwards (the oracle) run ~10x faster on one torch thread than on two busy
# cores' worth of them.
torch.set_num_threads(1)


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
def loaded(checkpoints):
    """{kind: (Target, Drafter)} loaded once from `checkpoints`, shared: do not modify them."""
    out = {}
    for kind, (target_dir, drafter_dir) in checkpoints.items():
        target = load_target(target_dir)
        out[kind] = (target, load_drafter(drafter_dir, target))
    return out


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    """{kind: (transformers target, transformers drafter)}, the numerical oracle."""
    return {kind: load_hf_pair(*dirs) for kind, dirs in checkpoints.items()}


@pytest.fixture(scope="session", autouse=True)
def cost_dir(tmp_path_factory):
    """num_draft_tokens="auto" measures this device's costs once and keeps them on disk: in the
    tests, under a temporary directory rather than ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp("costs")
        patch.setattr(costs, "COST_DIR", directory)
        yield directory
