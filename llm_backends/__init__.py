"""Local chat models (Gemma 3, Qwen 3) with streaming and exact per-session KV-cache reuse."""

from .chat_model import ChatModel, ChatStream, ModelInfo
from .chunks import Chunk, Stats
from .engine import SamplingParams
from .errors import ModelLoadError
from .loading import load_model
from .registry import FAMILIES
from .seed_api import Gemma3Object, LoadModel, Qwen3Object

__all__ = [
    "FAMILIES",
    "ChatModel",
    "ChatStream",
    "Chunk",
    "Gemma3Object",
    "LoadModel",
    "ModelInfo",
    "ModelLoadError",
    "Qwen3Object",
    "SamplingParams",
    "Stats",
    "load_model",
]
