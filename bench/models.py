"""Random-weight targets and drafters at the real Gemma 4 shapes (and a tiny one for --quick).

Weights are drawn lazily and materialised one layer at a time, already cast or quantized, so a
31B model never exists in float32 at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlx_gemma_mtp
from mlx_gemma_mtp.config import drafter_config, target_config
from mlx_gemma_mtp.drafter import Drafter
from mlx_gemma_mtp.quantize import quantize
from mlx_gemma_mtp.target import Target

CONFIGS = Path(mlx_gemma_mtp.__file__).parent / "configs"
SHAPES = ("E2B", "E4B", "12B", "26B-A4B", "31B")

# A small model of the E2B structure (per-layer inputs, KV-shared layers, clustered drafter)
# for --quick runs on a CPU.
TINY_TARGET = {
    "model_type": "gemma4_text",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "global_head_dim": 128,
    "num_kv_shared_layers": 2,
    "hidden_size_per_layer_input": 32,
    "vocab_size": 4096,
    "vocab_size_per_layer_input": 4096,
    "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"] * 3,
    "use_double_wide_mlp": True,
    "final_logit_softcapping": 30.0,
}
TINY_DRAFTER = {
    "model_type": "gemma4_assistant",
    "backbone_hidden_size": 256,
    "use_ordered_embeddings": True,
    "num_centroids": 64,
    "centroid_intermediate_top_k": 8,
    "text_config": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "global_head_dim": 128,
        "vocab_size": 4096,
        "sliding_window": 64,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "final_logit_softcapping": None,
    },
}


def configs(shape: str) -> tuple[dict, dict]:
    """The target's and the drafter's config.json contents for `shape`."""
    if shape == "tiny":
        return TINY_TARGET, TINY_DRAFTER
    target = json.loads((CONFIGS / f"gemma-4-{shape}-it.json").read_text())
    drafter = json.loads((CONFIGS / f"gemma-4-{shape}-it-assistant.json").read_text())
    return target, drafter


BRANCH_NORMS = (
    "post_attention_layernorm",
    "post_feedforward_layernorm",
    "post_feedforward_layernorm_1",
    "post_feedforward_layernorm_2",
    "post_per_layer_input_norm",
)


def calm(target: Target, scale: float = 0.05) -> None:
    """Make a random target predict its input token with a wide margin.

    A deep random network is chaotic: on MLX CUDA the last-bit differences between a k-row
    verify and a one-row decode (GEMM vs GEMV rounding) grow into flipped argmaxes every few
    tokens, and a replayed continuation stops being the target's own. Shrinking every branch's
    output norm leaves the residual stream dominated by the token's embedding, so the argmax is
    that token by a margin no rounding flips. Costs are unchanged (same shapes, same kernels);
    `cycle` then makes the predicted token a different one, as text's are.
    """
    for layer in target.model.layers:
        for name in BRANCH_NORMS:
            norm = getattr(layer, name, None)
            if norm is not None:
                norm.weight = mx.full(norm.weight.shape, scale)


class CycledInput(nn.Module):
    """A target's embedding table looked up at `successor[id]` rather than at `id`; the tied
    head (`as_linear`) reads the table as it is."""

    def __init__(self, table: nn.Module, successor: mx.array):
        super().__init__()
        self.table = table
        self._successor = successor  # the leading underscore keeps it out of the parameters

    def __call__(self, ids: mx.array) -> mx.array:
        return self.table(self._successor[ids])

    def as_linear(self, x: mx.array) -> mx.array:
        return self.table.as_linear(x)


def cycle(target: Target, seed: int) -> None:
    """Make a calm target (`calm`) predict the successor of its input token in one random cycle
    through the vocabulary, rather than the token itself: a continuation then walks distinct
    tokens, as text does, instead of repeating its prompt's last one, and a MoE's verify routes
    its positions to as many experts as text would (a repeated token routes every position of a
    row to the same ones). Ids below 4, the stop ids, the placeholders and the pad map to
    themselves, so a continuation never stops or turns into a placeholder. The permutation is a
    lookup, not weights: a model written to disk (`bench.peer`) cannot carry it. It costs one
    gather of the B x L input ids a forward, paid by plain, speculative and mlx-lm's runs alike."""
    vocab = target.args.vocab_size
    config = target.config
    fixed = {*range(4), *config.stop_ids, *config.placeholder_ids, config.pad_id}
    order = np.random.RandomState(seed).permutation([i for i in range(vocab) if i not in fixed])
    successor = np.arange(vocab)
    successor[order] = np.roll(order, -1)
    target.model.embed_tokens = CycledInput(target.model.embed_tokens, mx.array(successor, dtype=mx.int32))


def _materialise(model: nn.Module, dtype, bits: int | None) -> None:
    """Cast (and quantize) lazily, then evaluate layer by layer to bound peak memory."""
    model.set_dtype(dtype)
    if bits is not None:
        quantize(model, bits=bits, group_size=64)
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.checkpoint_weights())  # the drafter's token ordering too


def build(
    shape: str,
    dtype=mx.bfloat16,
    bits: int | None = None,
    seed: int = 0,
    calm_target: bool = True,
    cycled: bool = True,
) -> tuple[Target, Drafter]:
    """A random target of `shape` and its drafter (the real configs), cast to `dtype`,
    quantized to `bits` when given (target and drafter alike); `calm`ed and, unless `cycled` is
    False, `cycle`d (see there) by default."""
    mx.random.seed(seed)
    target_json, drafter_json = configs(shape)
    target = Target(target_config(target_json, CONFIGS, (1, 106)))
    drafter = Drafter(drafter_config(drafter_json, CONFIGS))
    if drafter.config.use_ordered_embeddings:
        vocab = drafter.args.vocab_size
        drafter.masked_embedding.set_token_ordering(mx.random.permutation(vocab))
    if calm_target:
        calm(target)
    _materialise(target, dtype, bits)
    _materialise(drafter, dtype, bits)
    if calm_target and cycled:
        cycle(target, seed)
    return target, drafter


def nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for v in module.checkpoint_weights().values())
