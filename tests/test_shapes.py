"""Full-size E2B, E4B, 12B, 26B-A4B and 31B targets and drafters, built lazily from the real configs
(MLX allocates nothing until evaluated): every parameter name and shape is what the checkpoint
layout in ../shared/reference/gemma4/README.md says, after our sanitize."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_gemma_mtp
from mlx_gemma_mtp.config import drafter_config, target_config
from mlx_gemma_mtp.drafter import Drafter
from mlx_gemma_mtp.load import check_fit
from mlx_gemma_mtp.target import Target

CONFIGS = Path(mlx_gemma_mtp.__file__).parent / "configs"
VOCAB, PLE = 262144, 256
# Tensors of the multimodal parts a checkpoint holds beside the text stack (dropped on load).
VISION_TOWER = {"model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": (768, 768)}
UNIFIED_EMBEDDERS = {  # the 12B's encoder-free ones, as Google's file names them (TF conversion_mapping.py)
    "model.vision_embedder.patch_dense.weight": (3840, 6912),
    "model.vision_embedder.pos_embedding": (1120, 2, 3840),
    "model.embed_vision.embedding_projection.weight": (3840, 3840),
    "model.embed_audio.embedding_projection.weight": (3840, 640),
}


@dataclass(frozen=True)
class Row:
    """One row of the reference tables (README "Models (text stack)" and "assistant")."""

    hidden: int
    layers: int
    mlp: int
    heads: int
    kv: tuple[int, int]  # sliding, full
    full_layers: tuple[int, ...]
    shared: int
    ple: bool
    k_eq_v: bool
    double_wide_from: int | None = None  # first layer with a 2x MLP
    experts: tuple[int, int] | None = None  # count, width
    drafter: tuple[int, int, int, bool, int] = (256, 2048, 4, True, 0)  # h, I, heads, ordered, params
    multimodal: tuple = tuple(VISION_TOWER.items())


TABLE = {
    "E2B": Row(
        1536,
        35,
        6144,
        8,
        (1, 1),
        tuple(range(4, 35, 5)),
        20,
        True,
        False,
        double_wide_from=15,
        drafter=(256, 2048, 4, True, 77_731_328),
    ),
    "E4B": Row(
        2560,
        42,
        10240,
        8,
        (2, 2),
        tuple(range(5, 42, 6)),
        18,
        True,
        False,
        drafter=(256, 2048, 4, True, 78_517_760),
    ),
    "12B": Row(
        3840,
        48,
        15360,
        16,
        (8, 1),
        tuple(range(5, 48, 6)),
        0,
        False,
        True,
        drafter=(1024, 8192, 16, False, 422_856_960),
        multimodal=tuple(UNIFIED_EMBEDDERS.items()),
    ),
    "26B-A4B": Row(
        2816,
        30,
        2112,
        16,
        (8, 2),
        (5, 11, 17, 23, 29),
        0,
        False,
        True,
        experts=(128, 704),
        drafter=(1024, 8192, 16, False, 419_711_232),
    ),
    "31B": Row(
        5376,
        60,
        21504,
        32,
        (16, 4),
        tuple(range(5, 60, 6)),
        0,
        False,
        True,
        drafter=(1024, 8192, 32, False, 469_518_592),
    ),
}


def _hf_target_shapes(row: Row) -> dict[str, tuple]:
    """Tensor names and shapes of a Google checkpoint's text stack (multimodal layout)."""
    p = "model.language_model."
    H = row.hidden
    s = {p + "embed_tokens.weight": (VOCAB, H), p + "norm.weight": (H,)}
    if row.ple:
        s[p + "embed_tokens_per_layer.weight"] = (VOCAB, row.layers * PLE)
        s[p + "per_layer_model_projection.weight"] = (row.layers * PLE, H)
        s[p + "per_layer_projection_norm.weight"] = (PLE,)
    for i in range(row.layers):
        full = i in row.full_layers
        hd, kv = (512, row.kv[1]) if full else (256, row.kv[0])
        mlp = row.mlp * (2 if row.double_wide_from is not None and i >= row.double_wide_from else 1)
        L = f"{p}layers.{i}."
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            s[L + norm + ".weight"] = (H,)
        s[L + "layer_scalar"] = (1,)
        s[L + "self_attn.q_proj.weight"] = (row.heads * hd, H)
        s[L + "self_attn.q_norm.weight"] = (hd,)
        s[L + "self_attn.o_proj.weight"] = (H, row.heads * hd)
        # Google's files keep K/V of shared layers too; the runtime drops them.
        s[L + "self_attn.k_proj.weight"] = (kv * hd, H)
        s[L + "self_attn.k_norm.weight"] = (hd,)
        if not (row.k_eq_v and full):
            s[L + "self_attn.v_proj.weight"] = (kv * hd, H)
        s[L + "mlp.gate_proj.weight"] = (mlp, H)
        s[L + "mlp.up_proj.weight"] = (mlp, H)
        s[L + "mlp.down_proj.weight"] = (H, mlp)
        if row.ple:
            s[L + "per_layer_input_gate.weight"] = (PLE, H)
            s[L + "per_layer_projection.weight"] = (H, PLE)
            s[L + "post_per_layer_input_norm.weight"] = (H,)
        if row.experts:
            n, w = row.experts
            s[L + "router.proj.weight"] = (n, H)
            s[L + "router.scale"] = (H,)
            s[L + "router.per_expert_scale"] = (n,)
            s[L + "experts.gate_up_proj"] = (n, 2 * w, H)
            s[L + "experts.down_proj"] = (n, H, w)
            for norm in (
                "post_feedforward_layernorm_1",
                "post_feedforward_layernorm_2",
                "pre_feedforward_layernorm_2",
            ):
                s[L + norm + ".weight"] = (H,)
    s.update(row.multimodal)
    return s


