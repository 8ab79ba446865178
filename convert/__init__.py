"""Hugging Face Gemma 4 checkpoints -> MLX: a target, its MTP drafter, or both as one pair.

    from convert import convert
    convert(target="google/gemma-4-E2B-it", drafter="google/gemma-4-E2B-it-assistant",
            out="gemma-4-E2B-it-mtp-4bit", quantize=True)

or `mlx-gemma-mtp convert ...` / `python -m convert ...` (`main`, `setup_arg_parser`).
It is the runtime's load + sanitize + quantize + save, streamed tensor by tensor.
"""

from .cli import main, setup_arg_parser
from .pipeline import ConvertError, convert

__all__ = ["ConvertError", "convert", "main", "setup_arg_parser"]
