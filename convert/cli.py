"""`mlx-gemma-mtp convert` / `python -m convert`: the argument parser and `main`."""

from __future__ import annotations

import argparse
import math
import sys

from mlx_gemma_mtp.config import DRAFTER_MODEL_TYPES, read_json
from mlx_gemma_mtp.load import pair_drafter, resolve

from .pipeline import DTYPES, MAX_SHARD_BYTES, Q_BITS, Q_GROUP_SIZES, ConvertError, convert

EXAMPLE = """\
example:
  mlx-gemma-mtp convert --target google/gemma-4-E2B-it \\
      --drafter google/gemma-4-E2B-it-assistant --out gemma-4-E2B-it-mtp-4bit --quantize
  mlx-gemma-mtp convert --hf-path google/gemma-4-E2B-it --mlx-path gemma-4-E2B-it-mtp-4bit -q   # the same
"""


def setup_arg_parser(prog: str = "mlx-gemma-mtp convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert Hugging Face Gemma 4 checkpoints (a target, its MTP drafter, or both "
        "into one pair directory) to MLX.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--target", help="target: hub repo id or local directory")
    source.add_argument(
        "--hf-path",
        help="as in mlx_lm.convert, the model to convert: a target comes with its drafter (a pair's "
        "own, an '-assistant' sibling, the hub's '<id>-assistant') unless --drafter names one; "
        "a drafter comes alone",
    )
    parser.add_argument("--drafter", help="MTP drafter (assistant): hub repo id or local directory")
    parser.add_argument(
        "--out", "-o", "--mlx-path", dest="out", required=True, help="output directory (absent or empty)"
    )
    parser.add_argument("--quantize", "-q", action="store_true", help="quantize target and drafter")
    parser.add_argument("--q-bits", type=int, choices=Q_BITS, default=4, help="bits per weight (default 4)")
    parser.add_argument(
        "--q-group-size", type=int, choices=Q_GROUP_SIZES, default=64, help="weights per scale (default 64)"
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="dtype of what is not quantized (default: the checkpoint's)"
    )
    parser.add_argument(
        "--max-shard-gb",
        type=_shard_gb,
        default=MAX_SHARD_BYTES / (1 << 30),
        help="largest output safetensors file, GiB (default 5)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or report")
    return parser


def _shard_gb(text: str) -> float:
    """--max-shard-gb: a size in GiB of at least one byte."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value * (1 << 30) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size in GiB, got {text!r}")
    return value


def _models(args, say) -> tuple[str | None, str | None]:
    """(target, drafter) from the flags; --hf-path's drafter found as `load_pair` finds it."""
    if args.hf_path is None:
        return args.target, args.drafter
    config = read_json(resolve(args.hf_path) / "config.json")
    if config.get("model_type") in DRAFTER_MODEL_TYPES:
        if args.drafter is not None:
            raise ConvertError(f"--hf-path {args.hf_path} is a drafter; give its target with --target")
        return None, args.hf_path
    if args.drafter is not None:
        return args.hf_path, args.drafter
    found = pair_drafter(args.hf_path)
    if found is None:
        say(f"no drafter found for {args.hf_path}: converting the target alone (--drafter names one)")
    else:
        say(f"drafter: {found}, found for {args.hf_path} (--drafter names another)")
    return args.hf_path, found


def main(argv: list[str] | None = None) -> int:
    """Run a conversion; 0 on success, 1 with one line on stderr for bad input, 130 on Ctrl-C."""
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.target is None and args.hf_path is None and args.drafter is None:
        parser.error("give --target (or --hf-path), --drafter or both")
    try:
        target, drafter = _models(args, (lambda *a: None) if args.quiet else print)
        convert(
            target=target,
            drafter=drafter,
            out=args.out,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            dtype=args.dtype,
            force=args.force,
            quiet=args.quiet,
            max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
        )
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; {args.out} left as it was", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # ConfigError, WeightsError, ConvertError; I/O
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0
