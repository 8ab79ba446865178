"""Gemma 4 12B ("unified") and its assistant, end to end on the tiny ``"unified"`` fixture.

The fixture is built with transformers 5.17 in the real layout (`Gemma4UnifiedForConditionalGeneration`
with its encoder-free embedders, `Gemma4UnifiedAssistantForCausalLM`), a full layer every 6th as in
the 12B. Greedy output equals transformers' past the sliding window, plain and speculative, for
every draft length; sampling draws the target's distribution; the pair converts, quantizes and
reloads; the drafter is found in every layout it ships in; bad input is refused by name.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from convert import convert
from mlx_gemma_mtp import load, load_drafter, load_pair, stream_generate
from mlx_gemma_mtp.config import ConfigError
from mlx_gemma_mtp.load import find_drafter
from mlx_gemma_mtp.target import WeightsError
from tests.fixtures import SLIDING_WINDOW, STOP_IDS, VOCAB_SIZE, build_pair, load_hf_pair
from tests.test_sampling import ALPHA, chi_square_pvalue

PROMPT = [2, *np.random.RandomState(0).randint(4, VOCAB_SIZE, size=3 * SLIDING_WINDOW + 4).tolist()]
NEW_TOKENS = 5 * SLIDING_WINDOW  # prompt + generation cross the window several times
EMBEDDER_TENSORS = {"vision_embedder": 9, "embed_vision": 1, "embed_audio": 1}  # in the fixture's file


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    """(target_dir, drafter_dir) with an agreeing drafter, and the random drafter's dir."""
    root = tmp_path_factory.mktemp("unified")
    target_dir, drafter_dir = build_pair("unified", root / "agreeing")
    _, random_dir = build_pair("unified", root / "random", agreeing=False)
    return target_dir, drafter_dir, random_dir


@pytest.fixture(scope="module")
def pair(unified):
    target_dir, drafter_dir, _ = unified
    model, tokenizer, drafter = load_pair(target_dir, draft_model=drafter_dir)
    return model, tokenizer, drafter


@pytest.fixture(scope="module")
def hf_pair(unified):
    return load_hf_pair(*unified[:2])


