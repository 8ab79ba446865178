"""The public API as a user calls it, and bad input getting a clear error."""

from __future__ import annotations

import importlib
import json
import shutil

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map

from convert import convert
from mlx_gemma_mtp import generate, load, load_drafter, load_pair, stream_generate
from mlx_gemma_mtp.config import ConfigError
from mlx_gemma_mtp.draft_length import Auto
from mlx_gemma_mtp.generate import make_prompt_cache
from mlx_gemma_mtp.quantize import quantize
from mlx_gemma_mtp.target import WeightsError


@pytest.fixture(scope="module")
def e2b(checkpoints):
    model, tokenizer = load(checkpoints["e2b"][0])
    return model, tokenizer, load_drafter(checkpoints["e2b"][1], model)


def test_stream_generate_responses(e2b):
    model, tokenizer, drafter = e2b
    prompt = "the quick brown fox jumps over the lazy dog and " * 3
    plain = list(stream_generate(model, tokenizer, prompt, max_tokens=24))
    spec = list(
        stream_generate(model, tokenizer, prompt, draft_model=drafter, max_tokens=24, num_draft_tokens=3)
    )
    assert [r.token for r in spec] == [r.token for r in plain]
    assert "".join(r.text for r in spec) == generate(
        model, tokenizer, prompt, draft_model=drafter, max_tokens=24
    )
    last = spec[-1]
    assert last.generation_tokens == len(spec) <= 24
    assert last.finish_reason in ("stop", "length")
    assert last.prompt_tokens == len(tokenizer.encode(prompt))
    assert last.drafted >= last.accepted > 0
    assert sum(r.from_draft for r in spec) == last.accepted or last.finish_reason is not None
    assert last.prompt_tps > 0 and last.peak_memory > 0
    assert plain[-1].drafted == 0 and not any(r.from_draft for r in plain)
    # A token-id prompt gives the same as its text.
    ids = tokenizer.encode(prompt)
    assert [r.token for r in stream_generate(model, tokenizer, ids, draft_model=drafter, max_tokens=24)] == [
        r.token for r in spec
    ]


def test_stops_at_every_stop_id(e2b, checkpoints):
    model, tokenizer, drafter = e2b
    assert set(model.config.stop_ids) == {1, 106}  # from config.json and generation_config.json
    out = list(stream_generate(model, tokenizer, [2, 5, 9, 13], draft_model=drafter, max_tokens=200))
    assert out[-1].finish_reason in ("stop", "length")
    if out[-1].finish_reason == "stop":
        assert out[-1].token in (1, 106) and out[-1].text == ""
    assert all(r.token not in (1, 106) for r in out[:-1])


def test_bad_arguments(e2b):
    model, tokenizer, drafter = e2b
    with pytest.raises(ValueError, match="prompt is empty"):
        stream_generate(model, tokenizer, [], draft_model=drafter)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tokenizer, "", draft_model=drafter)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_tokens"):
            stream_generate(model, tokenizer, "hi", draft_model=drafter, max_tokens=bad)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        stream_generate(model, tokenizer, "hi", draft_model=drafter, num_draft_tokens=99)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream_generate(model, tokenizer, [5, 100000], draft_model=drafter)


