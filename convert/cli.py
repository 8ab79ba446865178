"""`mlx-gemma-mtp convert` / `python -m convert`: the argument parser and `main`."""

from __future__ import annotations

import argparse
import sys

from .pipeline import DTYPES, MAX_SHARD_BYTES, Q_BITS, Q_GROUP_SIZES, convert

EXAMPLE = """\
example:
  mlx-gemma-mtp convert --target google/gemma-4-E2B-it \\
      --drafter google/gemma-4-E2B-it-assistant --out gemma-4-E2B-it-mtp-4bit --quantize
"""


def setup_arg_parser(prog: str = "mlx-gemma-mtp convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert Hugging Face Gemma 4 checkpoints (a target, its MTP drafter, or both "
        "into one pair directory) to MLX.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", help="target: hub repo id or local directory")
    parser.add_argument("--drafter", help="MTP drafter (assistant): hub repo id or local directory")
    parser.add_argument("--out", "-o", required=True, help="output directory (absent or empty)")
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
        type=float,
        default=MAX_SHARD_BYTES / (1 << 30),
        help="largest output safetensors file, GiB (default 5)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or report")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a conversion; 0 on success, 1 with one line on stderr for bad input, 130 on Ctrl-C."""
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.target is None and args.drafter is None:
        parser.error("give --target, --drafter or both")
    try:
        convert(
            target=args.target,
            drafter=args.drafter,
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