def _hf_drafter_shapes(row: Row) -> dict[str, tuple]:
    h, inter, heads, ordered, _ = row.drafter
    s = {
        "model.embed_tokens.weight": (VOCAB, h),
        "model.norm.weight": (h,),
        "pre_projection.weight": (h, 2 * row.hidden),
        "post_projection.weight": (row.hidden, h),
    }
    for i, hd in enumerate((256, 256, 256, 512)):
        L = f"model.layers.{i}."
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            s[L + norm + ".weight"] = (h,)
        s[L + "layer_scalar"] = (1,)
        s[L + "self_attn.q_proj.weight"] = (heads * hd, h)
        s[L + "self_attn.q_norm.weight"] = (hd,)
        s[L + "self_attn.o_proj.weight"] = (h, heads * hd)
        s[L + "mlp.gate_proj.weight"] = (inter, h)
        s[L + "mlp.up_proj.weight"] = (inter, h)
        s[L + "mlp.down_proj.weight"] = (h, inter)
    if ordered:
        s["masked_embedding.centroids.weight"] = (2048, h)
        s["masked_embedding.token_ordering"] = (VOCAB,)
    return s


def _lazy(shapes: dict[str, tuple]) -> dict[str, mx.array]:
    return {
        k: mx.zeros(v, dtype=mx.int64 if k.endswith("token_ordering") else mx.bfloat16)
        for k, v in shapes.items()
    }


def _shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.checkpoint_weights().items()}


@pytest.mark.parametrize("name", list(TABLE))
def test_full_size_shapes(name):
    row = TABLE[name]
    target = Target(target_config(json.loads((CONFIGS / f"gemma-4-{name}-it.json").read_text()), CONFIGS, ()))
    drafter_cfg = drafter_config(
        json.loads((CONFIGS / f"gemma-4-{name}-it-assistant.json").read_text()), CONFIGS
    )
    drafter = Drafter(drafter_cfg)
    check_fit(drafter_cfg, target, CONFIGS)

    expected = {k: tuple(v.shape) for k, v in target.sanitize(_lazy(_hf_target_shapes(row))).items()}
    assert _shapes(target) == expected
    assert target.first_shared == row.layers - row.shared
    # K/V producers: the last non-shared layer of each attention type.
    non_shared = range(row.layers - row.shared)
    assert target.kv_producers == {
        "full_attention": max(i for i in non_shared if i in row.full_layers),
        "sliding_attention": max(i for i in non_shared if i not in row.full_layers),
    }

    expected = {k: tuple(v.shape) for k, v in drafter.sanitize(_lazy(_hf_drafter_shapes(row))).items()}
    assert _shapes(drafter) == expected
    params = sum(v.size for k, v in tree_flatten(drafter.parameters()) if not k.endswith("layer_scalar"))
    assert params == row.drafter[4]
    assert mx.get_active_memory() < 2**30, "building lazily allocated weights"
