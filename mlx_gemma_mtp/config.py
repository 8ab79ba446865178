"""Reading Gemma 4 and MTP-assistant configs in every spelling that ships.

A target's text stack is described by mlx-lm's `gemma4_text.ModelArgs`; we own the step
from `config.json` to those args because mlx-lm's own reading falls short on two counts
(see `../shared/reference/gemma4/README.md`, "mlx-lm 0.32.2's Gemma 4 against transformers"):
it reads only the Hub spelling of the full-attention head overrides, and its multimodal
wrapper overwrites `text_config.vocab_size` with a top-level default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlx_lm.models.gemma4_text import ModelArgs as TextArgs

# Multimodal wrappers (text stack under `language_model`) and text-only models. `gemma4_unified` is
# the 12B: the same text stack without per-layer inputs or MoE, beside an encoder-free embedder.
MULTIMODAL_TYPES = {"gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
TARGET_MODEL_TYPES = (*MULTIMODAL_TYPES, *MULTIMODAL_TYPES.values())
UNIFIED_TEXT_TYPE = "gemma4_unified_text"
# Each assistant type with transformers' default backbone_hidden_size (E2B's, 12B's).
DRAFTER_MODEL_TYPES = {"gemma4_assistant": 1536, "gemma4_unified_assistant": 3840}
LAYER_TYPES = ("sliding_attention", "full_attention")
# Multimodal placeholder ids and their defaults (transformers 5.17 configuration_gemma4.py, Gemma4Config).
PLACEHOLDER_DEFAULTS = {"image_token_id": 258_880, "audio_token_id": 258_881, "video_token_id": 258_884}


class ConfigError(ValueError):
    """A config that this runtime cannot run, with the file and field named."""


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _fold_per_layer_config(text: dict, where: Path) -> dict:
    """Turn transformers' `per_layer_config` spelling into the Hub's global_* fields.

    transformers >= 5.17 `save_pretrained` writes `per_layer_config: {"5": {"head_dim": 512,
    "num_key_value_heads": 4}, ...}` (one entry per full-attention layer) and drops
    `global_head_dim` / `num_global_key_value_heads`; the Hub files carry the latter.
    """
    per_layer = text.get("per_layer_config")
    if not per_layer:
        return text
    overrides = {json.dumps(v, sort_keys=True) for v in per_layer.values()}
    if len(overrides) != 1:
        raise ConfigError(
            f"{where}: per_layer_config has differing overrides per layer ({sorted(overrides)}); "
            "only one override for every full-attention layer is supported"
        )
    override = next(iter(per_layer.values()))
    text = dict(text)
    text["global_head_dim"] = override.get("head_dim", text.get("head_dim"))
    if "num_key_value_heads" in override:
        text["num_global_key_value_heads"] = override["num_key_value_heads"]
    return text


def _check_layer_types(args: TextArgs, where: Path) -> None:
    if len(args.layer_types) != args.num_hidden_layers:
        raise ConfigError(
            f"{where}: layer_types has {len(args.layer_types)} entries "
            f"for num_hidden_layers {args.num_hidden_layers}"
        )
    unknown = sorted(set(args.layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ConfigError(f"{where}: unknown layer_types {unknown}")


def _check_attention(text: dict, where: Path, field: str) -> None:
    """Refuse `use_bidirectional_attention: "all"` (every token attends both ways): generation
    is causal here. "vision" only changes the mask around image tokens, which a text-only
    runtime never sees, so it runs as transformers runs text."""
    value = text.get("use_bidirectional_attention")
    if value not in (None, "vision"):
        raise ConfigError(
            f"{where}: {field} is {value!r}; only null or 'vision' can be run "
            "(this runtime decodes causally, and no Gemma 4 generation checkpoint uses 'all')"
        )


def _without_unified_fields(text: dict) -> dict:
    """A `gemma4_unified_text` config as the `gemma4_text` one it is.

    transformers' Gemma4UnifiedTextConfig has no per-layer-input or MoE fields (5.17,
    configuration_gemma4_unified.py: they are AttributeError) and its model builds neither: a
    `save_pretrained` config omits them, the Hub one carries leftovers (`vocab_size_per_layer_input`
    262144), and mlx-lm's defaults would build E2B's per-layer inputs. Both mean none.
    """
    text = dict(text)
    text.update(
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        enable_moe_block=False,
        num_experts=None,
        top_k_experts=None,
        moe_intermediate_size=None,
    )
    return text


def text_args(text: dict, where: Path) -> TextArgs:
    """mlx-lm `ModelArgs` from a `gemma4_text` or `gemma4_unified_text` config dict (either
    spelling of the full-attention overrides)."""
    if text.get("model_type") == UNIFIED_TEXT_TYPE:
        text = _without_unified_fields(text)
    text = _fold_per_layer_config(text, where)
    text["model_type"] = "gemma4_text"  # mlx-lm's layers build both
    text.setdefault("global_head_dim", 512)  # transformers' default when the key is absent
    args = TextArgs.from_dict(text)
    _check_layer_types(args, where)
    return args


def stop_ids(model_dir: Path, config: dict) -> tuple[int, ...]:
    """Every end-of-sequence id the checkpoint declares (config and generation_config).

    Gemma 4 lists several (`<eos>` 1 and end-of-turn `<turn|>` 106, sometimes 50): all stop.
    """
    ids: set[int] = set()
    sources = [config, config.get("text_config") or {}]
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        sources.append(read_json(gen_path))
    for source in sources:
        eos = source.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
    return tuple(sorted(ids))


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """A Gemma 4 target's text stack, as the runtime needs it."""

    text: TextArgs
    multimodal: bool  # saved as Gemma4[Unified]ForConditionalGeneration (keys under language_model)
    stop_ids: tuple[int, ...]
    quantization: dict | None  # mlx-lm's "quantization" block of a converted checkpoint
    raw: dict  # the config.json as read, for saving back
    # Ids embedded as `pad_id` (token embedding and per-layer inputs), as transformers'
    # Gemma4Model.forward does for image/audio/video placeholders; empty for a text-only model.
    placeholder_ids: tuple[int, ...] = ()
    pad_id: int = 0


