"""Load + sanitize + quantize + save, one tensor at a time.

A conversion reads each checkpoint lazily (`mx.load` reads a tensor's bytes only when it is
evaluated), maps every tensor through the runtime's own `sanitize` (the class `load` uses),
checks the result against the model's parameter names and shapes, and only then writes:
each output tensor is cast, quantized with the runtime's recipe (`mlx_gemma_mtp.quantize`)
and evaluated in turn, and written once its output shard is full. What is resident at any
time is one output shard plus the tensor in flight, whatever the size of the model.

Everything is written into a temporary directory beside the output and renamed into place at
the end; config.json files come last, so an interrupted conversion leaves nothing that loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp.config import drafter_config, load_target_config, placeholder_fields, read_json
from mlx_gemma_mtp.drafter import Drafter
from mlx_gemma_mtp.load import (
    PAIR_FORMAT,
    PAIR_MANIFEST,
    check_fit,
    embedded_drafter,
    locate_drafter,
    read_shards,
    resolve,
)
from mlx_gemma_mtp.quantize import config_block, layer_recipe, quantize_weight
from mlx_gemma_mtp.target import Target, WeightsError

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's limit per safetensors file
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)
# Files other than weights and config.json that a converted directory carries over.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Text-config fields written as the runtime resolved them (see `_hub_spelling`).
RESOLVED_FIELDS = (
    "hidden_size_per_layer_input",
    "vocab_size_per_layer_input",
    "enable_moe_block",
    "num_kv_shared_layers",
    "use_double_wide_mlp",
)


class ConvertError(ValueError):
    """Input or output the converter refuses, with the file and field named."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantization:
    bits: int
    group_size: int


@dataclasses.dataclass
class Group:
    """The output tensors made from one input tensor (a quantized layer: weight, scales, biases)."""

    read_bytes: int  # the input tensor's size on disk
    arrays: dict[str, mx.array]  # lazy until written


@dataclasses.dataclass
class Plan:
    """One checkpoint, checked and ready to write; holds no weights (its arrays are lazy)."""

    role: str  # "target" or "drafter"
    name: str  # as the user gave it: hub id or path
    source: Path
    config: dict  # the config.json to write
    groups: list[Group]
    files_read: int
    read: tuple[int, int]  # (tensors, bytes) in the checkpoint
    dropped: Counter  # tensor family -> count
    dropped_bytes: int
    unquantized: int  # layers the recipe keeps unquantized (centroids, widths the group does not divide)
    embedded: bool = False  # an assistant embedded beside its target: the side files are the target's


def convert(
    target: str | Path | None = None,
    drafter: str | Path | None = None,
    out: str | Path | None = None,
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | mx.Dtype | None = None,
    force: bool = False,
    quiet: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_shard: Callable[[Path], None] | None = None,
) -> Path:
    """Convert a Hugging Face Gemma 4 target, its MTP drafter, or both into MLX at `out`.

    `target`/`drafter`: a local directory or a hub repo id (huggingface_hub, which honours its
    cache and HF_HUB_OFFLINE). With both, `out` is a pair directory (`target/`, `drafter/`,
    `mlx-gemma-mtp.json`) that `load(out)` opens with the drafter attached; with one, `out` is
    that model's directory. `quantize`: `q_bits` (4 or 8) with `q_group_size` (32, 64, 128),
    per the recipe in `mlx_gemma_mtp.quantize`; `dtype` (bfloat16, float16, float32) for what
    is not quantized, default the checkpoint's own. Output safetensors files hold at most
    `max_shard_bytes` each (a larger single tensor gets a file of its own). `out` must be absent
    or empty unless `force`. `on_shard(path)` is called after each weights file is written.
    Returns `out`; raises ConfigError / WeightsError / ConvertError (all ValueError) naming
    the file and field, before anything is written where possible and leaving `out` untouched.
    """
    if target is None and drafter is None:
        raise ConvertError("nothing to convert: give a target, a drafter or both")
    if out is None:
        raise ConvertError("no output directory given")
    out = Path(out).expanduser()
    quant = _quantization(quantize, q_bits, q_group_size)
    cast = _dtype(dtype)
    if max_shard_bytes <= 0:
        raise ConvertError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    _check_output(out, force)
    say = (lambda *a: None) if quiet else print

    plans = _plans(target, drafter, quant, cast, say)
    for plan in plans:
        _check_not_inside(out, plan.source)

    pair = len(plans) == 2
    with _staging(out, force) as staging:
        dests = {plan.role: staging / plan.role if pair else staging for plan in plans}
        for plan in plans:
            _report_input(plan, say)
            _write_weights(plan, dests[plan.role], max_shard_bytes, quiet, say, on_shard)
        # Configs last: until they exist, no directory in the staging area loads.
        for plan in plans:
            _write_configs(plan, dests[plan.role])
        if pair:
            manifest = {
                "format": PAIR_FORMAT,
                "target": "target",
                "drafter": "drafter",
                "sources": {plan.role: plan.name for plan in plans},
                "quantization": dataclasses.asdict(quant) if quant else None,
            }
            (staging / PAIR_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"wrote {out}")
    return out


