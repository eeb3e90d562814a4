"""load_model: the one parser of model sources, and the dispatch to the backend that loads each.

A source is None (the embedded default), a checkpoint folder, a ``.gguf`` file, a Hugging Face repo id, or
``<backend>:<target>`` for another backend named in ``registry.BACKENDS`` (``mlx:<folder>``,
``openai:<base-url>#<model>``). Backends are imported only when used, so a server that fronts a remote model
never imports torch.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import default_model
from .backend import ChatModel
from .errors import ModelLoadError
from .registry import BACKENDS

QUANTIZATIONS = ("auto", "nf4", "int8", "fp16", "none")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MIN_CACHE_BYTES = 64 * 2**20
DISK_CACHE_BYTES = 8 * 2**30


@dataclass(frozen=True)
class Source:
    """A parsed model source: the backend that loads it and what it names there (None: the embedded model)."""

    backend: str
    target: str | None

    @property
    def label(self) -> str:
        """A short readable name for the dropdown and ``/v1/models``."""
        return _backend(self.backend).label(self.target)


@dataclass(frozen=True)
class LoadOptions:
    """How to load: ``quantization`` one of QUANTIZATIONS, ``device`` cpu/cuda/cuda:N/mps (None: the best
    there is), ``dtype`` a name or torch dtype (None: the device's default), ``max_cache_bytes`` for session
    caches (None: a share of free memory), ``progress(fraction, message)`` for long first-time work,
    ``restore_turns``: how many of a session's last exchanges stay editable without re-reading older ones;
    ``cache_dir``: a folder where sessions' caches go when they leave memory and survive a restart, at most
    ``disk_cache_bytes`` of them (transformers backend); ``host_cache_bytes``: host RAM for sessions evicted from a
    GPU's memory (None: a quarter of free RAM on CUDA, none on a CPU, whose memory already is host RAM; 0: none);
    ``exact``: on CUDA, the exact mode of ``cuda_step.py``
    (logits bitwise independent of batch neighbours and of how a prompt was cut; slower)."""

    quantization: str = "auto"
    device: str | None = None
    dtype: object = None
    max_cache_bytes: int | None = None
    progress: Callable[[float, str], None] | None = None
    restore_turns: int = 8
    cache_dir: str | None = None
    disk_cache_bytes: int = DISK_CACHE_BYTES
    exact: bool = False
    host_cache_bytes: int | None = None


def parse_source(source, backend: str = "transformers") -> Source:
    """Splits ``<backend>:<target>``; anything else is a target for ``backend``. ValueError when malformed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if source is None:
        return Source(backend, None)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"source must be a path or a repo id, not {type(source).__name__}")
    text = str(source)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in BACKENDS:
        return Source(prefix, rest or None)
    return Source(backend, text)


