"""From a path or hub id to a ready target, drafter and tokenizer.

Loading is all-or-nothing: every file is read and checked, every tensor name and shape
matched (`strict`), before a model is returned; a failure raises an error naming the file
or field and leaves nothing behind.

`load(path)` gives the target and its tokenizer, as mlx-lm's `load` does; `load_pair(path)` gives
the drafter beside them, the one named or the one found for the target (`find_drafter`): a
pair directory's own (written by `convert`: `target/`, `drafter/` and a manifest), one embedded
in the target's directory, a sibling named `<target>-assistant`, or the hub's `<id>-assistant`.

An embedded assistant, as some community conversions ship one inside the target's directory, is
either a subdirectory holding a complete assistant (its config.json and safetensors), or
`assistant_config.json` beside the target's config.json with its weights in
`assistant*.safetensors` (never read as the target's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .config import (
    DRAFTER_MODEL_TYPES,
    ConfigError,
    drafter_config,
    head_dims,
    kv_heads,
    load_target_config,
    read_json,
)
from .drafter import Drafter
from .quantize import check as check_quantization
from .quantize import quantize
from .target import Target, WeightsError

# What a snapshot of a model repo needs; towers' extra files and other formats are skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
EMBEDDED_CONFIG = "assistant_config.json"
EMBEDDED_WEIGHTS = "assistant*.safetensors"


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


def read_shards(model_dir: Path, embedded: bool = False) -> list[tuple[Path, dict[str, mx.array]]]:
    """Each safetensors file of the checkpoint (the index decides which) with its tensors;
    `embedded`: those of the assistant embedded beside the target (`EMBEDDED_WEIGHTS`) instead.

    The tensors are lazy (`mx.load` reads a tensor's bytes only when it is evaluated), so
    this holds no weights; the files' headers are checked here: a missing shard, a truncated
    or unreadable file, a tensor the index names but no file holds.
    """
    index_path = model_dir / "model.safetensors.index.json"
    if embedded:
        weight_map, files = None, sorted(model_dir.glob(EMBEDDED_WEIGHTS))
        if not files:
            raise WeightsError(f"{model_dir}: {EMBEDDED_CONFIG} but no {EMBEDDED_WEIGHTS} files")
    elif index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index_path}: not a safetensors index with a weight_map ({e!r})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise WeightsError(f"{f} is named by {index_path.name} but missing")
    else:
        weight_map = None
        files = sorted(set(model_dir.glob("*.safetensors")) - set(_embedded_weights(model_dir)))
        if not files:
            raise WeightsError(f"{model_dir}: no *.safetensors files")
    shards = []
    for f in files:
        try:
            shards.append((f, mx.load(str(f))))
        except (RuntimeError, ValueError, OSError) as e:  # what mx.load raises on a bad file
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
    if weight_map is not None:
        held = {name for _, tensors in shards for name in tensors}
        absent = sorted(set(weight_map) - held)
        if absent:
            raise WeightsError(f"{index_path}: tensors missing from their files: {absent[:8]}")
    return shards


def _embedded_weights(model_dir: Path) -> list[Path]:
    """The embedded assistant's files in a target directory that has one, else none."""
    return list(model_dir.glob(EMBEDDED_WEIGHTS)) if (model_dir / EMBEDDED_CONFIG).is_file() else []


def read_safetensors(model_dir: Path, embedded: bool = False) -> dict[str, mx.array]:
    """Every tensor of the checkpoint's safetensors files (lazy, see `read_shards`)."""
    return {name: value for _, tensors in read_shards(model_dir, embedded) for name, value in tensors.items()}


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


DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def as_dtype(dtype) -> mx.Dtype | None:
    """An MLX float dtype from its name or itself (None: the checkpoint's own)."""
    if dtype is None or (isinstance(dtype, mx.Dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or that mlx dtype), got {dtype!r}")


def _fill(model: nn.Module, weights: dict[str, mx.array], where: Path, dtype, evaluate: bool = True) -> None:
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(".scales") else v
            for k, v in weights.items()
        }
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise WeightsError(f"{where}: checkpoint does not fit the model: {e}") from None
    if evaluate:
        mx.eval(
            model.state
        )  # parameters and buffers (rope frequencies): a model made here runs on any thread


def _load_weights(
    model: Target | Drafter,
    model_dir: Path,
    dtype,
    q_bits: int | None,
    q_group_size: int,
    embedded: bool = False,
) -> None:
    """Read, sanitize, quantize as the checkpoint was (or, `q_bits` given, with the converter's
    recipe, in memory), and load strictly: target or drafter (`embedded`: an assistant's files
    beside a target's)."""
    weights = model.sanitize(read_safetensors(model_dir, embedded))
    stored = model.config.quantization
    if stored and q_bits is not None:
        raise ConfigError(
            f"{model_dir} is already quantized ({stored.get('bits')}-bit): load it without quantizing again"
        )
    if stored:
        _quantize(model, stored, weights)
    _fill(model, weights, model_dir, as_dtype(dtype), evaluate=q_bits is None)
    if q_bits is not None:
        quantize(model, q_bits, q_group_size)
        # Layer by layer: one layer's full-precision weights in memory at a time, not the model's.
        for _, value in tree_flatten(model.parameters()):
            mx.eval(value)
        mx.eval(model.state)


def load_target(model_dir: Path, dtype=None, q_bits: int | None = None, q_group_size: int = 64) -> Target:
    model = Target(load_target_config(model_dir))
    _load_weights(model, model_dir, dtype, q_bits, q_group_size)
    return model


def load(
    path_or_id: str | Path, dtype=None, *, q_bits: int | None = None, q_group_size: int = 64
) -> tuple[Target, TokenizerWrapper]:
    """Load a Gemma 4 target and its tokenizer (of a pair directory: its target's).

    `dtype` ("bfloat16", "float16", "float32", or that mlx dtype) casts the unquantized
    weights; default: the checkpoint's own. `q_bits` (4 or 8) with `q_group_size` (32, 64,
    128) quantizes an unquantized checkpoint in memory with the converter's recipe
    (`mlx_gemma_mtp.quantize`), one layer at a time. The drafter is loaded by `load_pair` or
    `load_drafter`.
    """
    as_dtype(dtype)
    if q_bits is not None:
        check_quantization(q_bits, q_group_size)
    model_dir = resolve(path_or_id)
    pair = read_pair(model_dir)
    target_dir = model_dir / pair["target"] if pair else model_dir
    model = load_target(target_dir, dtype, q_bits, q_group_size)
    tokenizer = load_tokenizer(target_dir, eos_token_ids=list(model.config.stop_ids))
    return model, tokenizer


def load_pair(
    path_or_id: str | Path,
    draft_model: str | Path | None = None,
    dtype=None,
    *,
    q_bits: int | None = None,
    q_group_size: int = 64,
) -> tuple[Target, TokenizerWrapper, Drafter | None]:
    """Load a target, its tokenizer and its drafter: `draft_model` when given, else the one
    `find_drafter` finds for `path_or_id` (for a hub id: one embedded in its snapshot, else the
    hub's `<id>-assistant`); None when there is none. The drafter's directory is
    `drafter.source`. dtype and the quantization apply to both (as `load`)."""
    model, tokenizer = load(path_or_id, dtype, q_bits=q_bits, q_group_size=q_group_size)
    if draft_model is None:
        draft_model = pair_drafter(path_or_id)
    if draft_model is None:
        return model, tokenizer, None
    return model, tokenizer, load_drafter(draft_model, model, dtype, q_bits=q_bits, q_group_size=q_group_size)


def pair_drafter(path_or_id: str | Path) -> Path | str | None:
    """The drafter that goes with a target when none is named: `find_drafter`'s for a local
    path; for a hub id, one embedded in its snapshot, else the hub's `<id>-assistant` (returned
    as that id) when it can be had. None when there is none."""
    if Path(path_or_id).expanduser().exists():
        return find_drafter(path_or_id)
    embedded = find_drafter(resolve(path_or_id))
    if embedded is not None:
        return embedded
    assistant = f"{path_or_id}-assistant"  # Google publishes each drafter so
    try:
        resolve(assistant)
    except ConfigError:
        return None
    return assistant


def load_drafter(
    path_or_id: str | Path, model: Target, dtype=None, *, q_bits: int | None = None, q_group_size: int = 64
) -> Drafter:
    """Load the MTP assistant for `model` from a drafter directory, a pair directory (its
    drafter) or a target directory that embeds one; refuses one that does not fit `model`.
    dtype and quantization as `load`."""
    files = locate_drafter(resolve(path_or_id))
    config = drafter_config(read_json(files.config), files.config)
    check_fit(config, model, files.config if files.embedded else files.directory)
    drafter = Drafter(config, source=files.directory)
    _load_weights(drafter, files.directory, dtype, q_bits, q_group_size, files.embedded)
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


# ------------------------------------------------------------------------------------------
# Pair directories

PAIR_MANIFEST = "mlx-gemma-mtp.json"
PAIR_FORMAT = "mlx-gemma-mtp pair"


def read_pair(model_dir: Path) -> dict | None:
    """The manifest of a pair directory ({"target": subdir, "drafter": subdir, ...}), None
    for any other directory."""
    path = model_dir / PAIR_MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    if manifest.get("format") != PAIR_FORMAT:
        raise ConfigError(f"{path}: format {manifest.get('format')!r} is not {PAIR_FORMAT!r}")
    for role in ("target", "drafter"):
        sub = manifest.get(role)
        if not isinstance(sub, str) or Path(sub).name != sub or sub in ("", ".", ".."):
            raise ConfigError(f"{path}: {role} must name a subdirectory, got {sub!r}")
        if not (model_dir / sub).is_dir():
            raise ConfigError(f"{path}: {role} directory {model_dir / sub} is missing")
    return manifest


def find_drafter(path: str | Path) -> Path | None:
    """The drafter directory that goes with a local target or pair directory, or None.

    A pair's `drafter/` (given the pair or its `target/`), else an assistant embedded in the
    target's directory (`embedded_drafter`: the subdirectory, or the target's directory itself
    for `assistant_config.json`), else a sibling named `<target>-assistant`, as Google names
    them (gemma-4-E2B-it, gemma-4-E2B-it-assistant).
    """
    path = Path(path).expanduser()
    for pair_dir in (path, path.parent):
        pair = read_pair(pair_dir) if pair_dir.is_dir() else None
        if pair and (pair_dir == path or path.name == pair["target"]):
            return pair_dir / pair["drafter"]
    embedded = embedded_drafter(path) if path.is_dir() else None
    if embedded is not None:
        return embedded.directory
    sibling = path.parent / f"{path.name}-assistant"
    return sibling if (sibling / "config.json").is_file() else None


@dataclass(frozen=True)
class DrafterFiles:
    """Where a drafter's config and weights are."""

    directory: Path  # its safetensors are here (`drafter.source`)
    config: Path
    embedded: bool  # `EMBEDDED_WEIGHTS` beside a target's files, rather than the directory's own


def locate_drafter(model_dir: Path) -> DrafterFiles:
    """The drafter of a drafter directory, of a pair directory, or embedded in a target's
    directory; raises naming what `model_dir` holds instead."""
    pair = read_pair(model_dir)
    if pair:
        model_dir = model_dir / pair["drafter"]
    config = model_dir / "config.json"
    if _is_assistant_config(config) or not config.is_file():
        return DrafterFiles(directory=model_dir, config=config, embedded=False)  # a missing file raises
    embedded = embedded_drafter(model_dir)
    if embedded is None:
        model_type = read_json(config).get("model_type")
        raise ConfigError(
            f"{config}: model_type {model_type!r} is not a Gemma 4 assistant (expected one of "
            f"{tuple(DRAFTER_MODEL_TYPES)}), and {model_dir} embeds none (no {EMBEDDED_CONFIG}, "
            "no subdirectory with an assistant's config.json)"
        )
    return embedded


def embedded_drafter(target_dir: Path) -> DrafterFiles | None:
    """The assistant shipped inside a target's directory, or None; raises when there are several."""
    found = [
        DrafterFiles(directory=sub, config=sub / "config.json", embedded=False)
        for sub in sorted(p for p in target_dir.iterdir() if p.is_dir())
        if _is_assistant_config(sub / "config.json")
    ]
    if (target_dir / EMBEDDED_CONFIG).is_file():
        found.append(DrafterFiles(directory=target_dir, config=target_dir / EMBEDDED_CONFIG, embedded=True))
    if len(found) > 1:
        raise ConfigError(
            f"{target_dir} embeds several assistants ({', '.join(str(f.config) for f in found)}): "
            "name the one to use"
        )
    return found[0] if found else None


def _is_assistant_config(path: Path) -> bool:
    return path.is_file() and read_json(path).get("model_type") in DRAFTER_MODEL_TYPES
