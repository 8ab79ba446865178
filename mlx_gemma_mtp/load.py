"""From a path or hub id to a ready target, drafter and tokenizer.

Loading is all-or-nothing: every file is read and checked, every tensor name and shape
matched (`strict`), before a model is returned; a failure raises an error naming the file
or field and leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .config import (
    ConfigError,
    head_dims,
    kv_heads,
    load_drafter_config,
    load_target_config,
)
from .drafter import Drafter
from .target import Target, WeightsError

# What a snapshot of a model repo needs; towers' extra files and other formats are skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve(path_or_id: str | Path) -> Path:
    """A local model directory, or a hub repo id fetched (or found in the cache) by
    huggingface_hub, which honours HF_HUB_OFFLINE and HF_HOME."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{path} is a file, not a model directory")
    repo_id = str(path_or_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise ConfigError(f"{path_or_id}: no such model directory (and not a hub repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ConfigError(f"{repo_id}: cannot fetch from the hub or find it in the cache ({e})") from None


def read_safetensors(model_dir: Path) -> dict[str, mx.array]:
    """Every tensor of the checkpoint's safetensors files (the index decides which files)."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise WeightsError(f"{f} is named by {index_path.name} but missing")
    else:
        weight_map = None
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{model_dir}: no *.safetensors files")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:  # what mx.load raises on a bad file
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(weights))
        if absent:
            raise WeightsError(f"{index_path}: tensors missing from their files: {absent[:8]}")
    return weights


def _quantize(model: nn.Module, quantization: dict, weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers where the converted checkpoint stored `.scales`
    (mlx-lm's convention, including per-path overrides in the config's block)."""

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _fill(model: nn.Module, weights: dict[str, mx.array], where: Path, dtype) -> None:
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(".scales") else v
            for k, v in weights.items()
        }
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise WeightsError(f"{where}: checkpoint does not fit the model: {e}") from None
    mx.eval(model.parameters())


def load_target(model_dir: Path, dtype=None) -> Target:
    config = load_target_config(model_dir)
    weights = read_safetensors(model_dir)
    model = Target(config)
    weights = model.sanitize(weights)
    if config.quantization:
        _quantize(model, config.quantization, weights)
    _fill(model, weights, model_dir, dtype)
    return model


def load(path_or_id: str | Path, dtype=None) -> tuple[Target, TokenizerWrapper]:
    """Load a Gemma 4 target and its tokenizer.

    `dtype` (e.g. mx.float32) casts the unquantized weights; default: the checkpoint's own.
    """
    model_dir = resolve(path_or_id)
    model = load_target(model_dir, dtype)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=list(model.config.stop_ids))
    return model, tokenizer


def load_drafter(path_or_id: str | Path, model: Target, dtype=None) -> Drafter:
    """Load the MTP assistant for `model`; refuses one that does not fit it."""
    model_dir = resolve(path_or_id)
    config = load_drafter_config(model_dir)
    check_fit(config, model, model_dir)
    weights = read_safetensors(model_dir)
    drafter = Drafter(config)
    weights = drafter.sanitize(weights)
    if config.quantization:
        _quantize(drafter, config.quantization, weights)
    _fill(drafter, weights, model_dir, dtype)
    return drafter


def check_fit(config, target: Target, where: Path) -> None:
    """The drafter reads the target's K/V and embeddings: their shapes must agree."""
    t, d = target.args, config.text
    problems = []

    def compare(field: str, drafter_value, target_value):
        if drafter_value != target_value:
            problems.append(f"{field} {drafter_value} does not match target {target_value}")

    compare("backbone_hidden_size", config.backbone_hidden_size, t.hidden_size)
    compare("vocab_size", d.vocab_size, t.vocab_size)
    compare("head dims (sliding/full)", head_dims(d), head_dims(t))
    compare("kv heads (sliding/full)", kv_heads(d), kv_heads(t))
    missing = sorted(set(d.layer_types) - set(target.kv_producers))
    if missing:
        problems.append(f"layer_types {missing} have no K/V-producing layer in the target")
    if "sliding_attention" in d.layer_types:
        compare("sliding_window", d.sliding_window, t.sliding_window)
    if problems:
        raise ConfigError(f"drafter does not fit the target ({where}): " + "; ".join(problems))