def _copy(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_missing_and_truncated_safetensors(checkpoints, tmp_path):
    target_dir = _copy(checkpoints["dense"][0], tmp_path)
    weights = target_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors: not a readable safetensors file"):
        load(target_dir)
    weights.unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        load(target_dir)
    # A sharded checkpoint whose index names a shard that is not there.
    weights.write_bytes(data)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (target_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors is named by"):
        load(target_dir)


def test_unknown_model_type_and_missing_config(checkpoints, tmp_path):
    target_dir = _copy(checkpoints["dense"][0], tmp_path)
    config = json.loads((target_dir / "config.json").read_text())
    (target_dir / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not a Gemma 4 target"):
        load(target_dir)
    (target_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json is missing"):
        load(target_dir)
    with pytest.raises(ConfigError, match="no such model directory"):
        load(tmp_path / "nowhere")


def test_bidirectional_attention_all_is_refused(checkpoints, tmp_path):
    """'all' makes every token attend both ways (transformers: is_causal False, a halved window);
    this runtime decodes causally, so such a config is refused by name, not run as causal."""
    moe = _copy(checkpoints["moe"][0], tmp_path, "moe")  # multimodal, "vision": loads as it is
    load(moe)
    config = json.loads((moe / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = "all"
    (moe / "config.json").write_text(json.dumps(config))
    refused = r"moe/config.json: text_config.use_bidirectional_attention is 'all'"
    with pytest.raises(ConfigError, match=refused):
        load(moe)
    dense = _copy(checkpoints["dense"][0], tmp_path, "dense")  # text-only: the field is top-level
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(config | {"use_bidirectional_attention": "all"}))
    with pytest.raises(ConfigError, match=r"dense/config.json: use_bidirectional_attention is 'all'"):
        load(dense)
    drafter = _copy(checkpoints["dense"][1], tmp_path, "drafter")
    config = json.loads((drafter / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = "all"
    (drafter / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"drafter/config.json: text_config.use_bidirectional_attention"):
        load_drafter(drafter, load(checkpoints["dense"][0])[0])


def test_weights_that_do_not_fit(checkpoints, tmp_path):
    target_dir = _copy(checkpoints["dense"][0], tmp_path)
    config = json.loads((target_dir / "config.json").read_text())
    (target_dir / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(WeightsError, match="does not fit the model"):
        load(target_dir)


def test_mismatched_drafter(checkpoints, tmp_path):
    model, _ = load(checkpoints["dense"][0])
    with pytest.raises(ConfigError, match=r"kv heads .* does not match target"):
        load_drafter(checkpoints["e2b"][1], model)
    drafter_dir = _copy(checkpoints["dense"][1], tmp_path, "drafter")
    config = json.loads((drafter_dir / "config.json").read_text())
    (drafter_dir / "config.json").write_text(json.dumps(config | {"backbone_hidden_size": 96}))
    with pytest.raises(ConfigError, match="backbone_hidden_size 96 does not match target 64"):
        load_drafter(drafter_dir, model)
    with pytest.raises(ConfigError, match="is not a Gemma 4 assistant"):
        load_drafter(checkpoints["dense"][0], model)


def test_dtype_is_kept_unless_asked(checkpoints):
    model, _ = load(checkpoints["dense"][0])
    assert model.model.embed_tokens.weight.dtype == mx.float32  # the fixtures are float32
    model, _ = load(checkpoints["dense"][0], dtype=mx.bfloat16)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    drafter = load_drafter(checkpoints["e2b"][1], load(checkpoints["e2b"][0])[0], dtype=mx.bfloat16)
    assert drafter.masked_embedding.token_ordering.dtype == mx.int32


def test_token_ordering_is_not_a_parameter(checkpoints, tmp_path):
    """The clustered head's index table stays int32 whatever is done to the parameters: cast,
    quantized, converted and loaded again."""
    model, _ = load(checkpoints["e2b"][0])
    drafter = load_drafter(checkpoints["e2b"][1], model)
    ordering = drafter.masked_embedding.token_ordering
    assert "masked_embedding.token_ordering" not in {name for name, _ in tree_flatten(drafter.parameters())}
    h = mx.random.normal((1, 1, drafter.args.hidden_size))
    greedy = drafter.greedy_token(h)

    drafter.update(tree_map(lambda p: p.astype(mx.float16), drafter.parameters()))  # cast every parameter
    quantize(drafter, 8, 32)
    table = drafter.masked_embedding.token_ordering
    assert table.dtype == mx.int32 and mx.array_equal(table, ordering)

    pair = convert(*checkpoints["e2b"], tmp_path / "pair", quiet=True)
    converted = load_pair(pair)[2]
    assert mx.array_equal(converted.masked_embedding.token_ordering, ordering)
    assert mx.array_equal(converted.greedy_token(h), greedy)
    refused = r"token_ordering must be 512 integers, got shape \(512,\) .*float32"
    with pytest.raises(WeightsError, match=refused):
        drafter.masked_embedding.set_token_ordering(ordering.astype(mx.float32))


def test_prompt_cache_prefills_only_the_new_turn(e2b):
    model, tokenizer, drafter = e2b
    cache = make_prompt_cache(model)
    first = [2, 7, 11, 13, 17, 19, 23] * 5
    out1 = [
        r.token
        for r in stream_generate(
            model, tokenizer, first, draft_model=drafter, max_tokens=12, prompt_cache=cache
        )
    ]
    assert cache.tokens == first + out1[:-1]
    second = first + out1 + [29, 31, 37]
    responses = list(
        stream_generate(model, tokenizer, second, draft_model=drafter, max_tokens=12, prompt_cache=cache)
    )
    assert responses[0].prompt_tokens == 4  # the last answer token, not yet cached, and 3 new ones
    fresh = [r.token for r in stream_generate(model, tokenizer, second, draft_model=drafter, max_tokens=12)]
    assert [r.token for r in responses] == fresh
    # A prompt that diverges from the cache rewinds to the shared prefix.
    third = first[:20] + [41, 43]
    responses = list(stream_generate(model, tokenizer, third, max_tokens=5, prompt_cache=cache))
    assert responses[0].prompt_tokens == 2
    assert [r.token for r in responses] == [
        r.token for r in stream_generate(model, tokenizer, third, max_tokens=5)
    ]


def test_a_conversation_keeps_its_draft_length_policy(e2b, monkeypatch):
    """A conversation's turns (`prompt_cache`) share one policy while the model, drafter and
    setting stay: auto's acceptance and costs, learnt over a turn, carry to the next (a new
    policy each turn started from the prior: docs/auto.md, "Conversations in turn"). Another
    setting gets a policy of its own; the output stays exact."""
    module = importlib.import_module("mlx_gemma_mtp.generate")  # the package's `generate` is a function
    model, tokenizer, drafter = e2b
    made, real = [], module.draft_length
    monkeypatch.setattr(module, "draft_length", lambda *a: made.append(a[0]) or real(*a))

    def answer(prompt, max_tokens=8, **kwargs):
        kwargs = {"draft_model": drafter, "max_tokens": max_tokens, **kwargs}
        return [r.token for r in stream_generate(model, tokenizer, prompt, **kwargs)]

    cache = make_prompt_cache(model)
    turn = [2, 7, 11, 13, 17, 19, 23] * 5
    for _ in range(2):
        turn = turn + answer(turn, prompt_cache=cache) + [29, 31]
    auto = cache.drafting[3]
    assert made == ["auto"] and isinstance(auto, Auto)  # one policy for both turns
    answer(turn, 4, prompt_cache=cache, num_draft_tokens="heuristic")
    assert made == ["auto", "heuristic"] and cache.drafting[3] is not auto
    fresh = answer(turn)  # no conversation: a policy of its own
    assert answer(turn, prompt_cache=cache) == fresh and made == ["auto", "heuristic", "auto", "auto"]
