"""Gemma 4 with its MTP drafters on MLX: speculative decoding exact against the target."""

from .chat import ChatSession
from .generate import Response, batch_generate, generate, stream_batch_generate, stream_generate
from .load import load, load_drafter, load_pair

__all__ = [
    "ChatSession",
    "Response",
    "batch_generate",
    "generate",
    "load",
    "load_drafter",
    "load_pair",
    "stream_batch_generate",
    "stream_generate",
]
