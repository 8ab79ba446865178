"""The converter: Hugging Face checkpoints -> MLX directories that `load` and mlx-lm read.

Invariants: a converted checkpoint holds exactly the tensors the in-memory path (`load` of the
Hugging Face files, then `quantize`) builds, bit for bit; it generates the same tokens through
our loop, speculative and plain, and through mlx-lm; bad input or an interrupted run leaves
the output path as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import convert as convert_pkg
from convert import convert
from mlx_gemma_mtp import load, load_drafter, load_pair, stream_generate
from mlx_gemma_mtp.config import ConfigError
from mlx_gemma_mtp.load import PAIR_MANIFEST, find_drafter
from mlx_gemma_mtp.quantize import quantize
from tests.fixtures import KINDS, VOCAB_SIZE

REPO = Path(__file__).resolve().parents[1]
# name -> convert() arguments. Fixture widths are 64 (the MoE experts' 32): group 64 leaves
# the 32-wide layers unquantized, group 32 quantizes them.
VARIANTS = {
    "bf16": {"dtype": "bfloat16"},
    "8bit": {"quantize": True, "q_bits": 8, "q_group_size": 64},
    "4bit": {"quantize": True, "q_bits": 4, "q_group_size": 32},
}
PROMPT = [2] + list(range(10, 10 + 29))  # BOS + 29 tokens: past the sliding window (8) several times
NEW_TOKENS = 24
DRAFTS = 3  # a fixed draft length: acceptance rates comparable across runs


def _params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def _in_memory(hf_dirs: tuple[Path, Path], variant: str):
    """(target, drafter) as the runtime builds them from the Hugging Face files, no converter."""
    args = VARIANTS[variant]
    dtype = mx.bfloat16 if args.get("dtype") == "bfloat16" else None
    model, _ = load(hf_dirs[0], dtype=dtype)
    drafter = load_drafter(hf_dirs[1], model, dtype=dtype)
    if args.get("quantize"):
        for m in (model, drafter):
            quantize(m, args["q_bits"], args["q_group_size"])
    return model, drafter


def _greedy(model, tokenizer, drafter=None) -> list[int]:
    responses = stream_generate(
        model, tokenizer, PROMPT, NEW_TOKENS, draft_model=drafter, num_draft_tokens=DRAFTS
    )
    return [r.token for r in responses]


def _mlx_lm_greedy(path: Path) -> list[int]:
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, _ = mlx_lm.load(str(path))
    steps = generate_step(mx.array(PROMPT), model, max_tokens=NEW_TOKENS)
    return [int(token) for token, _ in steps]


def _listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    """{(kind, variant): pair directory}, each converted once."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for kind in KINDS:
        for variant, args in VARIANTS.items():
            target_dir, drafter_dir = checkpoints[kind]
            pair = root / f"{kind}-{variant}"
            out[kind, variant] = convert(target_dir, drafter_dir, pair, quiet=True, **args)
    return out


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, variant, converted, checkpoints):
    pair = converted[kind, variant]
    model, tokenizer, drafter = load_pair(pair)
    assert drafter.source == pair / "drafter" and find_drafter(pair) == pair / "drafter"

    # Bit for bit what the in-memory path builds: one recipe, one sanitize.
    for converted_model, reference in zip((model, drafter), _in_memory(checkpoints[kind], variant)):
        ours, theirs = _params(converted_model), _params(reference)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and mx.array_equal(ours[key], theirs[key]), key

    if kind == "moe" and variant == "bf16" and mx.default_device() == mx.cpu:
        return  # MLX's CPU gather_mm (unquantized experts) runs float32 only (mlx 0.32.4)
    plain = _greedy(model, tokenizer)
    assert _greedy(model, tokenizer, drafter) == plain
    assert _mlx_lm_greedy(pair / "target")[: len(plain)] == plain  # mlx-lm reads the target as is


