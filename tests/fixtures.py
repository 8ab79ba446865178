"""Tiny random-weight Gemma 4 targets and MTP drafters, saved in the real on-disk layout.

Built with transformers 5.17.0 in float32 and written with ``save_pretrained`` (safetensors), so the
tests of the MLX runtime read exactly what transformers writes. Three kinds mirror the three
architectures of the Gemma 4 family:

- ``"e2b"``: ``Gemma4ForConditionalGeneration`` with tiny vision and audio towers, per-layer inputs
  (PLE), KV-shared layers, a double-wide MLP on the shared layers; drafter with ordered embeddings
  (centroid head).
- ``"dense"``: text-only ``Gemma4ForCausalLM`` with ``attention_k_eq_v`` (no ``v_proj`` on full
  layers) and fewer global KV heads; dense-head drafter.
- ``"moe"``: ``Gemma4ForConditionalGeneration`` (vision tower, no audio) with MoE blocks and K=V;
  dense-head drafter.

Agreeing drafters (``agreeing=True``): the drafter's layers copy the target's K/V-producing layers
(and the quiet layers before them), and every other contribution of the target is scaled down, so
the drafter predicts the target's greedy token most of the time while the target still produces
varied continuations. Measured on 2 CPU cores with ``python tests/fixtures.py`` (seed 0, prompts of
40 tokens, 3 seeds of prompts):

    AGREEMENT_TABLE

"first draft" = the drafter's argmax given the true token and the target's hidden state, against
the target's greedy token (all prompt positions); "generate" = accepted / drafted tokens in
``target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=40)`` with 3 draft
tokens per round (its output equals plain greedy ``generate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import tempfile

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    GenerationConfig,
)

KINDS = ("e2b", "dense", "moe")
VOCAB_SIZE = 512
SLIDING_WINDOW = 8
STOP_IDS = (1, 106)

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
TURN_START_ID, TURN_END_ID = 105, 106
SPECIAL_TOKENS = {
    PAD_ID: "<pad>",
    EOS_ID: "<eos>",
    BOS_ID: "<bos>",
    UNK_ID: "<unk>",
    TURN_START_ID: "<|turn>",
    TURN_END_ID: "<turn|>",
}

HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
GLOBAL_HEAD_DIM = 32
INTERMEDIATE = 128
MAX_POSITIONS = 4096
PER_LAYER_DIM = 16
ROPE_PARAMETERS = {
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}
SLIDING, FULL = "sliding_attention", "full_attention"
DRAFTER_LAYER_TYPES = (SLIDING, SLIDING, SLIDING, FULL)

# Ordered-embedding drafter (e2b): 16 clusters of 32 tokens, 4 clusters scored per step.
NUM_CENTROIDS = 16
CENTROID_TOP_K = 4

# Weight scales, tuned by measurement (see the module docstring).
EMBED_STD = 0.08  # token embedding rows (scaled by sqrt(64) on lookup)
CLUSTER_SIGNAL = 0.8  # share of an e2b embedding row that is its cluster's mean (centroid head hit rate)
SLIDING_GAIN = 0.05  # post-attention norm scale of the sliding producer (see _shape_target)
QUIET = 0.005  # post-norm scale of every target contribution the drafter cannot mirror
HIDDEN_MIX = 0.02  # weight of the target-hidden half of the drafter's pre_projection
LOGIT_GAIN = 4.0  # final-norm scale: logits of a few units, so softcapping and sampling matter
HEAD_NOISE = 0.3  # how far heads sharing a KV head stray from their group's query projection


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What distinguishes the three kinds; everything else is shared."""

    layer_types: tuple[str, ...]
    kv_heads: int
    global_kv_heads: int | None
    k_eq_v: bool
    per_layer_inputs: bool
    kv_shared_layers: int
    double_wide_mlp: bool
    moe: bool
    vision: bool
    audio: bool
    ordered_drafter: bool


