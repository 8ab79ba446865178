"""The Gemma 4 MTP drafter (`Gemma4AssistantForCausalLM`) in MLX.

A drafter owns no K/V and no cache: its query-only attention layers read the target cache's
own buffers (`Target.kv_producers`, one layer per attention type). Its input is
concat(target embedding of the last token * sqrt(hidden), target's last hidden state after the
final norm), projected down by `pre_projection`; every step of a round runs at one constant
position and feeds its own `post_projection` output back as the next "hidden state"
(transformers' candidate_generator.py, SinglePositionMultiTokenCandidateGenerator, 5.17).

E2B/E4B drafters carry a clustered LM head (`use_ordered_embeddings`): a centroid scorer picks
the top-k of 2048 token clusters and only their tokens are scored, so the greedy draft never
touches a 262,144-wide row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.gemma4_text import DecoderLayer, logit_softcap

from .config import DrafterConfig
from .target import WeightsError

ORDERING = "masked_embedding.token_ordering"  # the clustered head's table, as checkpoints name it


class DrafterModel(nn.Module):
    """Embedding (serving only as the tied LM head), query-only layers, final norm."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        args = config.text
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        # num_kv_shared_layers == num_hidden_layers, so mlx-lm builds q-only attention.
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class MaskedEmbedding(nn.Module):
    """The clustered head: `centroids` scores clusters, `token_ordering` lists their tokens."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        vocab = config.text.vocab_size
        if vocab % config.num_centroids:
            raise WeightsError(
                f"vocab_size {vocab} is not a multiple of num_centroids {config.num_centroids}"
            )
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = nn.Linear(config.text.hidden_size, config.num_centroids, bias=False)
        # An index table, not a parameter (the leading underscore keeps it out of parameters()):
        # casting, quantizing or training the parameters must never turn it into floats.
        self._token_ordering = mx.zeros((vocab,), dtype=mx.int32)

    @property
    def token_ordering(self) -> mx.array:
        """[vocab] int32: `.reshape(num_centroids, -1)[c]` are the token ids of cluster c."""
        return self._token_ordering

    def set_token_ordering(self, ordering: mx.array) -> None:
        """Install a checkpoint's table (integers, int64 on disk; kept as int32)."""
        expected = self._token_ordering.shape
        if ordering.shape != expected or not mx.issubdtype(ordering.dtype, mx.integer):
            got = f"shape {tuple(ordering.shape)} {ordering.dtype}"
            raise WeightsError(f"{ORDERING} must be {expected[0]} integers, got {got}")
        self._token_ordering = ordering.astype(mx.int32)

    def candidates(self, h: mx.array) -> mx.array:
        """Token ids of the top-k clusters for each row of h: [B, L, top_k * cluster_size]."""
        scores = self.centroids(h)  # [B, L, num_centroids]
        top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        clusters = self.token_ordering.reshape(self.num_centroids, -1)
        ids = clusters[top]  # [B, L, top_k, cluster_size]
        return ids.reshape(*ids.shape[:2], -1)


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig, source: Path | None = None):
        super().__init__()
        self.config = config
        self.source = source  # the directory it was loaded from (None: built in memory)
        args = config.text
        self.model = DrafterModel(config)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, args.hidden_size, bias=False)
        self.post_projection = nn.Linear(args.hidden_size, config.backbone_hidden_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(config)

    @property
    def args(self):
        return self.config.text

    def checkpoint_weights(self) -> dict[str, mx.array]:
        """Every tensor a checkpoint of this drafter holds, by name: the parameters and, for a
        clustered head, the token ordering."""
        weights = dict(tree_flatten(self.parameters()))
        if self.config.use_ordered_embeddings:
            weights[ORDERING] = self.masked_embedding.token_ordering
        return weights

    def load_weights(self, file_or_weights, strict: bool = True) -> Drafter:
        """`nn.Module.load_weights`, the token ordering (not a parameter) included."""
        weights = dict(mx.load(file_or_weights) if isinstance(file_or_weights, str) else file_or_weights)
        if self.config.use_ordered_embeddings and ORDERING in weights:
            self.masked_embedding.set_token_ordering(weights.pop(ORDERING))
        elif self.config.use_ordered_embeddings and strict:
            raise ValueError(f"Missing parameters: {ORDERING}.")
        return super().load_weights(list(weights.items()), strict=strict)

    def __call__(
        self,
        inputs: mx.array,
        shared_kv: dict[str, tuple[mx.array, mx.array, mx.array | None]],
        position: int | mx.array,
    ) -> tuple[mx.array, mx.array]:
        """One drafting step.

        inputs: [B, 1, 2*backbone] = concat(target embedding (scaled), hidden state).
        shared_kv: per attention type, the target cache's view (`Cache.views`): (keys, values)
            [B, kv_heads, S, head_dim] and a [1, S] additive mask (0 / -inf) of the positions
            before `position` (sliding: the last `window + 1` of them); None when all S are those
            (the caches' views always give one: their buffers hold more than is visible).
        position: where every step of the round runs (a host int or a device scalar).
        Returns (drafter hidden after its final norm [B, 1, h], projected state [B, 1, backbone]).
        """
        h = self.pre_projection(inputs)
        for layer in self.model.layers:
            keys, values, mask = shared_kv[layer.layer_type]
            h, _, _ = layer(h, mask, None, shared_kv=(keys, values), offset=position)
        h = self.model.norm(h)
        return h, self.post_projection(h)

    def logits(self, h: mx.array) -> mx.array:
        """Full-vocabulary logits of the tied head (dense drafters; tests of the clustered one)."""
        out = self.model.embed_tokens.as_linear(h)
        if self.args.final_logit_softcapping is not None:
            out = logit_softcap(self.args.final_logit_softcapping, out)
        return out

    def candidate_logits(self, h: mx.array) -> tuple[mx.array, mx.array]:
        """Clustered head: (token ids, their logits), both [B, L, top_k * cluster_size]."""
        ids = self.masked_embedding.candidates(h)
        rows = self.model.embed_tokens(ids)  # [B, L, N, h]; a quantized table dequantizes rows only
        logits = (rows @ h[..., None]).squeeze(-1)
        if self.args.final_logit_softcapping is not None:
            logits = logit_softcap(self.args.final_logit_softcapping, logits)
        return ids, logits

    def greedy_token(self, h: mx.array) -> mx.array:
        """The drafter's argmax token for each row of h, [B, L] (never a full-vocab row when
        the head is clustered)."""
        if self.config.use_ordered_embeddings:
            ids, logits = self.candidate_logits(h)
            best = mx.argmax(logits, axis=-1, keepdims=True)
            return mx.take_along_axis(ids, best, axis=-1).squeeze(-1)
        return mx.argmax(self.logits(h), axis=-1)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names -> ours (the same as transformers'). Idempotent.

        Maps each tensor on its own (the converter streams them one at a time); a tensor the
        model lacks is refused by the strict load that follows, as is a missing one.
        """
        out = {}
        for name, value in weights.items():
            if name.endswith("lm_head.weight") or "rotary_emb" in name:
                continue  # tied to model.embed_tokens; rotary buffers are recomputed
            if name == ORDERING:
                if not self.config.use_ordered_embeddings:
                    raise WeightsError(
                        "use_ordered_embeddings is False but the checkpoint has "
                        "masked_embedding.token_ordering"
                    )
                value = value.astype(mx.int32)  # int64 on disk; 262,144 fits int32
            out[name] = value
        return out


def compiled_step(drafter: Drafter, embed: Callable[[mx.array], mx.array], head: Callable | None = None):
    """One drafting step as one compiled graph: (token [1, 1] int32, hidden [1, 1, backbone],
    position (int32 scalar), shared_kv) -> (head(h) as int32 [1, 1], or the drafter state h
    when head is None; projected state [1, 1, backbone]).

    `embed` is the target's scaled input embedding. A step is a few hundred small kernels on a
    GPU, launch-bound: compiled, its element-wise ops fuse (MLX CUDA, H100: 16-26% less per
    step; the bench records both, `drafter_ms`). Traced again for each new shape of the
    cache views, i.e. when the target's buffers grow or compact (`cache.py`). The weights are
    captured at the first trace: build the step after loading them.
    """

    def step(token, hidden, position, shared_kv):
        inputs = mx.concatenate([embed(token), hidden], axis=-1)
        h, projected = drafter(inputs, shared_kv, position)
        return (h if head is None else head(h).astype(mx.int32)), projected

    return mx.compile(step)