@contextlib.contextmanager
def _one_torch_thread():
    """transformers' tiny forwards: 10 ms on one thread, 100 ms on two cores shared with MLX."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tokens(model, tokenizer, drafter=None, k=3, prompt=PROMPT, max_tokens=NEW_TOKENS, **sampling):
    responses = list(
        stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=max_tokens,
            draft_model=drafter,
            num_draft_tokens=k,
            **sampling,
        )
    )
    return [r.token for r in responses], responses[-1]


def _same_params(a, b) -> bool:
    ours, theirs = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]) for k in ours)


# --------------------------------------------------------------------------------------------
# Exactness against transformers


def test_forward_matches_transformers(pair, hf_pair):
    """Logits and the final hidden state (the drafter's input) of a prompt past the window."""
    model, _, _ = pair
    ids = np.array([PROMPT])
    with torch.no_grad(), _one_torch_thread():
        ref = hf_pair[0](torch.tensor(ids), output_hidden_states=True, use_cache=False)
    hidden = model(mx.array(ids), model.make_cache())
    assert np.abs(np.array(model.logits(hidden)) - ref.logits.numpy()).max() < 1e-4
    assert np.abs(np.array(hidden) - ref.hidden_states[-1].numpy()).max() < 1e-4
    assert model.kv_producers == {"sliding_attention": 4, "full_attention": 5}  # the last of each type


@pytest.fixture(scope="module")
def reference(hf_pair) -> list[int]:
    """transformers' greedy continuation of PROMPT (ending with a stop id if it meets one)."""
    with torch.no_grad(), _one_torch_thread():
        out = hf_pair[0].generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("k", [1, 3, 7, "auto"])
def test_greedy_equals_transformers(k, pair, reference):
    model, tokenizer, drafter = pair
    plain, _ = _tokens(model, tokenizer, k=0)
    spec, last = _tokens(model, tokenizer, drafter, k=k)
    assert len(PROMPT) + len(reference) > 4 * SLIDING_WINDOW
    assert plain == reference, "plain greedy differs from transformers'"
    assert spec == reference, f"k={k}: speculative greedy differs from transformers'"
    print(
        f"\nunified k={k}: acceptance {last.acceptance_rate:.2f}, {last.mean_accepted:.2f} accepted per round"
    )
    if k != "auto":  # auto may find that drafting does not pay on this device
        # 0.7-1.9 accepted per round; a drafter reading the first layer of each type: 0.2-0.45.
        assert last.mean_accepted > 0.5, "the agreeing drafter's drafts are seldom accepted"


def test_random_drafter_is_rejected_and_exact(pair, unified):
    model, tokenizer, _ = pair
    drafter = load_drafter(unified[2], model)
    plain, _ = _tokens(model, tokenizer, k=0)
    spec, last = _tokens(model, tokenizer, drafter, k=3)
    assert spec == plain
    assert last.drafted > 0 and last.acceptance_rate < 0.2


# --------------------------------------------------------------------------------------------
# Sampling: the joint law of the first 3 tokens against the target's, enumerated from transformers

SAMPLING = {"temperature": 1.5, "top_k": 4}
SAMPLE_PROMPT = [2, 17, 230, 41, 99, 305, 12, 77]
SAMPLES = 300


def _exact_joint(hf_target, temperature: float, top_k: int, depth: int = 3) -> dict:
    """P(first `depth` tokens) under the target's top-k sampling at `temperature` (a stop id ends
    a continuation early)."""
    out = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == depth or (prefix and prefix[-1] in STOP_IDS):
            out[tuple(prefix)] = prob
            return
        with torch.no_grad(), _one_torch_thread():
            logits = hf_target(torch.tensor([SAMPLE_PROMPT + prefix])).logits[0, -1].double()
        top = torch.topk(logits, top_k)
        for p, token in zip(torch.softmax(top.values / temperature, -1).tolist(), top.indices.tolist()):
            walk(prefix + [token], prob * p)

    walk([], 1.0)
    return out


def test_speculative_sampling_draws_the_target_distribution(pair, hf_pair):
    model, tokenizer, drafter = pair
    counts, drafted, accepted = Counter(), 0, 0
    for seed in range(SAMPLES):
        tokens, last = _tokens(
            model, tokenizer, drafter, k=2, prompt=SAMPLE_PROMPT, max_tokens=3, seed=seed, **SAMPLING
        )
        counts[tuple(tokens)] += 1
        drafted, accepted = drafted + last.drafted, accepted + last.accepted
    exact = _exact_joint(hf_pair[0], **SAMPLING)
    value = chi_square_pvalue(counts, exact)
    # The same counts against a wrong law (temperature 0.8) must fail. Planted in the loop instead,
    # greedy drafts judged as sampled (test_sampling) fail at p ~ 1e-59.
    biased = chi_square_pvalue(counts, _exact_joint(hf_pair[0], temperature=0.8, top_k=4))
    print(
        f"\nunified sampling: p-value {value:.3f} (against T=0.8: {biased:.1e}), "
        f"acceptance {accepted / drafted:.2f}, {len(exact)} outcomes"
    )
    assert accepted / drafted > 0.3, "too few drafts accepted for the test to have power"
    assert biased < ALPHA
    assert value > ALPHA, f"speculative sampling differs from the target's distribution: p-value {value:.2e}"


# --------------------------------------------------------------------------------------------
# Converting


@pytest.mark.parametrize(
    "variant, args",
    [("f32", {}), ("8bit", {"quantize": True, "q_bits": 8}), ("4bit", {"quantize": True, "q_bits": 4})],
)
def test_convert_reload(variant, args, unified, pair, tmp_path, capsys):
    target_dir, drafter_dir, _ = unified
    out = convert(target_dir, drafter_dir, tmp_path / variant, **args)
    report = capsys.readouterr().out
    dropped = ", ".join(f"{name} {n}" for name, n in EMBEDDER_TENSORS.items())
    assert f"dropped {sum(EMBEDDER_TENSORS.values()):>6,} tensors" in report and dropped in report, report
    text = json.loads((out / "target" / "config.json").read_text())
    assert text["model_type"] == "gemma4_text" and text["hidden_size_per_layer_input"] == 0

    model, tokenizer, drafter = load_pair(out)
    assert drafter.source == out / "drafter" and find_drafter(out) == out / "drafter"
    plain, _ = _tokens(model, tokenizer, k=0)
    assert _tokens(model, tokenizer, drafter, k=3)[0] == plain
    if variant == "f32":  # the same model, bit for bit
        assert _same_params(model, pair[0]) and _same_params(drafter, pair[2])
        assert plain == _tokens(pair[0], pair[1], k=0)[0]


def test_convert_refuses_bad_input(unified, tmp_path):
    target_dir, drafter_dir, _ = unified
    out = tmp_path / "out"

    bad_target = _copy(target_dir, tmp_path / "bad-target")
    config = json.loads((bad_target / "config.json").read_text())
    (bad_target / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "text_config"})
    )
    with pytest.raises(ConfigError, match="model_type 'gemma4_unified' needs a text_config"):
        convert(bad_target, drafter_dir, out, quiet=True)

    bad_drafter = _copy(drafter_dir, tmp_path / "bad-drafter")
    config = json.loads((bad_drafter / "config.json").read_text())
    config["text_config"]["per_layer_config"]["3"]["num_key_value_heads"] = 2
    (bad_drafter / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"bad-drafter/config.json\): kv heads .* does not match target"):
        convert(target_dir, bad_drafter, out, quiet=True)

    extra = _copy(target_dir, tmp_path / "extra")
    mx.save_safetensors(str(extra / "more.safetensors"), {"model.mm_projector.weight": mx.zeros((4, 4))})
    with pytest.raises(
        WeightsError, match="more.safetensors: tensor model.mm_projector.weight is not a parameter"
    ):
        convert(extra, drafter_dir, out, quiet=True)

    no_weights = _copy(target_dir, tmp_path / "no-weights")
    shutil.copy(drafter_dir / "config.json", no_weights / "assistant_config.json")
    with pytest.raises(WeightsError, match=r"assistant_config.json but no assistant\*.safetensors"):
        convert(no_weights, no_weights, out, quiet=True)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Finding the drafter


