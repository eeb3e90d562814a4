"""Local chat models (Gemma 3, Qwen 3) with streaming and exact per-session KV-cache reuse.

Importing the package does not import torch: only loading a local model does.
"""

from .backend import Capabilities, ChatModel, ChatStream, ModelInfo
from .chunks import Chunk, Stats
from .errors import BackendError, ModelLoadError
from .loading import load_model
from .registry import FAMILIES
from .request import ChatRequest, SamplingParams, SessionKey, build_request
from .seed_api import Gemma3Object, LoadModel, Qwen3Object

__all__ = [
    "FAMILIES",
    "BackendError",
    "Capabilities",
    "ChatModel",
    "ChatRequest",
    "ChatStream",
    "Chunk",
    "Gemma3Object",
    "LoadModel",
    "ModelInfo",
    "ModelLoadError",
    "Qwen3Object",
    "SamplingParams",
    "SessionKey",
    "Stats",
    "build_request",
    "load_model",
]
