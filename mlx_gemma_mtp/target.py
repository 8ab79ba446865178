"""The Gemma 4 target: mlx-lm's layers, our forward.

mlx-lm's `Gemma4TextModel` holds the weights and the decoder layers (measured within 5e-6 of
transformers). We own the forward because the speculative loop needs what mlx-lm's does not
return: the last hidden state after the final norm (the drafter's input), logits only where
asked, and caches that rewind exactly (`cache.py`).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.gemma4_text import Gemma4TextModel, logit_softcap

from .cache import Cache
from .config import TargetConfig

# Checkpoint prefixes of what the text runtime never reads: the multimodal towers and embedders
# (the 12B's encoder-free `vision_embedder`/`embed_vision`/`embed_audio` included).
NON_TEXT_PREFIXES = (
    "vision_tower.",
    "embed_vision.",
    "audio_tower.",
    "embed_audio.",
    "vision_embedder.",
    "multi_modal_projector.",
)
# Buffers transformers keeps that carry no weights for us.
IGNORED_SUFFIXES = ("self_attn.rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """Checkpoint tensors that do not fit the model, with the names listed."""


class Target(nn.Module):
    """A Gemma 4 text model (E2B, E4B, 12B, 26B-A4B, 31B) as the speculative loop drives it."""

    def __init__(self, config: TargetConfig):
        super().__init__()
        self.config = config
        self.model = Gemma4TextModel(config.text)
        args = config.text
        self.first_shared = args.num_hidden_layers - args.num_kv_shared_layers
        # The layer whose K/V the drafter reads, per attention type: the last layer of that
        # type that computes K/V (transformers' configuration_gemma4.py, kv_sharing_modes).
        self.kv_producers = {args.layer_types[i]: i for i in range(self.first_shared)}

    @property
    def args(self):
        return self.config.text

    def checkpoint_weights(self) -> dict[str, mx.array]:
        """Every tensor a checkpoint of this target holds (in our names), by name: its parameters."""
        return dict(tree_flatten(self.parameters()))

    def make_cache(self) -> Cache:
        """An empty cache for one sequence (rows join with `Cache.join`)."""
        return Cache(list(self.args.layer_types[: self.first_shared]), self.args.sliding_window)

    def embed(self, tokens: mx.array) -> mx.array:
        """Scaled input embedding, as the first layer and the drafter see it."""
        # Multiplying by a Python float keeps the weight dtype, so the scale rounds as in
        # transformers (bf16 sqrt(1536) -> 39.25, modeling_gemma4.py Gemma4TextScaledWordEmbedding).
        return self.model.embed_tokens(tokens) * self.model.embed_scale

    def text_tokens(self, tokens: mx.array) -> mx.array:
        """`tokens` with the multimodal placeholder ids as <pad>: transformers' Gemma4Model.forward
        embeds them so (token embedding and per-layer inputs). The drafter's input stays the raw
        `embed` row, as transformers' candidate generator looks it up."""
        ids = self.config.placeholder_ids
        if not ids:
            return tokens
        return _placeholders_as_pad(ids, self.config.pad_id)(tokens)

    def __call__(self, tokens: mx.array, cache: Cache) -> mx.array:
        """Hidden states after the final norm, [B, L, hidden]; appends L positions to each row
        of `cache`, at each row's own position."""
        m = self.model
        tokens = self.text_tokens(tokens)
        h = self.embed(tokens)
        per_layer_inputs = [None] * len(m.layers)
        if m.hidden_size_per_layer_input:
            ple = m._project_per_layer_inputs(h, m._get_per_layer_inputs(tokens))
            per_layer_inputs = [ple[:, :, i, :] for i in range(len(m.layers))]

        L = tokens.shape[1]
        masks = cache.begin(L, h.dtype)

        shared = [None] * len(m.layers)  # (keys, values) each layer computed
        offsets = [None] * len(m.layers)
        for i, layer in enumerate(m.layers):
            source = m.previous_kvs[i]
            h, shared[i], offsets[i] = layer(
                h,
                masks[layer.layer_type],
                cache.layers[i] if i < self.first_shared else None,
                per_layer_input=per_layer_inputs[i],
                shared_kv=shared[source] if source != i else None,
                offset=offsets[source] if source != i else None,
            )
        cache.advance(L)
        return m.norm(h)

    def logits(self, hidden: mx.array) -> mx.array:
        """Tied LM head with Gemma's final soft-capping, [B, L, vocab]."""
        out = self.model.embed_tokens.as_linear(hidden)
        if self.args.final_logit_softcapping is not None:
            out = logit_softcap(self.args.final_logit_softcapping, out)
        return out

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names -> ours (`model.*`, mlx-lm's layout). Idempotent.

        Accepts transformers' multimodal (`model.language_model.*`) and text-only (`model.*`)
        layouts and mlx-lm/mlx-community conversions (`language_model.model.*`). Drops the
        multimodal towers and embedders and the K/V projections of KV-shared layers (Google's
        files keep them; nothing reads them). Raises on a name it does not know.
        """
        out = {}
        unknown = []
        for name, value in weights.items():
            key = _text_key(name)
            if key is None or name.endswith(IGNORED_SUFFIXES) or name.endswith("lm_head.weight"):
                continue  # lm_head is tied to embed_tokens in every Gemma 4
            if not key.startswith("model."):
                unknown.append(name)
                continue
            if self._is_shared_kv_projection(key):
                continue
            if key.endswith(".experts.gate_up_proj"):
                base = key.removesuffix(".gate_up_proj")
                gate, up = mx.split(value, 2, axis=-2)  # fused [experts, 2*I, H], gate first
                out[f"{base}.switch_glu.gate_proj.weight"] = mx.contiguous(gate)
                out[f"{base}.switch_glu.up_proj.weight"] = mx.contiguous(up)
            elif key.endswith(".experts.down_proj"):
                out[f"{key.removesuffix('.down_proj')}.switch_glu.down_proj.weight"] = value
            else:
                out[key] = value
        if unknown:
            raise WeightsError(f"unknown target tensor names: {sorted(unknown)[:8]}")
        return out

    def _is_shared_kv_projection(self, key: str) -> bool:
        parts = key.split(".")
        if len(parts) < 5 or parts[1] != "layers" or parts[3] != "self_attn":
            return False
        return int(parts[2]) >= self.first_shared and parts[4] in ("k_proj", "v_proj", "k_norm")


@functools.cache
def _placeholders_as_pad(ids: tuple[int, ...], pad: int):
    """tokens -> tokens with `ids` as `pad`, compiled into one fused kernel (uncompiled, it is
    a comparison per id, their ors and a select: six launches in every forward)."""

    def swap(tokens: mx.array) -> mx.array:
        return mx.where(functools.reduce(mx.logical_or, [tokens == i for i in ids]), pad, tokens)

    return mx.compile(swap, shapeless=True)


def _text_key(name: str) -> str | None:
    """The text-stack name (`model.*`), None for a multimodal tower's tensor."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name.removeprefix(prefix)
    bare = name.removeprefix("model.")
    if bare.startswith(NON_TEXT_PREFIXES):
        return None
    return name
