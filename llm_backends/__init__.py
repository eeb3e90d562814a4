"""Local chat models (Gemma 3, Qwen 3) with streaming and exact per-session KV-cache reuse.

Importing the package does not import torch: only loading a local model does.
"""

import os

# torch's OpenMP runtime (GNU libgomp) counts the worker threads of every thread that has run a parallel
# op; once they outnumber the cores it stops spinning between ops and sleeps, which adds a wake-up to each
# of a decode step's ~150 parallel ops. A server reads streams from several threads, so it always got there:
# 22 ms per token over HTTP against 14 ms from one thread, on the 2-core machine of docs/benchmarks.md.
# A bounded spin (about a tenth of a millisecond) keeps the fast path and sleeps when idle. Set before torch
# is imported (it reads them once); a value set by the user is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "100000")

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