# Layers 0-3 are [sliding, sliding, sliding, full] in every kind, so the producers (the last
# non-shared layer of each type) are layers 2 and 3 everywhere and drafter layer j mirrors target
# layer j. e2b adds two KV-shared layers (a sliding one and a full one) reading those producers.
_SPECS = {
    "e2b": _Spec(
        layer_types=(SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL),
        kv_heads=1,
        global_kv_heads=None,
        k_eq_v=False,
        per_layer_inputs=True,
        kv_shared_layers=2,
        double_wide_mlp=True,
        moe=False,
        vision=True,
        audio=True,
        ordered_drafter=True,
    ),
    "dense": _Spec(
        layer_types=(SLIDING, SLIDING, SLIDING, FULL),
        kv_heads=2,
        global_kv_heads=1,
        k_eq_v=True,
        per_layer_inputs=False,
        kv_shared_layers=0,
        double_wide_mlp=False,
        moe=False,
        vision=False,
        audio=False,
        ordered_drafter=False,
    ),
    "moe": _Spec(
        layer_types=(SLIDING, SLIDING, SLIDING, FULL),
        kv_heads=2,
        global_kv_heads=1,
        k_eq_v=True,
        per_layer_inputs=False,
        kv_shared_layers=0,
        double_wide_mlp=False,
        moe=True,
        vision=True,
        audio=False,
        ordered_drafter=False,
    ),
}


# --------------------------------------------------------------------------------------------
# Configs


def _text_config(spec: _Spec) -> Gemma4TextConfig:
    moe = {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}
    ple = {"hidden_size_per_layer_input": PER_LAYER_DIM, "vocab_size_per_layer_input": VOCAB_SIZE}
    return Gemma4TextConfig(
        **_shared_text_fields(spec),
        num_hidden_layers=len(spec.layer_types),
        layer_types=list(spec.layer_types),
        final_logit_softcapping=30.0,
        num_kv_shared_layers=spec.kv_shared_layers,
        use_double_wide_mlp=spec.double_wide_mlp,
        use_bidirectional_attention="vision" if spec.vision and not spec.audio else None,
        **(ple if spec.per_layer_inputs else {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}),
        **(moe if spec.moe else {}),
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _shared_text_fields(spec: _Spec) -> dict:
    """Fields the drafter must share with its target: it attends to the target's K/V."""
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": spec.kv_heads,
        "num_global_key_value_heads": spec.global_kv_heads,
        "head_dim": HEAD_DIM,
        "global_head_dim": GLOBAL_HEAD_DIM,
        "attention_k_eq_v": spec.k_eq_v,
        "sliding_window": SLIDING_WINDOW,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_parameters": json.loads(json.dumps(ROPE_PARAMETERS)),  # a fresh copy per config
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }


def _vision_config() -> Gemma4VisionConfig:
    # As small as the tower allows: one layer, 4x4 patches; clipped linears as in E2B.
    return Gemma4VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=8,
        patch_size=4,
        position_embedding_size=16,
        use_clipped_linears=True,
    )


def _audio_config() -> Gemma4AudioConfig:
    return Gemma4AudioConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        subsampling_conv_channels=[4, 4],
        output_proj_dims=16,
    )


def _target_config(spec: _Spec) -> Gemma4Config | Gemma4TextConfig:
    text = _text_config(spec)
    if not spec.vision:
        text.eos_token_id = list(STOP_IDS)
        return text
    return Gemma4Config(
        text_config=text,
        vision_config=_vision_config(),
        audio_config=_audio_config() if spec.audio else None,
        eos_token_id=list(STOP_IDS),
    )


def _drafter_config(spec: _Spec) -> Gemma4AssistantConfig:
    text = Gemma4TextConfig(
        **_shared_text_fields(spec),
        num_hidden_layers=len(DRAFTER_LAYER_TYPES),
        layer_types=list(DRAFTER_LAYER_TYPES),
        final_logit_softcapping=None,
        num_kv_shared_layers=len(DRAFTER_LAYER_TYPES),
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        use_double_wide_mlp=False,
        enable_moe_block=False,
    )
    return Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=HIDDEN,
        use_ordered_embeddings=spec.ordered_drafter,
        num_centroids=NUM_CENTROIDS,
        centroid_intermediate_top_k=CENTROID_TOP_K,
        tie_word_embeddings=True,
    )


# --------------------------------------------------------------------------------------------
# Weights


