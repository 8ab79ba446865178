"""The quantization recipe, shared by in-memory quantization and the converter (`convert/`).

Scheme: mlx-lm's affine quantization, `bits`-bit integers with one scale and bias per
`group_size` consecutive inputs (`mx.quantize`), recorded in config.json's `quantization`
block so that mlx-lm and `load` rebuild the same layers. Recipe, per tensor family:

- Linear layers and embeddings (attention, dense MLP, experts, the per-layer-input table and
  projections, the tied embedding that is also the LM head, the drafter's projections):
  `bits`/`group_size`. These are >99% of the bytes; mlx-community's files do the same. The
  tied embedding gets no extra bits although it is the LM head: it is read in full every
  token (E2B: 0.2 GB at 4-bit, 0.4 GB at 8), and `--q-bits 8` is there when quality matters.
- A layer whose input width is not a multiple of `group_size` stays unquantized: it cannot be
  grouped. Real widths all divide 32 and 64; with 128, 26B-A4B's expert `down_proj` (input
  704) and dense `down_proj` (2112) stay in `dtype`, so 64 (the default) is the right choice
  there. (The test models' per-layer projections, input 16, are such layers.)
- The MoE router (`router.proj`, 128 x 2816 per layer, 0.03% of the bytes) in 8-bit: the
  top-8 expert choice turns on small score differences, and a flipped expert changes the
  whole MLP output; 8-bit keeps it for almost nothing.
- The drafter's centroid scorer (`masked_embedding.centroids`, 2048 x 256, 1 MB in bf16)
  stays unquantized: it decides which 32 of 2048 token clusters are scored at all, and a
  cluster it misses removes the right token from the candidates entirely.
- `masked_embedding.token_ordering` is an integer index table, not a layer: never quantized.
- Norm weights, `layer_scalar`, `router.scale`, `per_expert_scale`: vectors, not layers;
  they stay in `dtype`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

ROUTER_BITS = 8
MODE = "affine"
BITS = (4, 8)  # what `convert -q` and in-memory quantization offer
GROUP_SIZES = (32, 64, 128)


def check(bits, group_size) -> None:
    """ValueError naming a quantization this recipe does not offer."""
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantization group size must be one of {GROUP_SIZES}, got {group_size!r}")


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


def layer_recipe(model: nn.Module, bits: int, group_size: int) -> dict[str, dict]:
    """{module path: {"group_size", "bits"}} for every layer the recipe quantizes.

    Reads only shapes, so `model` may be lazy (never evaluated): the converter plans a
    checkpoint larger than memory this way.
    """
    predicate = quant_predicate(bits, group_size)
    return {path: params for path, module in model.named_modules() if (params := predicate(path, module))}


def config_block(bits: int, group_size: int, recipe: dict[str, dict]) -> dict:
    """config.json's `quantization` block (mlx-lm's convention): the defaults, plus each layer
    quantized otherwise (the router), which loaders would not guess."""
    block: dict = {"group_size": group_size, "bits": bits, "mode": MODE}
    for path, params in recipe.items():
        if params != {"group_size": group_size, "bits": bits}:
            block[path] = {**params, "mode": MODE}
    return block


def quantize_weight(weight: mx.array, params: dict) -> tuple[mx.array, mx.array, mx.array]:
    """(packed weight, scales, biases) of one layer's weight, as `nn.quantize` would store them."""
    return mx.quantize(weight, group_size=params["group_size"], bits=params["bits"], mode=MODE)