def placeholder_fields(config: dict, multimodal: bool) -> dict[str, int | None]:
    """The config's image/audio/video placeholder ids by field: Gemma4Config's defaults fill in
    what a multimodal config leaves out; a converted text-only target carries them as written."""
    defaults = PLACEHOLDER_DEFAULTS if multimodal else dict.fromkeys(PLACEHOLDER_DEFAULTS)
    return {key: config.get(key, default) for key, default in defaults.items()}


def placeholder_ids(config: dict, where: Path, multimodal: bool) -> tuple[int, ...]:
    fields = placeholder_fields(config, multimodal)
    bad = {key: value for key, value in fields.items() if value is not None and type(value) is not int}
    if bad:
        raise ConfigError(f"{where}: placeholder ids must be integers or null, got {bad}")
    return tuple(sorted({value for value in fields.values() if value is not None}))


def load_target_config(model_dir: Path) -> TargetConfig:
    where = model_dir / "config.json"
    config = read_json(where)
    return target_config(config, where, stop_ids(model_dir, config))


def target_config(config: dict, where: Path, stops: tuple[int, ...]) -> TargetConfig:
    """A target's config from its config.json contents (`where` names it in errors)."""
    model_type = config.get("model_type")
    if model_type not in TARGET_MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not a Gemma 4 target "
            f"(expected one of {TARGET_MODEL_TYPES})"
        )
    multimodal = model_type in MULTIMODAL_TYPES
    if multimodal:
        if not isinstance(config.get("text_config"), dict):
            raise ConfigError(f"{where}: model_type {model_type!r} needs a text_config")
        text = dict(config["text_config"])
        text["model_type"] = MULTIMODAL_TYPES[model_type]
    else:
        text = dict(config)
    _check_attention(
        text,
        where,
        "text_config.use_bidirectional_attention" if multimodal else "use_bidirectional_attention",
    )
    placeholders = placeholder_ids(config, where, multimodal)
    pad_id = text.get("pad_token_id", 0)
    if placeholders and type(pad_id) is not int:
        raise ConfigError(
            f"{where}: pad_token_id must be an integer (placeholder ids embed as it), got {pad_id!r}"
        )
    return TargetConfig(
        text=text_args(text, where),
        multimodal=multimodal,
        stop_ids=stops,
        quantization=config.get("quantization"),
        raw=config,
        placeholder_ids=placeholders,
        pad_id=pad_id if placeholders else 0,
    )


@dataclass(frozen=True, kw_only=True)
class DrafterConfig:
    """A Gemma 4 MTP assistant ("drafter")."""

    text: TextArgs  # its own 4-layer stack; all layers read the target's K/V
    backbone_hidden_size: int  # the target's hidden size
    use_ordered_embeddings: bool  # clustered (centroid) LM head
    num_centroids: int
    centroid_intermediate_top_k: int
    quantization: dict | None
    raw: dict


def load_drafter_config(model_dir: Path) -> DrafterConfig:
    where = model_dir / "config.json"
    return drafter_config(read_json(where), where)


def drafter_config(config: dict, where: Path) -> DrafterConfig:
    """A drafter's config from its config.json contents (`where` names it in errors)."""
    model_type = config.get("model_type")
    if model_type not in DRAFTER_MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not a Gemma 4 assistant "
            f"(expected one of {tuple(DRAFTER_MODEL_TYPES)})"
        )
    text = dict(config.get("text_config") or {})
    # transformers builds the text config its model_type names, by default its assistant's own.
    text.setdefault(
        "model_type", UNIFIED_TEXT_TYPE if model_type == "gemma4_unified_assistant" else "gemma4_text"
    )
    _check_attention(text, where, "text_config.use_bidirectional_attention")
    # The assistant owns no K/V: every layer reads the target's.
    text["num_kv_shared_layers"] = text.get("num_hidden_layers", 4)
    text.setdefault("hidden_size_per_layer_input", 0)
    text.setdefault("vocab_size_per_layer_input", 0)
    text.setdefault("use_double_wide_mlp", False)
    if "final_logit_softcapping" not in text:
        text["final_logit_softcapping"] = None
    args = text_args(text, where)
    if args.hidden_size_per_layer_input or args.enable_moe_block:
        raise ConfigError(f"{where}: an assistant has no per-layer inputs and no MoE block")
    return DrafterConfig(
        text=args,
        backbone_hidden_size=int(config.get("backbone_hidden_size", DRAFTER_MODEL_TYPES[model_type])),
        use_ordered_embeddings=bool(config.get("use_ordered_embeddings", False)),
        num_centroids=int(config.get("num_centroids", 2048)),
        centroid_intermediate_top_k=int(config.get("centroid_intermediate_top_k", 32)),
        quantization=config.get("quantization"),
        raw=config,
    )


def head_dims(args: TextArgs) -> dict[str, int]:
    return {"sliding_attention": args.head_dim, "full_attention": args.global_head_dim}


def kv_heads(args: TextArgs) -> dict[str, int]:
    full = args.num_key_value_heads
    if args.attention_k_eq_v and args.num_global_key_value_heads is not None:
        full = args.num_global_key_value_heads
    return {"sliding_attention": args.num_key_value_heads, "full_attention": full}
