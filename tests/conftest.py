from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests never reach the Hub: every model they use is built here or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

# Without a GPU, the CUDA step's Triton kernels run in Triton's interpreter (tests/test_cuda_step.py); it is
# chosen when Triton is imported, so before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import build_gemma3, build_gemma3_vision, build_qwen3  # noqa: E402

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# How the tiny test models load; on a GPU machine e.g. LLM_TEST_DEVICE=cuda LLM_TEST_QUANTIZATION=none
# LLM_TEST_DTYPE=float32 (the default there would be NF4 with bf16 arithmetic).
TINY_LOAD = {
    key: os.environ[f"LLM_TEST_{key.upper()}"]
    for key in ("device", "quantization", "dtype")
    if os.environ.get(f"LLM_TEST_{key.upper()}")
}
# LLM_TEST_EXACT=1: the exact mode of the CUDA step, which the reuse, batch and stream tests hold to bitwise.
if os.environ.get("LLM_TEST_EXACT", "").lower() in ("1", "true", "yes"):
    TINY_LOAD["exact"] = True


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> Path:
    return build_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    return build_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def gemma3_vision_dir(tmp_path_factory) -> Path:
    return build_gemma3_vision(tmp_path_factory.mktemp("tiny-gemma3-vision"))


@pytest.fixture(scope="session")
def gemma3_vision(gemma3_vision_dir):
    from llm_backends import load_model

    return load_model(str(gemma3_vision_dir), max_cache_bytes=256 * 2**20, **TINY_LOAD)


@pytest.fixture(scope="session")
def gemma3(gemma3_dir):
    from llm_backends import load_model

    return load_model(str(gemma3_dir), max_cache_bytes=256 * 2**20, **TINY_LOAD)


@pytest.fixture(scope="session")
def qwen3(qwen3_dir):
    from llm_backends import load_model

    return load_model(str(qwen3_dir), max_cache_bytes=256 * 2**20, **TINY_LOAD)


@pytest.fixture(scope="session")
def embedded():
    """The real embedded Gemma 3 270M (converted on first use, then loaded from the user cache)."""
    from llm_backends import load_model

    return load_model(max_cache_bytes=2 * 2**30)