def _text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Gemma4TextModel inside a target (either class) or a drafter."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def _uniform(gen: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """A unit-scale random value for a text-stack tensor, by role."""
    if name.endswith("layer_scalar"):
        # Not 1, so a runtime that forgets it (it scales the whole residual) is caught.
        return _uniform(gen, shape, 0.5, 1.0)
    if name.endswith(("norm.weight", "router.scale", "per_expert_scale")) or "layernorm" in name:
        # Around 1, not exactly 1: Gemma 4 norms multiply by `weight` (not 1 + weight).
        return _uniform(gen, shape, 0.75, 1.25)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen) * EMBED_STD
    if name.endswith("embed_tokens_per_layer.weight"):
        return torch.randn(shape, generator=gen) / math.sqrt(PER_LAYER_DIM)  # scaled by sqrt(16) on lookup
    # Linear / expert weights (..., out, in): fan-in scaled so activations stay unit-scale.
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


@torch.no_grad()
def _randomize_text_stack(text_model: torch.nn.Module, gen: torch.Generator) -> None:
    tensors = dict(text_model.named_parameters())
    tensors.update((n, b) for n, b in text_model.named_buffers() if n.endswith("layer_scalar"))
    for name in sorted(tensors):
        tensors[name].copy_(_random_tensor(name, tensors[name].shape, gen))


def _cluster_ordering(gen: torch.Generator) -> torch.Tensor:
    """token_ordering: cluster c holds tokens ordering[c*32:(c+1)*32] (a permutation of the vocab)."""
    return torch.randperm(VOCAB_SIZE, generator=gen)


@torch.no_grad()
def _cluster_embeddings(embed: torch.Tensor, ordering: torch.Tensor, gen: torch.Generator) -> None:
    """Give each cluster of tokens a shared direction, so a centroid head can find the argmax."""
    means = torch.randn(NUM_CENTROIDS, HIDDEN, generator=gen) * EMBED_STD
    cluster_of = torch.empty(VOCAB_SIZE, dtype=torch.long)
    cluster_of[ordering] = torch.arange(VOCAB_SIZE) // (VOCAB_SIZE // NUM_CENTROIDS)
    noise = embed.clone()
    embed.copy_(CLUSTER_SIGNAL * means[cluster_of] + math.sqrt(1 - CLUSTER_SIGNAL**2) * noise)


@torch.no_grad()
def _shape_target(text_model: torch.nn.Module, spec: _Spec, gen: torch.Generator) -> None:
    """Make the target (nearly) a function the drafter can reproduce from K/V of positions < p.

    The drafter mirrors the target's layers 0-3; what it cannot see is the target's own K/V at
    position p and sliding positions p-8, p-9 (its sliding mask spans window + 1 entries), nor
    anything the target adds on top (per-layer inputs, experts, KV-shared layers). So: both
    producers ignore their own position, the sliding producer's attention is turned down (the
    window mismatch stays), and everything else is quiet. Gemma 4 post-norms renormalise their
    input, so the post-norm weights (not the projections) set how much a block adds.
    """
    producers = _producer_layers(spec)
    for idx, layer in enumerate(text_model.layers):
        if idx in producers:
            _exclude_self_attention(layer.self_attn, gen)
            if layer.self_attn.is_sliding:
                layer.post_attention_layernorm.weight.mul_(SLIDING_GAIN)
        else:
            layer.post_attention_layernorm.weight.mul_(QUIET)
            layer.post_feedforward_layernorm.weight.mul_(QUIET)
        if spec.per_layer_inputs:
            layer.post_per_layer_input_norm.weight.mul_(QUIET)
        if spec.moe:
            layer.post_feedforward_layernorm_2.weight.mul_(QUIET)
    text_model.norm.weight.mul_(LOGIT_GAIN)


@torch.no_grad()
def _exclude_self_attention(attn: torch.nn.Module, gen: torch.Generator) -> None:
    """K = -Q: each query scores its own key lowest, so the output at p ignores position p.

    Heads sharing a KV head get near-copies of one query projection, so that each of them finds
    its own key opposite.
    """
    q = attn.q_proj.weight.view(attn.config.num_attention_heads, attn.head_dim, -1)
    kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
    leaders = q[:: q.shape[0] // kv_heads].clone()
    noise = torch.randn(q.shape, generator=gen) * HEAD_NOISE / math.sqrt(q.shape[-1])
    q.copy_(leaders.repeat_interleave(q.shape[0] // kv_heads, dim=0) + noise)
    attn.k_proj.weight.copy_(-leaders.reshape(kv_heads * attn.head_dim, -1))


def _producer_layers(spec: _Spec) -> set[int]:
    """The last non-KV-shared layer of each type: the layers whose K/V the drafter reads."""
    own = spec.layer_types[: len(spec.layer_types) - spec.kv_shared_layers]
    return {max(i for i, t in enumerate(own) if t == kind) for kind in set(own)}


@torch.no_grad()
def _init_target(model: torch.nn.Module, spec: _Spec, seed: int) -> torch.Tensor | None:
    """Randomise the text stack; return the e2b token ordering its embeddings are clustered by."""
    gen = torch.Generator().manual_seed(seed)
    text = _text_model(model)
    _randomize_text_stack(text, gen)
    ordering = None
    if spec.ordered_drafter:
        ordering = _cluster_ordering(gen)
        _cluster_embeddings(text.embed_tokens.weight, ordering, gen)
    _shape_target(text, spec, gen)
    return ordering


@torch.no_grad()
def _make_agreeing(drafter: Gemma4AssistantForCausalLM, target: torch.nn.Module, ordering) -> None:
    """Turn the drafter into a copy of the target's first four layers, embedding and final norm."""
    src, dst = _text_model(target), drafter.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    for j, layer in enumerate(dst.layers):
        source = dict(src.layers[j].named_parameters())
        source.update(src.layers[j].named_buffers())
        for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])
        if "post_feedforward_layernorm_1.weight" in source:
            _fold_moe_norm(layer, source["post_feedforward_layernorm_1.weight"])
    # The drafter input is concat(scaled target embedding, target hidden): pass the embedding
    # through (the target's layer 0 sees the same vector) plus a little of the hidden state.
    eye = torch.eye(HIDDEN)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(HIDDEN, HIDDEN, generator=gen) * HIDDEN_MIX / math.sqrt(HIDDEN)
    drafter.pre_projection.weight.copy_(torch.cat([eye, mix], dim=1))
    drafter.post_projection.weight.copy_(eye)
    if drafter.masked_embedding is not None:
        _set_centroids(drafter, ordering)


