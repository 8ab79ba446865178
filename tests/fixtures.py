"""Tiny random-weight Gemma 4 targets and MTP drafters, saved in the real on-disk layout.

Built with transformers 5.17.0 in float32 and written with ``save_pretrained`` (safetensors), so the
tests of the MLX runtime read exactly what transformers writes. Three kinds mirror the Gemma 4
family:

- ``"e2b"``: ``Gemma4ForConditionalGeneration`` with tiny vision and audio towers, per-layer inputs
  (PLE), two KV-shared layers with a double-wide MLP; drafter with ordered embeddings (centroid head).
- ``"dense"``: text-only ``Gemma4ForCausalLM`` with ``attention_k_eq_v`` (no ``v_proj`` on the full
  layer) and fewer global KV heads; dense-head drafter.
- ``"moe"``: ``Gemma4ForConditionalGeneration`` (vision tower, no audio) with MoE blocks and K=V;
  dense-head drafter.

and a fourth, not in ``KINDS`` (its tests build it on their own):

- ``"unified"``: the 12B, ``Gemma4UnifiedForConditionalGeneration`` (encoder-free vision and
  audio embedders, no towers), a full layer every 6th, K=V, no per-layer inputs or KV sharing;
  ``Gemma4UnifiedAssistantForCausalLM`` drafter, dense head.

Agreeing drafters (``agreeing=True``) copy the target's last four layers up to its K/V producers
(layers 0-3; unified 2-5), embedding and final norm; the target is shaped so that what the drafter
cannot see matters little (see ``_shape_target``).
Measured with ``python tests/fixtures.py`` (fixture seeds 0-2, four random 40-token prompts each,
transformers 5.17.0, CPU):

    kind    first draft (mean / worst prompt)   generate: 1st draft ok / all drafts ok   distinct
    e2b     0.71 / 0.59                         0.70 / 0.45                              27.5 / 13
    dense   0.78 / 0.64                         0.70 / 0.43                              29.9 / 23
    moe     0.72 / 0.56                         0.67 / 0.42                              31.1 / 25
    unified 0.76 / 0.67                         0.78 / 0.51                              26.0 / 8

"first draft": at every prompt position p, the drafter's first draft (given token p, the target's
hidden state at p - 1 and its K/V of positions < p) equals the target's greedy token.
"generate": ``target.generate(ids, assistant_model=drafter, do_sample=False, max_new_tokens=40)``
with 3 drafts per round: share of rounds whose first draft is accepted, and accepted / drafted
tokens; every round count 0-3 occurs often, and the output equals plain greedy ``generate`` in
every run. "distinct": distinct tokens in a 40-token greedy continuation (mean / worst prompt).
A random drafter (``agreeing=False``) has its drafts accepted about never.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import tempfile
from unittest import mock

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedAudioConfig,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedTextConfig,
    Gemma4UnifiedVisionConfig,
    Gemma4VisionConfig,
    GenerationConfig,
)
from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

KINDS = ("e2b", "dense", "moe")
VOCAB_SIZE = 512
SLIDING_WINDOW = 8
STOP_IDS = (1, 106)

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<|turn>", 106: "<turn|>"}

HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
GLOBAL_HEAD_DIM = 32
INTERMEDIATE = 128
MAX_POSITIONS = 4096
PER_LAYER_DIM = 16
SLIDING, FULL = "sliding_attention", "full_attention"
ROPE_PARAMETERS = {
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
}
DRAFTER_LAYER_TYPES = (SLIDING, SLIDING, SLIDING, FULL)
NUM_CENTROIDS = 16  # 32 tokens per cluster
CENTROID_TOP_K = 4

# Weight scales, tuned by measuring first-draft agreement against greedy variety.
EMBED_STD = 0.08  # token embedding rows (times sqrt(64) on lookup)
CLUSTER_SIGNAL = 0.8  # share of an e2b embedding row that is its cluster's direction
SLIDING_GAIN = 0.025  # post-attention norm scale of the sliding producer
QUIET = 0.005  # post-norm scale of every other target contribution the drafter lacks
SHARED_GAIN = 0.02  # the same for the KV-shared layers (after the producers, so less sensitive)
# layer_scalar range: small scalars shrink the embedding's share of the final residual, which
# otherwise makes tokens predict themselves (tied embeddings) and greedy text loop.
SCALAR_LOW, SCALAR_HIGH = 0.3, 0.7
LOGIT_GAIN = 4.0  # final-norm scale: logits of a few units, so softcapping and sampling matter
HIDDEN_MIX = 0.003  # weight of the target-hidden half of pre_projection (that hidden has RMS ~ LOGIT_GAIN)
ROTARY_GAIN = 0.3  # q_norm scale of the full producer's rotated dims
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
    bidirectional: str | None
    ordered_drafter: bool
    unified: bool = False  # the 12B's classes (Gemma4Unified*)
    mirrored_from: int = 0  # drafter layer j mirrors target layer mirrored_from + j


# Layers 0-3 are [sliding, sliding, sliding, full] in every kind but unified, so the producers
# (the last non-shared layer of each type) are layers 2 and 3 and drafter layer j mirrors target
# layer j. e2b adds two KV-shared layers, one of each type, reading those producers. unified has
# the 12B's period (five sliding layers, then a full one): producers 4 and 5, mirrored from 2.
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
        bidirectional=None,
        ordered_drafter=True,
    ),
    "dense": _Spec(
        layer_types=DRAFTER_LAYER_TYPES,
        kv_heads=2,
        global_kv_heads=1,
        k_eq_v=True,
        per_layer_inputs=False,
        kv_shared_layers=0,
        double_wide_mlp=False,
        moe=False,
        vision=False,
        audio=False,
        bidirectional=None,
        ordered_drafter=False,
    ),
    "moe": _Spec(
        layer_types=DRAFTER_LAYER_TYPES,
        kv_heads=2,
        global_kv_heads=1,
        k_eq_v=True,
        per_layer_inputs=False,
        kv_shared_layers=0,
        double_wide_mlp=False,
        moe=True,
        vision=True,
        audio=False,
        bidirectional="vision",
        ordered_drafter=False,
    ),
    "unified": _Spec(
        layer_types=(SLIDING,) * 5 + (FULL,),
        kv_heads=2,
        global_kv_heads=1,
        k_eq_v=True,
        per_layer_inputs=False,
        kv_shared_layers=0,
        double_wide_mlp=False,
        moe=False,
        vision=True,
        audio=True,
        bidirectional="vision",
        ordered_drafter=False,
        unified=True,
        mirrored_from=2,
    ),
}


# --------------------------------------------------------------------------------------------
# Public API


def build_pair(
    kind: str, root: pathlib.Path, *, seed: int = 0, agreeing: bool = True
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write root/f"{kind}-target" and root/f"{kind}-drafter"; return (target_dir, drafter_dir).

    The target depends only on ``kind`` and ``seed``; ``agreeing=False`` pairs it with a drafter
    of plain random weights (same shapes, a valid token ordering).
    """
    spec = _SPECS[kind]
    root = pathlib.Path(root)
    target_dir, drafter_dir = root / f"{kind}-target", root / f"{kind}-drafter"
    # The towers keep transformers' own init, which draws from the global RNG: fork it so the
    # build is deterministic and leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.unified:
            target_cls, drafter_cls = Gemma4UnifiedForConditionalGeneration, Gemma4UnifiedAssistantForCausalLM
        else:
            target_cls = Gemma4ForConditionalGeneration if spec.vision else Gemma4ForCausalLM
            drafter_cls = Gemma4AssistantForCausalLM
        target = target_cls(_target_config(spec)).eval()
        ordering = _init_target(target, spec, seed)
        drafter = drafter_cls(_drafter_config(spec)).eval()
        if agreeing:
            _make_agreeing(drafter, target, ordering, seed + 1, spec.mirrored_from)
        else:
            _init_random_drafter(drafter, seed + 1)
    _save(target, target_dir, _target_generation_config())
    _save(drafter, drafter_dir, _drafter_generation_config())
    return target_dir, drafter_dir