def _plans(target, drafter, quant, cast, say) -> list:
    """What to convert: the target's plan, then the drafter's (checked against that target)."""
    plans = []
    target_model = None
    if target is not None:
        path = resolve(target)
        target_model = Target(load_target_config(path))  # lazy: shapes, names, the recipe
        _check_source("target", path, target_model)
        plans.append(_plan("target", str(target), path, target_model, read_shards(path), quant, cast))
        if drafter is None and (embedded := embedded_drafter(path)) is not None:
            say(f"note: {path} embeds an assistant ({embedded.config}); give it as the drafter to convert it")
    if drafter is not None:
        plans.append(_drafter_plan(drafter, target_model, quant, cast))
    return plans


# ------------------------------------------------------------------------------------------
# Arguments and output directory


def _quantization(quantize: bool, bits: int, group_size: int) -> Quantization | None:
    if not quantize:
        return None
    if bits not in Q_BITS:
        raise ConvertError(f"q_bits must be one of {Q_BITS}, got {bits!r}")
    if group_size not in Q_GROUP_SIZES:
        raise ConvertError(f"q_group_size must be one of {Q_GROUP_SIZES}, got {group_size!r}")
    return Quantization(bits=bits, group_size=group_size)


def _dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None:
        return None
    chosen = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if chosen not in DTYPES.values():
        raise ConvertError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return chosen


def _check_output(out: Path, force: bool) -> None:
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists() and not force:
        what = "exists and is not empty" if out.is_dir() else "is a file, not a directory"
        raise ConvertError(f"--out {out} {what}; pass --force to replace it")


def _check_not_inside(out: Path, source: Path) -> None:
    """Replacing `out` must not delete the checkpoint being read."""
    out, source = out.resolve(), source.resolve()
    if out == source or out in source.parents:
        raise ConvertError(f"output {out} would replace the input {source}")


@contextlib.contextmanager
def _staging(out: Path, force: bool) -> Iterator[Path]:
    """A fresh directory beside `out`, renamed to `out` if the block completes, removed if not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = out.parent / f".{out.name}.converting-{os.getpid()}-{secrets.token_hex(3)}"
    staging.mkdir()
    try:
        yield staging
        _check_output(out, force)  # it may have appeared meanwhile
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.replaced-{secrets.token_hex(3)}"
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except BaseException:  # KeyboardInterrupt too: a failed conversion leaves nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_abandoned(out: Path) -> None:
    """Staging directories of earlier conversions to `out` whose process is gone (killed)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.converting-*"):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.converting-(\d+)-[0-9a-f]+", path.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------
# Planning: every check before the first byte is written


