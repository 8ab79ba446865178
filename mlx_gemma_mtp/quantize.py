"""Quantizing a target or drafter in memory, with the per-family recipe.

Recipe (why, per tensor family):
- Linear and embedding weights: `bits`/`group_size` affine, mlx-lm's convention.
- A layer whose input width does not divide the group size stays unquantized (it cannot be
  grouped; e.g. the tiny per-layer-input projections of test models).
- The MoE router (`router.proj`) in 8-bit: expert choice flips on small score changes.
- The drafter's centroid scorer (`masked_embedding.centroids`) stays unquantized: it is
  2048 x 256 (1 MB in bf16) and decides which clusters are scored at all.
- `token_ordering` is an integer table and never quantized (nn.quantize skips non-layers).
"""

from __future__ import annotations

import mlx.nn as nn

ROUTER_BITS = 8


def quant_predicate(bits: int, group_size: int):
    """class_predicate for nn.quantize implementing the recipe above."""

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or path.endswith("masked_embedding.centroids"):
            return False
        if module.weight.shape[-1] % group_size:
            return False
        if path.endswith("router.proj"):
            return {"group_size": group_size, "bits": ROUTER_BITS}
        return {"group_size": group_size, "bits": bits}

    return predicate


def quantize(model: nn.Module, bits: int = 4, group_size: int = 64) -> nn.Module:
    """Quantize `model` in place (target or drafter) and return it."""
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=quant_predicate(bits, group_size))
    return model
