"""Gemma 4 with its MTP drafters on MLX: speculative decoding exact against the target."""

from .chat import ChatSession
from .generate import Response, generate, stream_generate
from .load import load, load_drafter, load_pair

__all__ = ["load", "load_pair", "load_drafter", "generate", "stream_generate", "Response", "ChatSession"]