def load_model(
    source=None,
    *,
    quantization="auto",
    device=None,
    dtype=None,
    max_cache_bytes=None,
    backend="transformers",
    progress=None,
    restore_turns=8,
    cache_dir=None,
    exact=False,
    host_cache_bytes=None,
    disk_cache_bytes=DISK_CACHE_BYTES,
) -> ChatModel:
    """Loads a Gemma 3 or Qwen 3 chat model, or connects to a remote one.

    ``source``: None for the embedded default, a checkpoint folder, a ``.gguf`` file, a Hugging Face repo id,
    ``openai:<base-url>#<model>`` for a model on another OpenAI-compatible server, or ``mlx:<folder>``
    (the same as ``backend="mlx"``); ``backend="auto"`` picks MLX on Apple Silicon when it is installed.
    ``progress(fraction, message)`` hears about the embedded model's one-time conversion. ``restore_turns``:
    an edit, undo or retry of any of a session's last N exchanges re-reads only from there (restore points;
    they cost memory, counted against ``max_cache_bytes``, only for models with sliding-window layers).
    ``cache_dir``: sessions' caches are written there when they leave memory (and when the process exits) and
    read back when the session returns, also after a restart, within ``disk_cache_bytes`` (8 GiB by default:
    the folder's budget, oldest files out first). ``host_cache_bytes``: on a GPU, sessions evicted
    from its memory wait in this much host RAM and are copied back when they return (default: a quarter of free
    RAM on CUDA; 0 for none; on a CPU none unless asked for). ``exact=True``: on CUDA, a session's logits are
    bitwise the same whichever other sessions share its decode step and however its prompt was split (cache
    reuse), at a measured cost in speed (docs/benchmarks/gpu/); the default mode runs the fastest kernels, whose
    last bits drift. A CPU's kernels are row-invariant already; there it changes nothing.
    Raises ValueError for bad arguments and ModelLoadError when the model cannot be loaded.
    """
    if backend == "auto":
        backend = "mlx" if _apple_silicon() and _backend("mlx").available() else "transformers"
    parsed = parse_source(source, backend)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    if max_cache_bytes is not None and (
        isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int) or max_cache_bytes <= 0
    ):
        raise ValueError(f"max_cache_bytes must be a positive integer, not {max_cache_bytes!r}")
    if isinstance(restore_turns, bool) or not isinstance(restore_turns, int) or not 0 <= restore_turns <= 256:
        raise ValueError(f"restore_turns must be an integer from 0 to 256, not {restore_turns!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f"cache_dir must be a folder path, not {cache_dir!r}")
    if isinstance(disk_cache_bytes, bool) or not isinstance(disk_cache_bytes, int) or disk_cache_bytes <= 0:
        raise ValueError(f"disk_cache_bytes must be a positive integer, not {disk_cache_bytes!r}")
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be True or False, not {exact!r}")
    if host_cache_bytes is not None and (
        isinstance(host_cache_bytes, bool) or not isinstance(host_cache_bytes, int) or host_cache_bytes < 0
    ):
        raise ValueError(f"host_cache_bytes must be a non-negative integer, not {host_cache_bytes!r}")
    options = LoadOptions(
        quantization,
        device,
        dtype,
        max_cache_bytes,
        progress,
        restore_turns,
        None if cache_dir is None else str(cache_dir),
        disk_cache_bytes,
        exact=exact,
        host_cache_bytes=host_cache_bytes,
    )
    return _backend(parsed.backend).load(parsed.target, options)


def _backend(name: str):
    return importlib.import_module(BACKENDS[name], __package__)


def _apple_silicon() -> bool:
    import platform

    return platform.system() == "Darwin" and platform.machine() == "arm64"


# --- shared by the local backends --------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """A local source on disk: the folder, the .gguf file in it (or None), a display name, and its kind
    (embedded, folder, gguf or hub)."""

    folder: str
    gguf_file: str | None
    name: str
    kind: str

    @property
    def source(self) -> str:
        """How ModelInfo names where the model came from."""
        if self.kind in ("embedded", "hub"):
            return self.kind
        return self.folder if self.gguf_file is None else str(Path(self.folder) / self.gguf_file)


def locate(target: str | None, progress=None) -> Located:
    """Finds a local source on disk (converting the embedded model on first use); ModelLoadError otherwise."""
    if target is None:
        return Located(str(default_model.default_checkpoint(progress)), None, default_model.NAME, "embedded")
    path = Path(target).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a checkpoint folder or a .gguf file")
        return Located(str(path.parent), path.name, path.stem, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: it is not a transformers checkpoint folder")
        return Located(str(path), None, path.name, "folder")
    if is_repo_id(target):
        return Located(target, None, target, "hub")
    raise ModelLoadError(f"{target!r} is neither an existing file or folder nor a Hugging Face repo id")


def is_repo_id(target: str) -> bool:
    return bool(REPO_ID.match(target)) and not target.startswith((".", "/", "~")) and not Path(target).exists()


def local_label(target: str | None) -> str:
    """The embedded model's name, a Hub repo id whole, or a path's last part."""
    if target is None:
        return f"{default_model.NAME} (embedded)"
    text = target.rstrip("/")
    return text if is_repo_id(text) else Path(text).name or text


def default_host_cache_bytes(device: str) -> int:
    """Host RAM for sessions evicted from GPU memory: a quarter of free RAM on CUDA; none elsewhere (a CPU's
    session caches are in host RAM already; MPS shares it)."""
    import psutil

    return psutil.virtual_memory().available // 4 if device.startswith("cuda") else 0


def default_cache_bytes(device: str) -> int:
    """A quarter of free RAM, or half of free GPU memory, for session caches (at least MIN_CACHE_BYTES)."""
    import psutil

    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = free // 2
    else:
        budget = psutil.virtual_memory().available // 4
    return max(MIN_CACHE_BYTES, budget)