def _check_source(role: str, source: Path, model) -> None:
    raw_config = model.config.raw
    if raw_config.get("quantization") or raw_config.get("quantization_config"):
        raise ConvertError(
            f"{source / 'config.json'}: quantization is set: this checkpoint is already "
            "converted or quantized; convert from the original Hugging Face checkpoint"
        )
    if role == "target" and not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise ConvertError(f"{source}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def _drafter_plan(name: str | Path, target: Target | None, quant: Quantization | None, cast) -> Plan:
    """The plan of a drafter directory, a pair's drafter or an assistant embedded in a target's
    directory (`locate_drafter`), checked against `target` when there is one."""
    files = locate_drafter(resolve(name))
    config = drafter_config(read_json(files.config), files.config)
    if target is not None:
        check_fit(config, target, files.config)
    model = Drafter(config)
    _check_source("drafter", files.directory, model)
    shards = read_shards(files.directory, files.embedded)
    plan = _plan("drafter", str(name), files.directory, model, shards, quant, cast)
    return dataclasses.replace(plan, embedded=files.embedded)


def _plan(
    role: str,
    name: str,
    source: Path,
    model,
    shards: list[tuple[Path, dict[str, mx.array]]],
    quant: Quantization | None,
    cast,
) -> Plan:
    """Map, check and lay out one checkpoint's tensors (`shards`: lazy, from `read_shards`)
    for the lazily built `model`, reading no weights."""
    expected = {name: value.shape for name, value in model.checkpoint_weights().items()}
    recipe = layer_recipe(model, quant.bits, quant.group_size) if quant else {}
    groups, produced = [], {}
    dropped, dropped_bytes, read_count, read_bytes = Counter(), 0, 0, 0
    for file, tensors in shards:
        for tensor_name, value in tensors.items():
            read_count += 1
            read_bytes += value.nbytes
            mapped = model.sanitize({tensor_name: value})  # maps each tensor on its own
            if not mapped:
                dropped[_family(tensor_name)] += 1
                dropped_bytes += value.nbytes
                continue
            for key, array in mapped.items():
                _check_tensor(key, array, expected, file, produced)
                produced[key] = file
            groups.append(Group(value.nbytes, _output(mapped, recipe, cast)))
    missing = sorted(set(expected) - set(produced))
    if missing:
        raise WeightsError(f"{source}: tensors the model needs are in no file: {missing[:8]}")
    layers = [path for path, module in model.named_modules() if hasattr(module, "to_quantized")]
    block = config_block(quant.bits, quant.group_size, recipe) if quant else None
    return Plan(
        role=role,
        name=name,
        source=source,
        config=_output_config(role, model, block),
        groups=groups,
        files_read=len(shards),
        read=(read_count, read_bytes),
        dropped=dropped,
        dropped_bytes=dropped_bytes,
        unquantized=len(set(layers) - set(recipe)) if quant else 0,
    )


def _check_tensor(key: str, array: mx.array, expected: dict, file: Path, produced: dict) -> None:
    if key not in expected:
        raise WeightsError(f"{file}: tensor {key} is not a parameter of the model config.json describes")
    if key in produced:
        raise WeightsError(f"{file}: tensor {key} also comes from {produced[key]}")
    if tuple(array.shape) != tuple(expected[key]):
        raise WeightsError(
            f"{file}: tensor {key} has shape {tuple(array.shape)}, config.json implies {tuple(expected[key])}"
        )


def _output(mapped: dict[str, mx.array], recipe: dict[str, dict], cast) -> dict[str, mx.array]:
    """Cast floating tensors to `cast`, then quantize the layers the recipe names (lazy)."""
    arrays = {}
    for key, value in mapped.items():
        if cast is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(cast)
        layer = key.removesuffix(".weight")
        if layer in recipe and key.endswith(".weight"):
            weight, scales, biases = quantize_weight(value, recipe[layer])
            arrays.update({key: weight, f"{layer}.scales": scales, f"{layer}.biases": biases})
        else:
            arrays[key] = value
    return arrays


def _family(name: str) -> str:
    """A dropped tensor's family for the report: the tower, or the per-layer name pattern."""
    bare = re.sub(r"^(model\.language_model\.|language_model\.model\.|model\.)", "", name)
    if not bare.startswith("layers."):
        return bare.split(".")[0]
    return re.sub(r"^layers\.\d+\.", "layers.*.", bare)


def _output_config(role: str, model, quantization: dict | None) -> dict:
    """The config.json to write: the Hub spelling mlx-lm reads, the quantization block.

    A target becomes text-only `gemma4_text` (`model.*` keys, mlx-lm's layout for it): its
    towers are gone, so the multimodal wrapper's config would describe weights that are not
    there. transformers' `per_layer_config` is folded into `global_head_dim` /
    `num_global_key_value_heads`, the only spelling mlx-lm 0.32 reads.
    """
    config = model.config
    args = config.text
    if role == "target":
        text = dict(config.raw["text_config"]) if config.multimodal else dict(config.raw)
        out = _hub_spelling(text, args)
        if config.multimodal:  # the runtime embeds them as <pad>, as the multimodal model does
            out.update(placeholder_fields(config.raw, multimodal=True))
        out.update(
            model_type="gemma4_text",
            architectures=["Gemma4ForCausalLM"],
            eos_token_id=list(config.stop_ids),
        )
    else:
        out = dict(config.raw)
        out["text_config"] = _hub_spelling(dict(config.raw.get("text_config") or {}), args)
    for key in ("dtype", "torch_dtype", "_name_or_path"):
        out.pop(key, None)
    if quantization:
        out["quantization"] = quantization
        out["quantization_config"] = quantization  # mlx-lm writes both
    return dict(sorted(out.items()))


def _hub_spelling(text: dict, args) -> dict:
    text.pop("per_layer_config", None)
    text["global_head_dim"] = args.global_head_dim
    text["num_global_key_value_heads"] = args.num_global_key_value_heads
    # As resolved: a 12B (`gemma4_unified_text`) config omits them, and as `gemma4_text` it
    # would get mlx-lm's defaults, E2B's per-layer inputs and KV sharing.
    for field in RESOLVED_FIELDS:
        text[field] = getattr(args, field)
    return text


# ------------------------------------------------------------------------------------------
# Writing


def _shards(groups: list[Group], max_bytes: int) -> list[list[Group]]:
    """Consecutive groups per file, at most `max_bytes` each; a quantized layer's weight,
    scales and biases stay together."""
    shards: list[list[Group]] = []
    size = 0
    for group in groups:
        nbytes = sum(a.nbytes for a in group.arrays.values())
        if not shards or (size + nbytes > max_bytes and size > 0):
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += nbytes
    return shards


def _write_weights(plan: Plan, dest: Path, max_bytes: int, quiet: bool, say, on_shard) -> None:
    from tqdm.auto import tqdm  # a dependency of huggingface_hub

    dest.mkdir(parents=True, exist_ok=True)
    shards = _shards(plan.groups, max_bytes)
    plan.groups = []  # the shards own the groups now: each is freed once written
    total = sum(g.read_bytes for shard in shards for g in shard)
    n = len(shards)  # mlx-lm's file names
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    names = names if n > 1 else ["model.safetensors"]
    weight_map, written, count = {}, 0, 0
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=plan.role, disable=quiet)
    with bar:
        for i, name in enumerate(names):
            tensors = {}
            for group in shards[i]:
                mx.eval(*group.arrays.values())
                tensors.update(group.arrays)
                bar.update(group.read_bytes)
            shards[i] = None
            mx.save_safetensors(str(dest / name), tensors, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(tensors, name))
            written += sum(a.nbytes for a in tensors.values())
            count += len(tensors)
            del tensors
            mx.clear_cache()
            if on_shard is not None:
                on_shard(dest / name)
    index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    quant = plan.config.get("quantization")
    how = f"{quant['bits']}-bit, group {quant['group_size']}" if quant else "unquantized"
    if quant and plan.unquantized:
        how += f" ({plan.unquantized} layers kept unquantized by the recipe)"
    say(f"  wrote   {count:>6,} tensors {_gb(written)}  {how}, {len(names)} file(s)")


def _write_configs(plan: Plan, dest: Path) -> None:
    for name in () if plan.embedded else SIDE_FILES:
        if (plan.source / name).is_file():
            shutil.copyfile(plan.source / name, dest / name)  # follows the hub cache's symlinks
    (dest / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")


def _report_input(plan: Plan, say) -> None:
    count, nbytes = plan.read
    dropped = sum(plan.dropped.values())
    say(f"{plan.role} {plan.name} ({plan.source})")
    say(f"  read    {count:>6,} tensors {_gb(nbytes)}  from {plan.files_read} file(s)")
    say(f"  kept    {count - dropped:>6,} tensors {_gb(nbytes - plan.dropped_bytes)}")
    if dropped:
        families = ", ".join(f"{family} {n}" for family, n in plan.dropped.most_common())
        say(f"  dropped {dropped:>6,} tensors {_gb(plan.dropped_bytes)}  {families}")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:8.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:8.2f} MB"