@torch.no_grad()
def _fold_moe_norm(layer: torch.nn.Module, norm_1: torch.Tensor) -> None:
    """Fold the target's dense-MLP post-norm into the drafter layer's post-feedforward norm.

    An MoE target computes post_ff_norm(post_ff_norm_1(mlp) + quiet experts); a dense drafter
    layer computes post_ff_norm(mlp). RMS-normalising w1 * unit-RMS x is about w1 * x / rms(w1).
    """
    layer.post_feedforward_layernorm.weight.mul_(norm_1 / norm_1.pow(2).mean().sqrt())


@torch.no_grad()
def _set_centroids(drafter: Gemma4AssistantForCausalLM, ordering: torch.Tensor) -> None:
    """Centroid c = mean embedding of its tokens, so its score = the mean logit of the cluster."""
    members = drafter.model.embed_tokens.weight[ordering].view(NUM_CENTROIDS, -1, HIDDEN)
    drafter.masked_embedding.centroids.weight.copy_(members.mean(dim=1))
    drafter.masked_embedding.token_ordering.copy_(ordering)


@torch.no_grad()
def _init_random_drafter(drafter: Gemma4AssistantForCausalLM, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    _randomize_text_stack(drafter.model, gen)
    for proj in (drafter.pre_projection, drafter.post_projection):
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) / math.sqrt(proj.weight.shape[1]))
    if drafter.masked_embedding is not None:
        drafter.masked_embedding.centroids.weight.copy_(torch.randn(NUM_CENTROIDS, HIDDEN, generator=gen))
        drafter.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB_SIZE, generator=gen))


# --------------------------------------------------------------------------------------------
# Public API


