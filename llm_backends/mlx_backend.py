"""The MLX backend (Apple Silicon; also mlx[cpu] on Linux): the same LocalModel over an mlx-lm model.

Only the runner differs: mlx-lm's ``load`` and model call, its prompt cache (make_prompt_cache, trimming).
Templates, the text layer, validation, sampling, the session store and the ledger rule are shared, so the
same exactness tests hold. Sliding-window (rotating) caches past their window cannot be trimmed: restore
points keep copies of their state where turns begin and prompts end (mlx-lm's own ``state``, which holds
the arrays and the position of the rotation), so a new turn, a retry or an undo resumes there instead of
re-reading the conversation. Full (trimmable) layers are trimmed instead of copied. With ``cache_dir`` the
sessions go to disk as for transformers (``disk_tier.py``), their arrays as torch tensors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .backend import ModelInfo
from .batching import NO_ARRIVAL, Arrival
from .disk_tier import DiskTier
from .errors import ModelLoadError
from .int8_weights import checkpoint_key
from .loading import LoadOptions, default_cache_bytes, local_label, locate
from .local import FALLBACK_CONTEXT, LocalModel, restore_points
from .registry import family_for
from .session_cache import CacheEntry, Checkpoint


def available() -> bool:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


class MLXCheckpoint(Checkpoint):
    """A restore point whose states are mlx-lm layer states (arrays and integers), None for a trimmable one."""

    @property
    def nbytes(self) -> int:
        total = sum(a.nbytes for state in self.states if state is not None for a in _arrays(state))
        return total + (0 if self.logits is None else self.logits.numel() * self.logits.element_size())


class MLXCacheEntry(CacheEntry):
    """A list of mlx-lm layer caches and the token ids they hold."""

    @property
    def nbytes(self) -> int:
        total = sum(c.nbytes for c in self.checkpoints)
        for layer in self.cache:
            for array in _arrays(getattr(layer, "state", ())):
                total += array.nbytes
        return total

    def can_trim(self, length: int) -> bool:
        from mlx_lm.models.cache import can_trim_prompt_cache

        return length >= len(self.ids) or can_trim_prompt_cache(self.cache)

    def trim(self, length: int) -> None:
        from mlx_lm.models.cache import trim_prompt_cache

        remove = len(self.ids) - length
        if remove > 0:
            trimmed = trim_prompt_cache(self.cache, remove)
            if trimmed != remove:
                raise RuntimeError(f"mlx cache trimmed {trimmed} of {remove} tokens")
            del self.ids[length:]
        self.checkpoints = [c for c in self.checkpoints if c.length <= length]

    @property
    def has_sliding_layers(self) -> bool:
        return any(not _trimmable_forever(layer) for layer in self.cache)

    def save_checkpoint(self, logits) -> None:
        if self.max_checkpoints <= 0 or (logits is None and not self.has_sliding_layers):
            return
        # A rotating layer's state must carry its position (mlx-lm's keeps offset and rotation index there);
        # where a version keeps them elsewhere, a restore would be silently wrong: keep no restore points.
        if any(not _trimmable_forever(layer) and len(layer.state) < 6 for layer in self.cache):
            return
        states = tuple(None if _trimmable_forever(layer) else _copy_arrays(_live(layer)) for layer in self.cache)
        kept = [c for c in self.checkpoints if c.length != len(self.ids)]
        saved = None if logits is None else logits.detach().clone()
        kept.append(MLXCheckpoint(len(self.ids), states, saved))
        self.checkpoints = sorted(kept, key=lambda c: c.length)[-self.max_checkpoints :]

    def restore(self, checkpoint: Checkpoint) -> None:
        remove = len(self.ids) - checkpoint.length
        for layer, saved in zip(self.cache, checkpoint.states, strict=True):
            if saved is None:
                layer.trim(remove)
            else:  # a copy: mlx-lm writes into its arrays in place, and the restore point must stay as it is
                layer.state = _copy_arrays(saved)
        del self.ids[checkpoint.length :]
        self.checkpoints = [c for c in self.checkpoints if c.length <= checkpoint.length]

    def payload(self, restore_points: int = 2, clone: bool = True) -> dict:
        """The token ids, each layer's mlx-lm state and the last restore points, as torch tensors and numbers
        (what the disk tier writes): new tensors always (``clone`` is for the transformers entry's own)."""
        layers = [None if layer.empty() else _to_disk(_live(layer)) for layer in self.cache]
        kept = self.checkpoints[-restore_points:] if restore_points else []
        points = [
            {"length": c.length, "states": [None if s is None else _to_disk(s) for s in c.states], "logits": c.logits}
            for c in kept
        ]
        return {"ids": list(self.ids), "layers": layers, "restore_points": points}

    def load_payload(self, payload: dict) -> None:
        """Takes the states ``payload()`` gave; raises (ValueError and the like) if they do not fit this model's
        caches (another layer count, or a rotating layer's state where a full one is)."""
        layers = payload["layers"]
        if len(layers) != len(self.cache):
            raise ValueError(f"{len(layers)} layers stored, the model has {len(self.cache)}")
        for layer, saved in zip(self.cache, layers, strict=True):
            if saved is not None:
                layer.state = _from_disk(saved)
        self.ids = [int(i) for i in payload["ids"]]
        points = [c for c in payload.get("restore_points", []) if len(c["states"]) == len(layers)]
        self.checkpoints = (
            [
                MLXCheckpoint(
                    int(c["length"]), tuple(None if s is None else _from_disk(s) for s in c["states"]), c["logits"]
                )
                for c in points
                if int(c["length"]) <= len(self.ids)
            ][-self.max_checkpoints :]
            if self.max_checkpoints > 0
            else []
        )

    def copy(self) -> MLXCacheEntry:
        cache = self.make_cache()
        for layer, source in zip(cache, self.cache, strict=True):
            if not source.empty():
                layer.state = _copy_arrays(_live(source))
        return MLXCacheEntry(
            make_cache=self.make_cache,
            max_checkpoints=self.max_checkpoints,
            cache=cache,
            ids=list(self.ids),
            checkpoints=list(self.checkpoints),
        )


def _trimmable_forever(layer) -> bool:
    """A full-attention layer (mlx-lm's KVCache) can always be trimmed; a rotating one only inside its window."""
    from mlx_lm.models.cache import KVCache

    return type(layer) is KVCache


def _live(layer) -> tuple:
    """``layer``'s mlx-lm state with its buffers cut to the positions it holds. Past them a buffer has room that may
    still hold tokens trimmed away: another turn's, or in a kept system prompt the whole conversation of the person
    who sent it, which a copy would lend to others and a payload write to disk. (A rotating layer that has wrapped
    holds its whole buffer.)"""
    state = layer.state
    if state[0] is None:
        return state
    if _trimmable_forever(layer):
        keys, values, offset = state
        return keys[..., :offset, :], values[..., :offset, :], offset
    if len(state) == 6 and state[2] < state[4]:  # keys, values, offset, keep, max size, write index: not wrapped
        keys, values, *rest = state
        used = rest[-1]
        return (keys[..., :used, :], values[..., :used, :], *rest)
    return state


def _copy_arrays(state):
    import mlx.core as mx

    copied = tuple(mx.array(item) if isinstance(item, mx.array) else item for item in state)
    mx.eval([item for item in copied if isinstance(item, mx.array)])
    return copied


def _to_disk(state) -> list:
    """An mlx-lm layer state (arrays and integers) as torch tensors and integers. Arrays go through float32 (numpy
    has no bfloat16), which holds bf16 and fp16 values exactly; their own dtype is kept to convert back."""
    import mlx.core as mx

    out = []
    for item in state:
        if isinstance(item, mx.array):
            values = torch.from_numpy(
                np.array(item.astype(mx.float32) if mx.issubdtype(item.dtype, mx.floating) else item)
            )
            out.append({"array": values, "dtype": str(item.dtype).removeprefix("mlx.core.")})
        else:
            out.append(item)
    return out


def _from_disk(state) -> tuple:
    import mlx.core as mx

    items = tuple(
        mx.array(item["array"].numpy()).astype(getattr(mx, item["dtype"])) if isinstance(item, dict) else item
        for item in state
    )
    mx.eval([item for item in items if isinstance(item, mx.array)])
    return items


def _arrays(state):
    if isinstance(state, (list, tuple)):
        for item in state:
            yield from _arrays(item)
    elif hasattr(state, "nbytes"):
        yield state


class MLXRunner:
    """Feeds tokens into an mlx-lm model; sampling stays in the shared (torch) sampler."""

    def __init__(self, model, *, max_checkpoints: int):
        self.model = model
        self.max_checkpoints = max_checkpoints

    def new_entry(self) -> MLXCacheEntry:
        from mlx_lm.models.cache import make_prompt_cache

        model = self.model
        return MLXCacheEntry(make_cache=lambda: make_prompt_cache(model), max_checkpoints=self.max_checkpoints)

    def forward(self, entry: CacheEntry, tokens: Sequence[int], *, logits: bool = True, images=None) -> torch.Tensor:
        import mlx.core as mx

        if images:
            raise ValueError("the MLX backend reads text only")
        try:
            out = self.model(mx.array([list(tokens)]), cache=entry.cache)
            logits = out[0, -1].astype(mx.float32)
            mx.eval(logits)
        except BaseException:
            entry.reset()
            raise
        entry.ids.extend(tokens)
        return torch.from_numpy(np.array(logits))

    def decode(self, entry: CacheEntry, token: int, *, greedy: bool = False) -> tuple[torch.Tensor, int | None]:
        return self.forward(entry, [token]), None

    def decoding(self):
        return nullcontext()

    def arrival(self) -> Arrival:
        return NO_ARRIVAL  # one reply at a time: nobody waits for a new stream

    def others_decoding(self) -> bool:
        return False  # one reply at a time: no batching of decode steps


def label(target: str | None) -> str:
    return f"{local_label(target)} (mlx)"


def load(target: str | None, options: LoadOptions) -> LocalModel:
    """Loads an mlx-lm checkpoint folder (plain or mlx-community quantized); None: the embedded model."""
    where = locate(target, options.progress)
    if where.gguf_file or where.kind == "hub":
        raise ModelLoadError("backend='mlx' loads a local checkpoint folder (e.g. an mlx-community download)")
    folder, name = where.folder, where.name
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm import load as mlx_load
    except ImportError as e:
        raise ModelLoadError("backend='mlx' needs mlx and mlx-lm: pip install -r requirements-mlx.txt") from e
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json: it is not a checkpoint folder")
    config = json.loads(config_path.read_text())
    family = family_for(config.get("model_type"))
    try:
        model, wrapper = mlx_load(folder)
    except Exception as e:  # any failure inside mlx-lm is a load failure, explained by its cause
        raise ModelLoadError(f"mlx-lm could not load {name}: {type(e).__name__}: {e}") from e
    tokenizer = getattr(wrapper, "_tokenizer", wrapper)
    quantization = config.get("quantization") or config.get("quantization_config")
    weights = tree_flatten(model.parameters())
    text_config = config.get("text_config", config)
    info = ModelInfo(
        name=name,
        family=family.name,
        backend="mlx",
        source=where.kind if where.kind == "embedded" else folder,
        quantization=f"mlx-{quantization['bits']}bit"
        if isinstance(quantization, dict) and "bits" in quantization
        else "none",
        device=f"mlx:{mx.default_device()}",
        dtype=str(weights[0][1].dtype).removeprefix("mlx.core.") if weights else "unknown",
        parameters=int(sum(w.size for _, w in weights)),
        memory_footprint_bytes=int(sum(w.nbytes for _, w in weights)),
        context_length=int(text_config.get("max_position_embeddings") or FALLBACK_CONTEXT),
    )
    tier = None
    if options.cache_dir is not None:
        import mlx_lm

        key = checkpoint_key(folder, None)
        tier = DiskTier(options.cache_dir, f"{key}|mlx|{mx.__version__}|{mlx_lm.__version__}", options.disk_cache_bytes)
    return LocalModel(
        tokenizer,
        family,
        info,
        MLXRunner(model, max_checkpoints=restore_points(options.restore_turns)),
        max_cache_bytes=options.max_cache_bytes or default_cache_bytes("cpu"),
        vocab_size=int(text_config["vocab_size"]),
        model=model,
        disk_tier=tier,
    )