def load_hf_pair(target_dir, drafter_dir) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers models (eval mode, float32) loaded back from those dirs.

    Each comes back as the class it was saved as. A missing, unexpected or mismatched key raises.
    """

    def saved(path) -> torch.nn.Module:
        arch = json.loads((pathlib.Path(path) / "config.json").read_text())["architectures"][0]
        return _load_strict(getattr(transformers, arch), path)

    return saved(target_dir), saved(drafter_dir)


def build_tokenizer(
    out_dir: pathlib.Path, *, special_tokens: dict[int, str] | None = None, chat_template: str | None = None
) -> None:
    """Write a tiny tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) into out_dir.

    A SentencePiece-style BPE like Gemma's (spaces become "▁", the post-processor prepends <bos>)
    with exactly VOCAB_SIZE entries: the special tokens sit at their Gemma 4 ids and every other
    id is a printable piece, so decoding any other id gives text. (`special_tokens` may add more of
    Gemma 4's, with a template that uses them.)
    """
    special_tokens = SPECIAL_TOKENS if special_tokens is None else special_tokens
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe_vocab(special_tokens)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Gemma's decoder; mlx-lm recognises it and streams with its SPM detokenizer.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens.values()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE if chat_template is None else chat_template)


def use_hub_config_spelling(model_dir: pathlib.Path) -> None:
    """Rewrite a saved config.json the way Google's checkpoints spell it.

    transformers 5.17 saves the full-attention overrides as ``per_layer_config`` ({"3": {"head_dim":
    32, ...}}); the Hub configs carry ``global_head_dim`` and ``num_global_key_value_heads``
    instead. Both load in transformers; a runtime must read both.
    """
    path = pathlib.Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config", config)
    overrides = text.pop("per_layer_config")
    full = [overrides[str(i)] for i, kind in enumerate(text["layer_types"]) if kind == FULL]
    text["global_head_dim"] = full[0]["head_dim"]
    text["num_global_key_value_heads"] = full[0].get("num_key_value_heads")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def add_shared_layer_kv(target_dir: pathlib.Path, *, seed: int = 0) -> None:
    """Add k_proj/v_proj tensors to the KV-shared layers (e2b), as Google's E2B file has them.

    transformers neither creates nor saves them and ignores them on load; a runtime must too.
    Call it before ``use_hub_config_spelling``.
    """
    path = pathlib.Path(target_dir) / "model.safetensors"
    text = json.loads((path.parent / "config.json").read_text())["text_config"]
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for idx in range(text["num_hidden_layers"] - text["num_kv_shared_layers"], text["num_hidden_layers"]):
        head_dim = text["per_layer_config"].get(str(idx), {}).get("head_dim", text["head_dim"])
        for name in ("k_proj", "v_proj"):
            shape = (text["num_key_value_heads"] * head_dim, text["hidden_size"])
            key = f"model.language_model.layers.{idx}.self_attn.{name}.weight"
            tensors[key] = torch.randn(shape, generator=gen)
    save_file(tensors, str(path), metadata=metadata)


# --------------------------------------------------------------------------------------------
# Configs


def _shared_text_fields(spec: _Spec) -> dict:
    """Text-config fields a drafter shares with its target (it attends to the target's K/V)."""
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


def _text_config(spec: _Spec) -> Gemma4TextConfig:
    if spec.unified:
        return _unified_text_config(spec, spec.layer_types, 30.0, kv_shared=0)
    per_layer = PER_LAYER_DIM if spec.per_layer_inputs else 0
    moe = {"num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32} if spec.moe else {}
    return Gemma4TextConfig(
        **_shared_text_fields(spec),
        **moe,
        num_hidden_layers=len(spec.layer_types),
        layer_types=list(spec.layer_types),
        final_logit_softcapping=30.0,
        hidden_size_per_layer_input=per_layer,
        vocab_size_per_layer_input=VOCAB_SIZE if per_layer else 0,
        num_kv_shared_layers=spec.kv_shared_layers,
        use_double_wide_mlp=spec.double_wide_mlp,
        enable_moe_block=spec.moe,
        use_bidirectional_attention=spec.bidirectional,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _unified_text_config(spec: _Spec, layer_types, softcapping, kv_shared) -> Gemma4UnifiedTextConfig:
    # transformers' unified text config has no per-layer-input or MoE fields at all.
    return Gemma4UnifiedTextConfig(
        **_shared_text_fields(spec),
        final_logit_softcapping=softcapping,
        num_kv_shared_layers=kv_shared,
        num_hidden_layers=len(layer_types),
        layer_types=list(layer_types),
        use_double_wide_mlp=False,
        use_bidirectional_attention=spec.bidirectional,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _unified_target_config(spec: _Spec) -> Gemma4UnifiedConfig:
    # The encoder-free embedders, small: 8x8-pixel model patches (4x4 merged 2x2), 8-sample audio frames.
    vision = Gemma4UnifiedVisionConfig(
        patch_size=4, pooling_kernel_size=2, mm_embed_dim=16, mm_posemb_size=16, output_proj_dims=HIDDEN
    )
    return Gemma4UnifiedConfig(
        text_config=_text_config(spec),
        vision_config=vision,
        audio_config=Gemma4UnifiedAudioConfig(audio_embed_dim=8),
        eos_token_id=list(STOP_IDS),
    )


def _vision_config() -> Gemma4VisionConfig:
    # As small as the tower allows: one layer, 4x4 patches, clipped linears as in E2B.
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


def _target_config(spec: _Spec) -> Gemma4Config | Gemma4TextConfig | Gemma4UnifiedConfig:
    if spec.unified:
        return _unified_target_config(spec)
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


def _drafter_config(spec: _Spec) -> Gemma4AssistantConfig | Gemma4UnifiedAssistantConfig:
    if spec.unified:
        text = _unified_text_config(spec, DRAFTER_LAYER_TYPES, None, kv_shared=len(DRAFTER_LAYER_TYPES))
        return Gemma4UnifiedAssistantConfig(
            text_config=text,
            backbone_hidden_size=HIDDEN,
            num_centroids=NUM_CENTROIDS,
            centroid_intermediate_top_k=CENTROID_TOP_K,
        )
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
# Target weights


def _text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Gemma4TextModel inside a target (either class) or a drafter."""
    return getattr(model.model, "language_model", model.model)


def _producer_layers(spec: _Spec) -> set[int]:
    """The last non-KV-shared layer of each type: the layers whose K/V the drafter reads."""
    own = spec.layer_types[: len(spec.layer_types) - spec.kv_shared_layers]
    return {max(i for i, t in enumerate(own) if t == kind) for kind in set(own)}


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """A random value for a text-stack tensor, scaled by its role."""
    if name.endswith("layer_scalar"):
        # Not 1: it scales the whole residual stream, so a runtime that drops it is caught.
        return SCALAR_LOW + (SCALAR_HIGH - SCALAR_LOW) * torch.rand(shape, generator=gen)
    if name.endswith(("norm.weight", "router.scale", "per_expert_scale")) or "layernorm" in name:
        # Around 1 but not 1: Gemma 4 norms multiply by `weight` (not 1 + weight).
        return 0.75 + 0.5 * torch.rand(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen) * EMBED_STD
    if name.endswith("embed_tokens_per_layer.weight"):
        return torch.randn(shape, generator=gen) / math.sqrt(PER_LAYER_DIM)  # times sqrt(16) on lookup
    # Linear and expert weights (..., out, in): fan-in scaled, so activations stay unit-scale.
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


@torch.no_grad()
def _randomize_text_stack(text_model: torch.nn.Module, gen: torch.Generator) -> None:
    tensors = dict(text_model.named_parameters())
    tensors.update((n, b) for n, b in text_model.named_buffers() if n.endswith("layer_scalar"))
    for name in sorted(tensors):
        tensors[name].copy_(_random_tensor(name, tensors[name].shape, gen))


@torch.no_grad()
def _init_target(model: torch.nn.Module, spec: _Spec, seed: int) -> torch.Tensor | None:
    """Randomise and shape the text stack; return the e2b token ordering (None otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    text = _text_model(model)
    _randomize_text_stack(text, gen)
    ordering = None
    if spec.ordered_drafter:
        ordering = torch.randperm(VOCAB_SIZE, generator=gen)
        _cluster_embeddings(text.embed_tokens.weight, ordering, gen)
    _shape_target(text, spec, gen)
    return ordering


@torch.no_grad()
def _cluster_embeddings(embed: torch.Tensor, ordering: torch.Tensor, gen: torch.Generator) -> None:
    """Give the tokens of each cluster (ordering.view(16, 32)[c]) a shared direction.

    The centroid head scores clusters, then tokens inside the best few; with clustered
    embeddings the target's greedy token usually lies in a top-scored cluster.
    """
    directions = torch.randn(NUM_CENTROIDS, HIDDEN, generator=gen) * EMBED_STD
    cluster_of = torch.empty(VOCAB_SIZE, dtype=torch.long)
    cluster_of[ordering] = torch.arange(VOCAB_SIZE) // (VOCAB_SIZE // NUM_CENTROIDS)
    embed.mul_(math.sqrt(1 - CLUSTER_SIGNAL**2)).add_(CLUSTER_SIGNAL * directions[cluster_of])


@torch.no_grad()
def _shape_target(text_model: torch.nn.Module, spec: _Spec, gen: torch.Generator) -> None:
    """Make the target (nearly) a function its drafter can compute.

    The drafter mirrors the target's layers 0-3 (unified: 2-5) but, at position p, reads the
    producers' K/V of positions < p only: it lacks the target's own key at p, and its sliding mask
    spans window + 1 entries (p-9..p-1 where the target sees p-7..p). It has no per-layer inputs,
    experts, KV-shared layers or (unified) the layers before those it mirrors. So both producers
    ignore their own position, the sliding producer's attention (window mismatch) is turned
    down, and every other contribution is quiet. Gemma 4
    post-norms renormalise their input, so post-norm weights, not projections, set how much a
    block adds to the residual stream. Drafts after the first embed a token one position past
    the drafter's fixed position id, so the full producer's rotated query dims are turned down
    too (its attention then depends less on the position).
    """
    producers = _producer_layers(spec)
    for idx, layer in enumerate(text_model.layers):
        if idx < spec.mirrored_from:
            # A layer the drafter has no copy of: quiet, and the residual stream keeps its scale, so
            # the mirrored layers see the balance of residual and branches the other kinds have.
            layer.layer_scalar.fill_(1.0)
        if idx in producers:
            _exclude_self_attention(layer.self_attn, gen)
            if layer.self_attn.is_sliding:
                layer.post_attention_layernorm.weight.mul_(SLIDING_GAIN)
            else:
                layer.self_attn.q_norm.weight[_rotated_dims(layer.self_attn.head_dim)] *= ROTARY_GAIN
        else:
            gain = SHARED_GAIN if layer.self_attn.is_kv_shared_layer else QUIET
            layer.post_attention_layernorm.weight.mul_(gain)
            layer.post_feedforward_layernorm.weight.mul_(gain)
        if spec.per_layer_inputs:
            layer.post_per_layer_input_norm.weight.mul_(QUIET)
        if spec.moe:
            layer.post_feedforward_layernorm_2.weight.mul_(QUIET)
    text_model.norm.weight.mul_(LOGIT_GAIN)


def _rotated_dims(head_dim: int) -> list[int]:
    """Dims that proportional RoPE rotates: the first rope_angles of each half of the head."""
    angles = int(ROPE_PARAMETERS[FULL]["partial_rotary_factor"] * head_dim // 2)
    return [half + i for half in (0, head_dim // 2) for i in range(angles)]


@torch.no_grad()
def _exclude_self_attention(attn: torch.nn.Module, gen: torch.Generator) -> None:
    """K = -Q: every query scores its own key lowest, so the output at p ignores position p.

    Heads sharing a KV head get near-copies of one query projection, so that each of them finds
    its own key opposite. Attention stays sharp and content-driven over the other positions.
    """
    q = attn.q_proj.weight.view(attn.config.num_attention_heads, attn.head_dim, -1)
    group = q.shape[0] // (attn.k_proj.weight.shape[0] // attn.head_dim)
    leaders = q[::group].clone()
    noise = torch.randn(q.shape, generator=gen) * HEAD_NOISE / math.sqrt(q.shape[-1])
    q.copy_(leaders.repeat_interleave(group, dim=0) + noise)
    attn.k_proj.weight.copy_(-leaders.flatten(0, 1))


# --------------------------------------------------------------------------------------------
# Drafter weights


@torch.no_grad()
def _make_agreeing(drafter, target: torch.nn.Module, ordering, seed: int, first: int) -> None:
    """Make the drafter a copy of the target's layers first..first + 3, embedding and final norm."""
    src, dst = _text_model(target), drafter.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    for j, layer in enumerate(dst.layers):
        mirrored = src.layers[first + j]
        source = dict(mirrored.named_parameters()) | dict(mirrored.named_buffers())
        for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])
        if "post_feedforward_layernorm_1.weight" in source:
            _fold_moe_norm(layer, source["post_feedforward_layernorm_1.weight"])
    # The drafter's input is concat(scaled target embedding, target hidden state): pass the
    # embedding through (the target's layer `first` sees about the same vector) plus a little of
    # the hidden state, so that feeding the wrong hidden state still shows in the drafter's logits.
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(HIDDEN, HIDDEN, generator=gen) * HIDDEN_MIX / math.sqrt(HIDDEN)
    drafter.pre_projection.weight.copy_(torch.cat([torch.eye(HIDDEN), mix], dim=1))
    drafter.post_projection.weight.copy_(torch.eye(HIDDEN))
    if drafter.masked_embedding is not None:
        _set_centroids(drafter, ordering)


@torch.no_grad()
def _fold_moe_norm(layer: torch.nn.Module, norm_1: torch.Tensor) -> None:
    """Fold an MoE target's dense-MLP post-norm into the drafter layer's post-feedforward norm.

    The target computes post_ff_norm(post_ff_norm_1(mlp) + quiet experts), the dense drafter
    post_ff_norm(mlp); RMS-normalising w1 * (unit-RMS x) gives about w1 * x / rms(w1).
    """
    layer.post_feedforward_layernorm.weight.mul_(norm_1 / norm_1.pow(2).mean().sqrt())


@torch.no_grad()
def _set_centroids(drafter: Gemma4AssistantForCausalLM, ordering: torch.Tensor) -> None:
    """Centroid c = the mean embedding of its tokens, so it scores a cluster by its mean logit."""
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
# Saving and loading


def _target_generation_config() -> GenerationConfig:
    return GenerationConfig(bos_token_id=BOS_ID, pad_token_id=PAD_ID, eos_token_id=list(STOP_IDS))


def _drafter_generation_config() -> GenerationConfig:
    # As reported (one secondary source) for Google's assistants: 6 drafts per round, never adapted.
    return GenerationConfig(
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
        eos_token_id=list(STOP_IDS),
        num_assistant_tokens=6,
        num_assistant_tokens_schedule="constant",
    )


def _save(model: torch.nn.Module, out_dir: pathlib.Path, generation_config: GenerationConfig) -> None:
    model.generation_config = generation_config
    model.save_pretrained(out_dir)
    build_tokenizer(out_dir)


def _load_strict(cls, path) -> torch.nn.Module:
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise RuntimeError(f"{cls.__name__} from {path}: {problems}")
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer

# Gemma 4's turn format; "assistant" turns are "model" turns.
CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' -}}
{{- message['content'] + '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\n' -}}
{%- endif -%}
"""

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

# Pieces grow left to right from these words ("▁t", "▁th", "▁the", ...) until the vocabulary is
# full, so common words encode to one token and anything else falls back to single characters.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "model",
    "user",
    "system",
    "hello",
    "world",
    "token",
    "turn",
    "draft",
    "target",
    "gemma",
    "tiny",
    "test",
    "over",
    "new",
    "sound",
    "only",
    "little",
    "work",
    "know",
    "place",
    "year",
    "live",
    "me",
    "back",
    "give",
    "most",
    "very",
    "after",
    "thing",
    "our",
    "just",
    "name",
    "good",
    "sentence",
    "man",
    "think",
    "say",
    "great",
    "where",
    "help",
    "through",
    "much",
    "before",
    "line",
    "right",
    "too",
    "mean",
    "old",
    "any",
    "same",
    "tell",
    "boy",
    "follow",
    "came",
    "want",
    "show",
    "also",
    "around",
    "form",
    "three",
    "small",
    "set",
    "put",
    "end",
    "does",
    "another",
    "well",
    "large",
    "must",
    "big",
    "such",
    "because",
    "here",
    "why",
    "ask",
    "went",
    "men",
    "read",
    "need",
    "land",
    "different",
    "home",
    "us",
    "move",
    "try",
    "kind",
    "hand",
    "picture",
    "again",
]


def _bpe_vocab(special_tokens: dict[int, str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    free_ids = iter(i for i in range(VOCAB_SIZE) if i not in special_tokens)
    vocab = {text: i for i, text in special_tokens.items()}
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
# Measuring agreement (python tests/fixtures.py)


def random_prompt(length: int, seed: int) -> torch.Tensor:
    """<bos> then ordinary (non-special) tokens, shape (1, length)."""
    ordinary = torch.tensor([i for i in range(VOCAB_SIZE) if i not in SPECIAL_TOKENS])
    picks = torch.randint(len(ordinary), (length - 1,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([BOS_ID]), ordinary[picks]])[None]


@torch.no_grad()
def first_draft_agreement(target, drafter, input_ids: torch.Tensor) -> float:
    """Share of positions p >= 1 where the drafter's first draft equals the target's greedy token.

    The drafter step is driven as transformers' MTP generator drives it: inputs_embeds =
    concat(target_embed(token_p), target_hidden[p - 1]), position p, the target's shared K/V of
    positions < p.
    """
    out = target(
        input_ids=input_ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=False
    )
    greedy, hidden, shared = out.logits.argmax(-1), out.hidden_states[-1], out.shared_kv_states
    embed = target.get_input_embeddings()
    hits = []
    for p in range(1, input_ids.shape[1]):
        inputs = torch.cat([embed(input_ids[:, p : p + 1]), hidden[:, p - 1 : p]], dim=-1)
        kv = {kind: (k[:, :, :p], v[:, :, :p]) for kind, (k, v) in shared.items()}
        logits = drafter(inputs_embeds=inputs, position_ids=torch.tensor([[p]]), shared_kv_states=kv).logits
        hits.append(bool(logits[0, -1].argmax() == greedy[0, p]))
    return sum(hits) / len(hits)


@torch.no_grad()
def generate_acceptance(
    target, drafter, input_ids: torch.Tensor, *, drafts: int = 3, new_tokens: int = 40
) -> dict:
    """Acceptance in one greedy ``generate(assistant_model=drafter)`` run, and whether its tokens
    equal plain greedy ``generate``.

    Reads every verify round's (drafted, accepted) from the MTP generator's strategy update, which
    transformers calls once per round (a no-op for the "constant" schedule).
    """
    mtp = SinglePositionMultiTokenCandidateGenerator
    kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "attention_mask": torch.ones_like(input_ids)}
    original = mtp.update_candidate_strategy
    with (
        mock.patch.object(drafter.generation_config, "num_assistant_tokens", drafts),
        mock.patch.object(mtp, "update_candidate_strategy", autospec=True, side_effect=original) as update,
    ):
        assisted = target.generate(input_ids, assistant_model=drafter, **kwargs)
    # args: (generator, input_ids, verify logits of shape (1, drafted + 1, vocab), accepted)
    rounds = [(c.args[2].shape[1] - 1, int(c.args[3])) for c in update.call_args_list]
    rounds = [(drafted, accepted) for drafted, accepted in rounds if drafted]
    return {
        "acceptance": sum(a for _, a in rounds) / max(sum(d for d, _ in rounds), 1),
        "first_draft_accepted": sum(a > 0 for _, a in rounds) / max(len(rounds), 1),
        "equals_greedy": torch.equal(assisted, target.generate(input_ids, **kwargs)),
    }


@torch.no_grad()
def greedy_distinct(target, input_ids: torch.Tensor, new_tokens: int = 40) -> int:
    """Distinct tokens in a greedy continuation that ignores stop tokens: a degenerate model repeats."""
    out = target.generate(
        input_ids,
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        attention_mask=torch.ones_like(input_ids),
    )
    return len(set(out[0, input_ids.shape[1] :].tolist()))


def measure(kind: str, *, seeds=(0, 1, 2), prompts: int = 4, prompt_len: int = 40) -> dict:
    """The numbers in the module docstring, for one kind."""
    first, runs, distinct = [], [], []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            target, drafter = load_hf_pair(*build_pair(kind, pathlib.Path(tmp), seed=seed))
        for index in range(prompts):
            ids = random_prompt(prompt_len, 100 * seed + index)
            first.append(first_draft_agreement(target, drafter, ids))
            runs.append(generate_acceptance(target, drafter, ids))
            distinct.append(greedy_distinct(target, ids))
    return {
        "first_draft": (round(statistics.mean(first), 2), round(min(first), 2)),
        "generate_first_draft": round(statistics.mean(r["first_draft_accepted"] for r in runs), 2),
        "generate_acceptance": round(statistics.mean(r["acceptance"] for r in runs), 2),
        "generate_equals_greedy": all(r["equals_greedy"] for r in runs),
        "distinct": (round(statistics.mean(distinct), 1), min(distinct)),
    }


if __name__ == "__main__":
    import time

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    for kind in (*KINDS, "unified"):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            build_pair(kind, pathlib.Path(tmp))
        print(kind, f"build_pair {time.perf_counter() - start:.2f}s", measure(kind), flush=True)
