"""Numerical parity with transformers 5.17 (the oracle), float32, per architecture."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from convert import convert
from mlx_gemma_mtp.cache import ring_positions
from mlx_gemma_mtp.load import load_drafter, load_target
from mlx_gemma_mtp.speculative import prefill
from tests.fixtures import KINDS, SLIDING_WINDOW, VOCAB_SIZE, load_hf_pair

TOLERANCE = 1e-4
PROMPT_LEN = 4 * SLIDING_WINDOW + 3  # crosses the sliding window several times


def _prompt(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(4, VOCAB_SIZE, size=(1, PROMPT_LEN))


def _hf_forward(hf_target, ids: np.ndarray):
    with torch.no_grad():
        return hf_target(
            torch.tensor(ids), output_hidden_states=True, return_shared_kv_states=True, use_cache=False
        )


@pytest.mark.parametrize("kind", KINDS)
def test_target_logits_and_hidden(kind, checkpoints, hf_models):
    target = load_target(checkpoints[kind][0])
    ids = _prompt()
    ref = _hf_forward(hf_models[kind][0], ids)
    hidden = target(mx.array(ids), target.make_cache())
    logits_err = np.abs(np.array(target.logits(hidden)) - ref.logits.numpy()).max()
    hidden_err = np.abs(np.array(hidden) - ref.hidden_states[-1].numpy()).max()
    print(f"\n{kind} target: max |logits - tf| {logits_err:.2e}, max |hidden - tf| {hidden_err:.2e}")
    assert logits_err <= TOLERANCE and hidden_err <= TOLERANCE

    # One token at a time through our caches, past the window: the same logits.
    cache = target.make_cache()
    steps = [target.logits(target(mx.array(ids[:, i : i + 1]), cache)) for i in range(PROMPT_LEN)]
    step_err = np.abs(np.array(mx.concatenate(steps, axis=1)) - ref.logits.numpy()).max()
    assert step_err <= TOLERANCE, f"incremental decoding differs by {step_err}"


@pytest.mark.parametrize("kind", KINDS)
def test_shared_kv_is_what_transformers_shares(kind, checkpoints, hf_models):
    """The cache views the drafter reads hold the K/V transformers hands its assistant."""
    target = load_target(checkpoints[kind][0])
    ids = _prompt(1)
    ref = _hf_forward(hf_models[kind][0], ids).shared_kv_states
    cache = target.make_cache()
    prefill(target, ids[0].tolist(), cache)
    reach = {}
    for layer_type, (keys, values, mask) in cache.views(target.kv_producers, mx.float32).items():
        S = keys.shape[2]
        held = (
            np.arange(S)
            if layer_type == "full_attention"
            else np.array(ring_positions(cache.positions.offset, S))[0]
        )
        seen = np.array(mask)[0, 0, 0] == 0  # additive mask: 0 where the drafter sees the position
        order = np.argsort(np.where(seen, held, np.iinfo(np.int32).max))[
            : seen.sum()
        ]  # seen slots by position
        keys, values = np.array(keys)[:, :, order], np.array(values)[:, :, order]
        reach[layer_type] = keys.shape[2]
        ref_k, ref_v = (t[:, :, -reach[layer_type] :].numpy() for t in ref[layer_type])
        assert keys.shape == ref_k.shape
        assert np.abs(keys - ref_k).max() <= TOLERANCE
        assert np.abs(values - ref_v).max() <= TOLERANCE
    assert reach == {"sliding_attention": SLIDING_WINDOW + 1, "full_attention": ids.shape[1]}


@pytest.mark.parametrize("kind", KINDS)
def test_drafter_logits_and_projection(kind, checkpoints, hf_models):
    """Given the same K/V, token embedding and hidden state, one drafter step matches."""
    target = load_target(checkpoints[kind][0])
    drafter = load_drafter(checkpoints[kind][1], target)
    hf_target, hf_drafter = hf_models[kind]
    ids = _prompt(2)
    position = PROMPT_LEN - 1  # the drafter embeds this token; K/V cover positions before it
    ref_out = _hf_forward(hf_target, ids)
    hf_kv = {t: (k[:, :, :position], v[:, :, :position]) for t, (k, v) in ref_out.shared_kv_states.items()}
    token = ids[:, position : position + 1]
    hidden = ref_out.hidden_states[-1][:, position - 1 : position]
    with torch.no_grad():
        embed = hf_target.get_input_embeddings()(torch.tensor(token))
        ref = hf_drafter(
            inputs_embeds=torch.cat([embed, hidden], dim=-1),
            position_ids=torch.tensor([[position]]),
            shared_kv_states=hf_kv,
        )

    cache = target.make_cache()
    prefill(target, ids[0, :position].tolist(), cache)
    shared_kv = cache.views(target.kv_producers, mx.float32)
    inputs = mx.concatenate([target.embed(mx.array(token)), mx.array(hidden.numpy())], axis=-1)
    h, projected = drafter(inputs, shared_kv, cache.positions.offset)

    proj_err = np.abs(np.array(projected) - ref.last_hidden_state.numpy()).max()
    ref_logits = ref.logits.numpy()[0, 0]
    if drafter.config.use_ordered_embeddings:
        ids_, logits = (np.array(a)[0, 0] for a in drafter.candidate_logits(h))
        # transformers scatters the selected logits into a full row filled with min - 1.
        selected = np.flatnonzero(ref_logits > ref_logits.min())
        assert set(ids_.tolist()) >= set(selected.tolist())
        logits_err = np.abs(ref_logits[ids_] - logits).max()
    else:
        logits_err = np.abs(np.array(drafter.logits(h))[0, 0] - ref_logits).max()
    print(f"\n{kind} drafter: max |logits - tf| {logits_err:.2e}, max |projected - tf| {proj_err:.2e}")
    assert logits_err <= TOLERANCE and proj_err <= TOLERANCE
    assert int(drafter.greedy_token(h).item()) == int(ref_logits.argmax())


PLACEHOLDERS = {"image_token_id": 500, "audio_token_id": 501, "video_token_id": 502}


def test_multimodal_placeholder_ids_embed_as_pad(checkpoints, tmp_path):
    """transformers' Gemma4Model.forward embeds the image/audio/video placeholder ids as <pad>,
    for the token embedding and the per-layer inputs; the drafter's input embedding
    (candidate_generator.py) stays the raw row. The fixture's own placeholder ids lie outside
    its vocabulary, so this copy moves them inside."""
    target_dir = shutil.copytree(checkpoints["e2b"][0], tmp_path / "target")
    config = json.loads((target_dir / "config.json").read_text())
    (target_dir / "config.json").write_text(json.dumps({**config, **PLACEHOLDERS}))
    hf_target, _ = load_hf_pair(target_dir, checkpoints["e2b"][1])
    ids = _prompt(3)
    ids[0, [5, 12, 13, 30]] = [500, 501, 502, 500]
    ref = _hf_forward(hf_target, ids)
    raw = hf_target.get_input_embeddings()(torch.tensor([[500, 501, 502]])).detach().numpy()

    converted = convert(target=target_dir, out=tmp_path / "converted", quiet=True)  # text-only gemma4_text
    for model_dir in (target_dir, converted):
        target = load_target(model_dir)
        hidden = target(mx.array(ids), target.make_cache())
        logits_err = np.abs(np.array(target.logits(hidden)) - ref.logits.numpy()).max()
        hidden_err = np.abs(np.array(hidden) - ref.hidden_states[-1].numpy()).max()
        assert logits_err <= TOLERANCE and hidden_err <= TOLERANCE, (model_dir, logits_err, hidden_err)
        assert np.abs(np.array(target.embed(mx.array([[500, 501, 502]]))) - raw).max() <= TOLERANCE