def _copy(src, dest):
    shutil.copytree(src, dest)
    return dest


def _embed_flat(target_dir, drafter_dir, dest):
    """The target with the assistant beside it: assistant_config.json + assistant.safetensors."""
    out = _copy(target_dir, dest)
    shutil.copy(drafter_dir / "config.json", out / "assistant_config.json")
    shutil.copy(drafter_dir / "model.safetensors", out / "assistant.safetensors")
    return out


def test_drafter_found_in_every_layout(unified, pair, tmp_path):
    target_dir, drafter_dir, _ = unified
    sibling = _copy(target_dir, tmp_path / "gemma-4-12B-it")
    _copy(drafter_dir, tmp_path / "gemma-4-12B-it-assistant")
    subdir = _copy(target_dir, tmp_path / "subdir")
    _copy(drafter_dir, subdir / "assistant")
    flat = _embed_flat(target_dir, drafter_dir, tmp_path / "flat")
    expected = {sibling: tmp_path / "gemma-4-12B-it-assistant", subdir: subdir / "assistant", flat: flat}
    for path, source in expected.items():
        model, _, drafter = load_pair(path)
        assert find_drafter(path) == source and drafter.source == source, path
        assert _same_params(model, pair[0]) and _same_params(drafter, pair[2]), path
    assert load_pair(target_dir)[2] is None  # none beside the fixture's own target

    with pytest.raises(ConfigError, match="is not a Gemma 4 assistant .* embeds none"):
        load_drafter(target_dir, pair[0])
    _copy(drafter_dir, flat / "assistant")
    with pytest.raises(ConfigError, match="embeds several assistants"):
        load_pair(flat)


def test_convert_from_an_embedded_assistant(unified, pair, tmp_path, capsys):
    target_dir, drafter_dir, _ = unified
    flat = _embed_flat(target_dir, drafter_dir, tmp_path / "flat")
    convert(flat, None, tmp_path / "target-only")
    assert f"{flat} embeds an assistant" in capsys.readouterr().out
    assert _same_params(
        load(tmp_path / "target-only")[0], pair[0]
    )  # the assistant's file not read as the target's

    out = convert(flat, flat, tmp_path / "pair", quiet=True)
    assert sorted(p.name for p in (out / "drafter").iterdir()) == [
        "config.json", "model.safetensors", "model.safetensors.index.json"
    ]  # fmt: skip
    model, _, drafter = load_pair(out)
    assert _same_params(model, pair[0]) and _same_params(drafter, pair[2])
