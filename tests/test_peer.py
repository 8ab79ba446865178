"""`bench.peer`: the checkpoint both runtimes load, the peer process's protocol and its errors.

The fork itself (mlx-lm-broomva) is not a dependency: the end-to-end test installs it from the
wheel carried in `.device/peer/` into a temporary directory, and is skipped where that wheel is
absent; everything else runs without it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_gemma_mtp
from bench import peer
from bench.models import build

WHEELS = sorted((Path(__file__).parents[1] / ".device" / "peer").glob("mlx_lm_broomva-*.whl"))


def _params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def _assert_same(loaded: dict, built: dict) -> None:
    assert loaded.keys() == built.keys()
    for name, value in built.items():
        assert loaded[name].dtype == value.dtype, name
        assert mx.array_equal(loaded[name], value).item(), name


def test_written_pair_loads_with_the_same_weights(tmp_path):
    target, drafter = build("tiny", cycled=False)
    peer.write_pair(target, drafter, tmp_path)
    model, tokenizer, loaded_drafter = mlx_gemma_mtp.load_pair(tmp_path)
    _assert_same(_params(model), _params(target))
    _assert_same(_params(loaded_drafter), _params(drafter))
    assert model.config.stop_ids == target.config.stop_ids
    assert tokenizer.decode([200, 201]) == "▁w200▁w201".replace("▁", " ")


def test_quantized_pair_keeps_the_drafter_embedding_dense_on_request(tmp_path):
    target, drafter = build("tiny", bits=4, cycled=False)
    peer.write_pair(target, drafter, tmp_path, dense_drafter_embedding=True)
    model, _, loaded_drafter = mlx_gemma_mtp.load_pair(tmp_path)
    _assert_same(_params(model), _params(target))
    built, loaded = _params(drafter), _params(loaded_drafter)
    table = drafter.model.embed_tokens
    dense = mx.dequantize(table.weight, table.scales, table.biases, table.group_size, table.bits)
    embedding = loaded.pop("model.embed_tokens.weight")
    assert embedding.dtype == table.scales.dtype  # the model's float dtype
    assert mx.array_equal(embedding, dense.astype(embedding.dtype)).item()
    for name in ("weight", "scales", "biases"):
        built.pop(f"model.embed_tokens.{name}")
    _assert_same(loaded, built)  # every other layer as quantized


def test_peer_drafting_counts_rounds_from_flags():
    # n = 8, k = 3: seed; round 1 accepts 2 (+1); round 2 accepts 0 (+1); round 3 accepts 3 (+0,
    # cut by max_tokens after 8 tokens).
    flags = [False, True, True, False, False, True, True, True]
    assert peer.peer_drafting(flags, k=3, n=8) == {"drafted": 9, "accepted": 5, "mean_accepted": 5 / 3}
    # Nothing accepted: 7 rounds of one token after the seed; the last two draft only what
    # max_tokens leaves (2, then 1).
    assert peer.peer_drafting([False] * 8, k=3, n=8)["drafted"] == 5 * 3 + 2 + 1


def test_missing_peer_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"mlx_lm/generate.py not found: install the fork there"):
        peer.check_peer_path(tmp_path)


def test_peer_process_refuses_an_mlx_lm_from_elsewhere(tmp_path):
    """A peer path without the fork: the runner imports our mlx-lm instead and says so."""
    refused = pytest.raises(SystemExit, match=r"bench.peer: mlx_lm was imported from .* not from ")
    with refused, peer.peer_process(tmp_path, tmp_path) as process:
        raise AssertionError(f"the runner started against a path without the fork: {process}")


@pytest.mark.skipif(not WHEELS, reason="no mlx_lm_broomva wheel in .device/peer/ (see bench/peer.py)")
def test_peer_runs_side_by_side_and_agrees_on_cpu(tmp_path):
    peer_path = tmp_path / "broomva"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(peer_path), str(WHEELS[-1])],
        check=True,
    )  # fmt: skip
    target, drafter = build("tiny", cycled=False)
    pair = peer.write_pair(target, drafter, tmp_path / "pair")
    args = peer.setup_arg_parser().parse_args(
        [
            "--shape",
            "tiny",
            "--prompt",
            "12",
            "--tokens",
            "10",
            "--trials",
            "1",
            "--peer-path",
            str(peer_path),
        ]
    )
    result = peer.compare(args, pair)
    runs = {(r["who"], r["mode"]): r for r in result["runs"]}
    assert result["peer"]["version"] == WHEELS[-1].name.split("-")[1]
    assert result["within_window"]
    # On the CPU backend every loop gives the target's own greedy tokens.
    assert all(r["same_as_our_plain"] == 10 for r in runs.values()), runs
    # A random drafter: nothing accepted, 9 rounds of one token after the seed, the last two
    # drafting 2 and 1.
    assert runs["peer", "k=3"]["accepted"] == 0
    assert runs["peer", "k=3"]["drafted"] == 7 * 3 + 2 + 1