def build_pair(kind: str, root: pathlib.Path, *, seed: int = 0, agreeing: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
    """Write root/f"{kind}-target" and root/f"{kind}-drafter"; return (target_dir, drafter_dir).

    The target depends only on ``kind`` and ``seed``; ``agreeing=False`` swaps in a drafter with
    plain random weights (same shapes, a valid token ordering).
    """
    spec = _SPECS[kind]
    root = pathlib.Path(root)
    target_dir, drafter_dir = root / f"{kind}-target", root / f"{kind}-drafter"
    # The towers keep transformers' own init, which draws from the global RNG: fork it so the
    # build is deterministic and leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target_cls = Gemma4ForConditionalGeneration if spec.vision else Gemma4ForCausalLM
        target = target_cls(_target_config(spec)).eval()
        ordering = _init_target(target, spec, seed)
        drafter = Gemma4AssistantForCausalLM(_drafter_config(spec)).eval()
        if agreeing:
            _make_agreeing(drafter, target, ordering)
        else:
            _init_random_drafter(drafter, seed + 1)
    _save(target, target_dir, _target_generation_config())
    _save(drafter, drafter_dir, _drafter_generation_config())
    return target_dir, drafter_dir


def load_hf_pair(target_dir, drafter_dir) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers models (eval mode, float32) loaded back from those dirs.

    The target comes back as the class it was saved as, the drafter as Gemma4AssistantForCausalLM;
    any missing, unexpected or mismatched key is an error.
    """
    arch = json.loads((pathlib.Path(target_dir) / "config.json").read_text())["architectures"][0]
    target = _load_strict(getattr(transformers, arch), target_dir)
    drafter = _load_strict(Gemma4AssistantForCausalLM, drafter_dir)
    return target, drafter


def build_tokenizer(out_dir: pathlib.Path) -> None:
    """Write a tiny tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) into out_dir.

    A SentencePiece-style BPE like Gemma's (spaces as "▁", BOS prepended by the post-processor)
    with exactly VOCAB_SIZE entries; the special tokens sit at their Gemma 4 ids and every other
    id is a printable piece, so decoding any id in 4..511 gives text.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(SPECIAL_TOKENS[i], special=True, normalized=False) for i in sorted(SPECIAL_TOKENS)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------
# Saving and loading


def _target_generation_config() -> GenerationConfig:
    return GenerationConfig(bos_token_id=BOS_ID, pad_token_id=PAD_ID, eos_token_id=list(STOP_IDS))


def _drafter_generation_config() -> GenerationConfig:
    # As reported for Google's assistants: 6 drafts per round, never adapted.
    return GenerationConfig(
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
        eos_token_id=list(STOP_IDS),
        num_assistant_tokens=6,
        num_assistant_tokens_schedule="constant",
    )


def _save(model: torch.nn.Module, out_dir: pathlib.Path, generation_config: GenerationConfig) -> None:
    model.generation_config = generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(out_dir)


def _load_strict(cls, path) -> torch.nn.Module:
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise RuntimeError(f"{cls.__name__} from {path}: {problems}")
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "<|turn>{{ role }}\n{{ message['content'] }}<turn|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model\n{%- endif -%}"
)

_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "padding_side": "left",
    "model_max_length": MAX_POSITIONS,
}

# Pieces are built left to right from these words ("▁t", "▁th", "▁the", ...) until the vocabulary
# is full, so common words encode to one token and anything else falls back to characters.
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who its now find long down day did get "
    "come made may part model user system hello world token turn draft target gemma tiny test "
    "over new sound only little work know place year live me back give most very after thing our just name "
    "good sentence man think say great where help through much before line right too mean old any same tell "
    "boy follow came want show also around form three small set put end does another well large must big even "
    "such because turn here why ask went men read need land different home us move try kind hand picture again "
    "change off play spell air away animal house point page letter mother answer found study still learn should"
).split()


def _bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    free_ids = iter(i for i in range(VOCAB_SIZE) if i not in SPECIAL_TOKENS)
    vocab = {text: i for i, text in SPECIAL_TOKENS.items()}
    merges: list[tuple[str, str]] = []
    for char in ["▁", "\n"] + [chr(c) for c in range(33, 127)]:
        vocab[char] = next(free_ids)
    for word in _WORDS:
        piece = "▁"
        for char in word:
            if len(vocab) == VOCAB_SIZE:
                return vocab, merges
            if piece + char not in vocab:
                vocab[piece + char] = next(free_ids)
                merges.append((piece, char))
            piece += char
    raise AssertionError(f"word list too short: {len(vocab)} < {VOCAB_SIZE} tokens")