def test_output_layout(converted):
    pair = converted["moe", "4bit"]
    manifest = json.loads((pair / PAIR_MANIFEST).read_text())
    assert manifest["target"] == "target" and manifest["drafter"] == "drafter"
    config = json.loads((pair / "target" / "config.json").read_text())
    # mlx-lm's spelling: text-only, global_* fields rather than transformers' per_layer_config.
    assert config["model_type"] == "gemma4_text" and "per_layer_config" not in config
    assert config["global_head_dim"] == 32 and config["eos_token_id"] == [1, 106]
    quant = config["quantization"]
    assert (quant["bits"], quant["group_size"], quant["mode"]) == (4, 32, "affine")
    routers = {k: v for k, v in quant.items() if k.endswith("router.proj")}
    assert routers and all(v["bits"] == 8 for v in routers.values())
    for role in ("target", "drafter"):
        files = {p.name for p in (pair / role).iterdir()}
        side = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}
        assert side <= files
        index = json.loads((pair / role / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {"model.safetensors"}
    index = json.loads((pair / "target" / "model.safetensors.index.json").read_text())
    assert not [k for k in index["weight_map"] if "vision" in k or "audio" in k]

    e2b = converted["e2b", "4bit"] / "drafter"
    weights = mx.load(str(e2b / "model.safetensors"))
    assert weights["masked_embedding.token_ordering"].dtype == mx.int32
    assert "masked_embedding.centroids.scales" not in weights  # centroids stay unquantized
    assert "model.embed_tokens.scales" in weights


def test_lone_target_and_sibling_drafter(checkpoints, tmp_path, capsys):
    target_dir, drafter_dir = checkpoints["e2b"]
    out = convert(target_dir, out=tmp_path / "gemma-tiny")
    model, _, none = load_pair(out)
    assert none is None and find_drafter(out) is None
    report = capsys.readouterr().out
    names = mx.load(str(target_dir / "model.safetensors"))
    families = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")
    towers = [n for n in names if n.split(".")[1] in families]
    audio = sum(".audio_tower." in n for n in names)
    assert audio and f"dropped {len(towers):>6,} tensors" in report and f"audio_tower {audio}" in report

    convert(drafter=drafter_dir, out=tmp_path / "gemma-tiny-assistant", quiet=True)
    assert find_drafter(out) == tmp_path / "gemma-tiny-assistant"
    drafter = load_pair(out)[2]
    assert drafter.source == tmp_path / "gemma-tiny-assistant"
    assert len(_params(model)) == len(_params(load(out)[0]))


def test_mlx_lm_flags(checkpoints, tmp_path, capsys):
    """mlx_lm.convert's spelling: --hf-path (a target brings the drafter load_pair would find,
    a drafter comes alone), --mlx-path, -q."""
    root = tmp_path / "models"
    target = shutil.copytree(checkpoints["e2b"][0], root / "tiny-it")
    assistant = shutil.copytree(checkpoints["e2b"][1], root / "tiny-it-assistant")
    out = tmp_path / "pair"
    assert convert_pkg.main(["--hf-path", str(target), "--mlx-path", str(out), "-q", "--q-bits", "8"]) == 0
    assert f"drafter: {assistant}, found for {target}" in capsys.readouterr().out
    model, _, drafter = load_pair(out)
    assert drafter.source == out / "drafter" and model.config.quantization["bits"] == 8

    assert convert_pkg.main(["--hf-path", str(assistant), "--mlx-path", str(tmp_path / "alone")]) == 0
    assert load_drafter(tmp_path / "alone", model).source == tmp_path / "alone"
    lone = shutil.copytree(checkpoints["dense"][0], root / "lone")
    assert convert_pkg.main(["--hf-path", str(lone), "-o", str(tmp_path / "lone")]) == 0
    assert f"no drafter found for {lone}: converting the target alone" in capsys.readouterr().out
    assert load_pair(tmp_path / "lone")[2] is None
    with pytest.raises(SystemExit):
        convert_pkg.main(["--hf-path", str(target), "--target", str(target), "--out", str(tmp_path / "x")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_flag_errors_name_the_flag_and_value(checkpoints, tmp_path, capsys):
    args = ["--target", str(checkpoints["dense"][0]), "--quiet", "--out"]
    for size in ("-1", "0", "nan", "1e-12", "big"):
        with pytest.raises(SystemExit):
            convert_pkg.main([*args, str(tmp_path / "out"), "--max-shard-gb", size])
        err = capsys.readouterr().err
        assert f"argument --max-shard-gb: must be a positive size in GiB, got '{size}'" in err
    empty = tmp_path / "empty"
    empty.write_text("")
    assert convert_pkg.main([*args, str(empty)]) == 1
    assert f"error: --out {empty} is a file, not a directory; pass --force" in capsys.readouterr().err
    assert empty.read_text() == "" and not (tmp_path / "out").exists()


def test_pair_manifest_is_checked(converted, tmp_path):
    pair = Path(shutil.copytree(converted["dense", "bf16"], tmp_path / "pair"))
    manifest = json.loads((pair / PAIR_MANIFEST).read_text())
    for change, message in (
        ({"drafter": "../elsewhere"}, "mlx-gemma-mtp.json: drafter must name a subdirectory, got '.."),
        ({"target": "missing"}, "mlx-gemma-mtp.json: target directory .*/missing is missing"),
        ({"format": "other"}, "mlx-gemma-mtp.json: format 'other' is not"),
    ):
        (pair / PAIR_MANIFEST).write_text(json.dumps(manifest | change))
        with pytest.raises(ConfigError, match=message):
            load(pair)


def _reshard(src: Path, dst: Path, files: int, extra: dict[str, mx.array] | None = None) -> None:
    """Copy a checkpoint, its tensors spread over `files` safetensors files with an index."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {**mx.load(str(src / "model.safetensors")), **(extra or {})}
    names = sorted(tensors)
    weight_map = {}
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::files]}
        mx.save_safetensors(str(dst / name), part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def test_many_shards_in_and_out(checkpoints, tmp_path, capsys):
    """Sharded input (with the KV-shared layers' k/v Google's E2B files keep), many output
    files under a small limit: the same model as the one-file conversion."""
    target_dir, _ = checkpoints["e2b"]
    shared_kv = {  # layers 4 and 5 of the e2b fixture read layers 2 and 3's K/V
        f"model.language_model.layers.{i}.self_attn.{p}.weight": mx.zeros(shape)
        for i in (4, 5)
        for p, shape in (("k_proj", (16, 64)), ("v_proj", (16, 64)), ("k_norm", (16,)))
    }
    _reshard(target_dir, tmp_path / "sharded", files=7, extra=shared_kv)
    limit = 20_000
    out = convert(tmp_path / "sharded", out=tmp_path / "out", quantize=True, max_shard_bytes=limit)
    report = capsys.readouterr().out
    assert "from 7 file(s)" in report
    assert "layers.*.self_attn.k_proj.weight 2" in report and "layers.*.self_attn.k_norm.weight 2" in report

    files = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) > 5 and set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:
        tensors = mx.load(str(f))
        assert f.stat().st_size <= limit + 4096 or len({k.rsplit(".", 1)[0] for k in tensors}) == 1
        assert all(index["weight_map"][k] == f.name for k in tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for f in files for v in mx.load(str(f)).values())

    single = convert(target_dir, out=tmp_path / "single", quantize=True, quiet=True)
    a, b = _params(load(out)[0]), _params(load(single)[0])
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["E2B", "26B-A4B"])
def test_full_size_plans(name):
    """The real layouts planned lazily (nothing allocated): what is dropped and kept
    unquantized, and the output sizes (README, Converting)."""
    from convert.pipeline import Quantization, _plan
    from mlx_gemma_mtp.config import drafter_config, target_config
    from mlx_gemma_mtp.drafter import Drafter
    from mlx_gemma_mtp.target import Target
    from tests.test_shapes import CONFIGS, TABLE, _hf_drafter_shapes, _hf_target_shapes, _lazy

    row = TABLE[name]

    def config(suffix: str) -> dict:
        return json.loads((CONFIGS / f"gemma-4-{name}-it{suffix}.json").read_text())

    target = Target(target_config(config(""), CONFIGS, ()))
    drafter = Drafter(drafter_config(config("-assistant"), CONFIGS))
    sizes = []
    for bits, group in ((None, None), (8, 64), (4, 64), (4, 128)):
        quant = bits and Quantization(bits=bits, group_size=group)
        plans = [
            _plan(role, name, CONFIGS, model, [(CONFIGS / "model.safetensors", _lazy(shapes))], quant, None)
            for role, model, shapes in (
                ("target", target, _hf_target_shapes(row)),
                ("drafter", drafter, _hf_drafter_shapes(row)),
            )
        ]
        gb = [sum(a.nbytes for g in plan.groups for a in g.arrays.values()) / 1e9 for plan in plans]
        label = f"{bits}-bit g{group}" if bits else "bf16"
        sizes.append(f"{label}: target {gb[0]:.2f} GB, drafter {gb[1]:.3f} GB")
        if bits:  # by the recipe: the centroids; at group 128, 26B's expert (704) and dense (2112) down_proj
            narrow = 2 * row.layers if name == "26B-A4B" and group == 128 else 0
            assert [plan.unquantized for plan in plans] == [narrow, int(row.drafter[3])]
        shared_kv = {f"layers.*.self_attn.{p}.weight": row.shared for p in ("k_proj", "v_proj", "k_norm")}
        assert plans[0].dropped == Counter({"vision_tower": 1, **(shared_kv if row.shared else {})})
    print(f"\n{name}: " + "; ".join(sizes))
    assert mx.get_active_memory() < 2**30, "planning allocated weights"


# --------------------------------------------------------------------------------------------
# Hub ids, offline


def _fake_hub_repo(cache: Path, repo_id: str, src: Path) -> None:
    """huggingface_hub's cache layout: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_from_an_offline_cache(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf" / "hub"
    _fake_hub_repo(cache, "tiny-org/gemma-tiny-it", checkpoints["dense"][0])
    _fake_hub_repo(cache, "tiny-org/gemma-tiny-it-assistant", checkpoints["dense"][1])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import, which has happened: set what it read too.
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)

    out = convert("tiny-org/gemma-tiny-it", "tiny-org/gemma-tiny-it-assistant", tmp_path / "pair", quiet=True)
    model, tokenizer, drafter = load_pair(out)
    assert json.loads((out / PAIR_MANIFEST).read_text())["sources"]["target"] == "tiny-org/gemma-tiny-it"
    assert not (out / "target" / "config.json").is_symlink()
    reference, _ = load(checkpoints["dense"][0])
    assert _greedy(model, tokenizer, drafter) == _greedy(reference, tokenizer)

    # mlx-lm's --hf-path with a hub id finds the hub's '<id>-assistant'.
    assert (
        convert_pkg.main(["--hf-path", "tiny-org/gemma-tiny-it", "-o", str(tmp_path / "p2"), "--quiet"]) == 0
    )
    sources = json.loads((tmp_path / "p2" / PAIR_MANIFEST).read_text())["sources"]
    assert sources == {"target": "tiny-org/gemma-tiny-it", "drafter": "tiny-org/gemma-tiny-it-assistant"}

    with pytest.raises(ConfigError, match="tiny-org/not-cached: cannot fetch from the hub or find it in"):
        convert("tiny-org/not-cached", out=tmp_path / "nothing", quiet=True)
    assert not (tmp_path / "nothing").exists()


# --------------------------------------------------------------------------------------------
# Bad input: a message naming the file and field, exit 1, the output path untouched


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _bad_inputs(checkpoints, tmp: Path):
    """(argv, message pattern) per bad input, each with its broken copy of a checkpoint."""
    dense_t, dense_d = checkpoints["dense"]

    missing = tmp / "missing-shard"
    _reshard(dense_t, missing, files=3)
    (missing / "model-00002-of-00003.safetensors").unlink()

    truncated = _copy(dense_t, tmp / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])

    llama = _copy(dense_t, tmp / "llama")
    _edit_config(llama, model_type="llama")

    wide = _copy(dense_d, tmp / "wide-drafter")
    _edit_config(wide, backbone_hidden_size=96)

    narrow = _copy(dense_t, tmp / "narrow")
    _edit_config(narrow, intermediate_size=96)

    quantized = _copy(dense_t, tmp / "quantized")
    _edit_config(quantized, quantization={"group_size": 64, "bits": 4})

    return [
        (
            ["--target", missing],
            r"missing-shard/model-00002-of-00003.safetensors is named by "
            r"model.safetensors.index.json but missing",
        ),
        (
            ["--target", truncated],
            r"truncated/model.safetensors: not a readable safetensors file "
            r".*Tensor '[\w.]+' invalid data offsets",
        ),
        (["--target", llama], r"llama/config.json: model_type 'llama' is not a Gemma 4 target"),
        (
            ["--target", dense_t, "--drafter", wide],
            r"drafter does not fit the target \(.*wide-drafter/config.json\): "
            r"backbone_hidden_size 96 does not match target 64",
        ),
        (
            ["--target", narrow],
            r"narrow/model.safetensors: tensor model.layers.\d+.mlp.\w+_proj.weight "
            r"has shape \((128, 64|64, 128)\), config.json implies \((96, 64|64, 96)\)",
        ),
        (["--target", quantized], r"quantized/config.json: quantization is set"),
        (["--drafter", tmp / "nowhere"], r"nowhere: no such model directory"),
    ]


def test_bad_input_leaves_the_output_untouched(checkpoints, tmp_path, capsys):
    cases = _bad_inputs(checkpoints, tmp_path)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    for argv, pattern in cases:
        for out, force in ((tmp_path / "fresh", []), (existing, ["--force"])):
            before = _listing(existing)
            assert convert_pkg.main([*map(str, argv), "--out", str(out), "--quiet", *force]) == 1, pattern
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and "error: " in err, err
            assert re.search(pattern, err), err
            assert not (tmp_path / "fresh").exists() and _listing(existing) == before, pattern
            assert _beside(out) == [], pattern


def test_output_refused_unless_forced(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--target", str(checkpoints["dense"][0]), "--out", str(out), "--quiet"]
    out.mkdir()
    assert convert_pkg.main(args) == 0  # an empty directory is fine
    before = _listing(out)
    assert convert_pkg.main([*args, "--dtype", "float16"]) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err and _listing(out) == before
    assert convert_pkg.main([*args, "--dtype", "float16", "--force"]) == 0
    assert load(out)[0].model.norm.weight.dtype == mx.float16 and _beside(out) == []
    # Replacing the checkpoint being read is refused even with --force.
    assert convert_pkg.main(["--target", str(out), "--out", str(out), "--force", "--quiet"]) == 1
    assert "would replace the input" in capsys.readouterr().err and load(out)
    with pytest.raises(SystemExit):
        convert_pkg.main(["--out", str(tmp_path / "x")])  # neither --target nor --drafter
    with pytest.raises(SystemExit):
        convert_pkg.main([*args, "--q-bits", "3"])


# --------------------------------------------------------------------------------------------
# Interrupted conversions


SLOW_CONVERSION = """
import sys, time
from convert import convert

written = 0

def slow(path):
    global written
    written += 1
    print("shard", path.name, flush=True)
    # From the third shard on it waits for the test's signal (a loaded machine could otherwise
    # let one conversion finish while the test deals with the other).
    time.sleep(0.3 if written < 3 else 60)

convert(sys.argv[1], sys.argv[2], sys.argv[3], quantize=True, max_shard_bytes=4096, quiet=True, on_shard=slow)
"""


def _start(args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERSION, *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_interrupted_conversion_leaves_nothing_that_loads(checkpoints, tmp_path):
    target_dir, drafter_dir = checkpoints["e2b"]
    killed, interrupted = tmp_path / "killed", tmp_path / "interrupted"
    procs = {out: _start([target_dir, drafter_dir, out]) for out in (killed, interrupted)}  # both at once
    for out, sig in ((killed, signal.SIGKILL), (interrupted, signal.SIGINT)):
        proc = procs[out]
        lines = [proc.stdout.readline() for _ in range(3)]  # three shards written, many to go
        assert all(line.startswith("shard") for line in lines), (lines, proc.stderr.read())
        proc.send_signal(sig)
        assert proc.wait(timeout=60) != 0
        assert not out.exists()

    # SIGKILL: no chance to clean up. The staging directory has weights but no config.json.
    (staging,) = [killed.parent / name for name in _beside(killed)]
    assert list(staging.rglob("*.safetensors")) and not list(staging.rglob("config.json"))
    for path in (staging, staging / "target"):
        with pytest.raises(ConfigError, match="config.json is missing"):
            load(path)
    # Ctrl-C: cleaned up.
    assert _beside(interrupted) == []
    # The next conversion to the same place clears the dead run's leftovers.
    convert(target_dir, drafter_dir, killed, quiet=True)
    assert load_pair(killed)[2] is not None and _beside(killed) == []


# --------------------------------------------------------------------------------------------
# Bounded memory


def _synthetic_config(layers: int) -> dict:
    """A text-only Gemma 4 much larger than the fixtures: 16 MB per MLP matrix in bf16."""
    types = (["sliding_attention"] * 3 + ["full_attention"]) * (layers // 4)
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "hidden_size": 1024,
        "intermediate_size": 8192,
        "num_hidden_layers": layers,
        "layer_types": types,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "head_dim": 128,
        "global_head_dim": 256,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "use_double_wide_mlp": False,
        "vocab_size": 8192,
        "sliding_window": 8,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "eos_token_id": [1, 106],
    }


def _write_synthetic(checkpoint: Path, tokenizer_from: Path, layers: int = 4, per_file: int = 6):
    """Random bf16 weights in Hugging Face's text-only layout, `per_file` tensors per file."""
    from mlx_gemma_mtp.config import target_config
    from mlx_gemma_mtp.target import Target

    checkpoint.mkdir()
    config = _synthetic_config(layers)
    (checkpoint / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_from / name, checkpoint / name)
    model = Target(target_config(config, checkpoint, (1,)))  # lazy: names and shapes only
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    names = sorted(shapes)
    for i in range(0, len(names), per_file):
        part = {k: (mx.random.normal(shapes[k]) * 0.02).astype(mx.bfloat16) for k in names[i : i + per_file]}
        mx.save_safetensors(str(checkpoint / f"model-{i // per_file:05d}.safetensors"), part)
        del part
    return sorted(checkpoint.glob("*.safetensors"))


MEASURE = """
import re, sys
from convert import main

def status(field):  # kB
    return int(re.search(rf"{field}:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS (the imports' peak forgotten)
code = main(sys.argv[1:])
print("RSS_KB", base, status("VmHWM"))
sys.exit(code)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux's /proc/self/status")
def test_peak_memory_is_bounded_by_a_shard_not_the_model(checkpoints, tmp_path):
    files = _write_synthetic(tmp_path / "big", checkpoints["dense"][0])
    total = sum(f.stat().st_size for f in files)
    largest = max(f.stat().st_size for f in files)
    out = tmp_path / "out"
    args = ["--target", tmp_path / "big", "--out", out, "--quantize", "--max-shard-gb", str(16 / 1024)]
    command = [sys.executable, "-c", MEASURE, *map(str, args), "--quiet"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    base_kb, peak_kb = map(int, run.stdout.split("RSS_KB")[1].split())
    grew = (peak_kb - base_kb) * 1024
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(
        f"\nconverting {total / 1e6:.0f} MB in {len(files)} files (largest {largest / 1e6:.0f} MB) to 4-bit "
        f"({written / 1e6:.0f} MB in {len(list(out.glob('*.safetensors')))} files): peak RSS "
        f"{peak_kb * 1.024e-3:.0f} MB, {grew / 1e6:.0f} MB above the {base_kb * 1.024e-3:.0f} MB "
        "after imports"
    )
    assert grew < 2 * largest and grew < total / 4
    model, _ = load(out)
    assert model.model.layers[0].mlp.down_proj.bits == 4


# --------------------------------------------------------------------------------------------
# Quality of the quantized conversions (numbers for the README)


def _logits(model, ids: list[int]) -> np.ndarray:
    hidden = model(mx.array([ids]), model.make_cache())
    return np.array(model.logits(hidden).astype(mx.float32))[0]


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(p || q), p the reference."""

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _acceptance(model, tokenizer, drafter, prompts) -> float:
    drafted = accepted = 0
    for ids in prompts:
        last = list(stream_generate(model, tokenizer, ids, 40, draft_model=drafter, num_draft_tokens=DRAFTS))[
            -1
        ]
        drafted, accepted = drafted + last.drafted, accepted + last.accepted
    return accepted / drafted


@pytest.mark.parametrize("kind", KINDS)
def test_quantization_quality(kind, converted, checkpoints):
    """Logit error and greedy acceptance of the quantized conversions against the unquantized
    model. On random-weight fixtures only the ratios mean anything (see README, Converting)."""
    rng = np.random.RandomState(0)
    prompts = [[2] + rng.randint(4, VOCAB_SIZE, size=39).tolist() for _ in range(6)]
    reference, tokenizer = load(checkpoints[kind][0])
    reference_drafter = load_drafter(checkpoints[kind][1], reference)
    ref_logits = [_logits(reference, ids) for ids in prompts]
    base = _acceptance(reference, tokenizer, reference_drafter, prompts)
    errors = {}
    for variant in ("8bit", "4bit"):
        model, _, drafter = load_pair(converted[kind, variant])
        logits = [_logits(model, ids) for ids in prompts]
        max_abs = max(np.abs(a - b).max() for a, b in zip(logits, ref_logits))
        kl = np.mean([_kl(r, q) for r, q in zip(ref_logits, logits)])
        quantized_target = _acceptance(model, tokenizer, reference_drafter, prompts)
        both = _acceptance(model, tokenizer, drafter, prompts)
        errors[variant] = (max_abs, kl)
        print(
            f"\n{kind} {variant}: logits max |err| {max_abs:.2f}, mean KL {kl:.1e}; greedy acceptance "
            f"{base:.2f} unquantized, {quantized_target:.2f} quantized target "
            f"({quantized_target / base:.2f}x), {both:.2f} both quantized ({both / base:.2f}x)"
        )
        if variant == "8bit":  # a small perturbation; 4-bit makes a random fixture another model
            assert quantized_target > 0.5 * base and both > 0.5 * base
    assert errors["8bit"][0] < errors["4bit"][0] and errors["8bit"][1] < errors["4bit"][1] / 10