# --------------------------------------------------------------------------------------------
# Measuring agreement (run this module as a script)


def _random_prompt(length: int, seed: int) -> torch.Tensor:
    """BOS + ordinary tokens (no special ids), shape (1, length)."""
    ordinary = torch.tensor([i for i in range(VOCAB_SIZE) if i not in SPECIAL_TOKENS])
    picks = torch.randint(len(ordinary), (length - 1,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([BOS_ID]), ordinary[picks]])[None]


@torch.no_grad()
def first_draft_agreement(target, drafter, input_ids: torch.Tensor) -> float:
    """Share of positions p where the drafter's first draft equals the target's greedy token.

    The drafter step is driven as transformers' MTP generator drives it: input
    concat(target_embed(token_p), target_hidden[p - 1]), position p, the target's shared K/V of
    positions < p.
    """
    out = target(input_ids=input_ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    greedy, hidden, shared = out.logits.argmax(-1), out.hidden_states[-1], out.shared_kv_states
    embed = target.get_input_embeddings()
    hits = []
    for p in range(1, input_ids.shape[1]):
        inputs = torch.cat([embed(input_ids[:, p : p + 1]), hidden[:, p - 1 : p]], dim=-1)
        kv = {t: (k[:, :, :p], v[:, :, :p]) for t, (k, v) in shared.items()}
        logits = drafter(inputs_embeds=inputs, position_ids=torch.tensor([[p]]), shared_kv_states=kv).logits
        hits.append(bool(logits[0, -1].argmax() == greedy[0, p]))
    return sum(hits) / len(hits)


@torch.no_grad()
def generate_acceptance(target, drafter, input_ids: torch.Tensor, *, drafts: int = 3, new_tokens: int = 40):
    """(accepted / drafted, assisted tokens == plain greedy tokens) for one assisted greedy run."""
    calls = {"target": 0, "drafter": 0}
    hooks = [
        m.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        for key, m in (("target", target), ("drafter", drafter))
    ]
    drafter.generation_config.num_assistant_tokens = drafts
    kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "attention_mask": torch.ones_like(input_ids)}
    try:
        assisted = target.generate(input_ids, assistant_model=drafter, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    plain = target.generate(input_ids, **kwargs)
    # Every target pass yields one token of its own plus the drafts it accepted.
    accepted = assisted.shape[1] - input_ids.shape[1] - calls["target"]
    return accepted / max(calls["drafter"], 1), torch.equal(assisted, plain)


def _greedy_summary(target, input_ids: torch.Tensor, new_tokens: int = 40) -> tuple[int, int]:
    """(distinct tokens, shortest period) of a greedy continuation: a degenerate model repeats."""
    out = target.generate(input_ids, do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                          attention_mask=torch.ones_like(input_ids))[0, input_ids.shape[1] :].tolist()
    period = next(p for p in range(1, len(out) + 1) if out[p:] == out[:-p] or p == len(out))
    return len(set(out)), period


def measure(kind: str, *, seed: int = 0, prompt_seeds=(0, 1, 2), prompt_len: int = 40) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        target, drafter = load_hf_pair(*build_pair(kind, pathlib.Path(tmp), seed=seed))
    prompts = [_random_prompt(prompt_len, s) for s in prompt_seeds]
    first = [first_draft_agreement(target, drafter, ids) for ids in prompts]
    runs = [generate_acceptance(target, drafter, ids) for ids in prompts]
    return {
        "first_draft": sum(first) / len(first),
        "generate_acceptance": sum(r[0] for r in runs) / len(runs),
        "generate_equals_greedy": all(r[1] for r in runs),
        "greedy_distinct_period": [_greedy_summary(target, ids) for ids in prompts],
    }


if __name__ == "__main__":
    import time

    for kind in KINDS:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            build_pair(kind, pathlib.Path(tmp))
        built = time.perf_counter() - start
        print(kind, f"build {built:.2f}s", measure(kind), flush=True)
