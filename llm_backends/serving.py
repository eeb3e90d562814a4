"""The models a server offers: registered ids -> sources, one loaded at a time, switched safely.

The page's dropdown and the HTTP API both read this; a network caller can only name a registered id,
never a path to load.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .backend import ChatModel
from .loading import load_model, parse_source
from .metrics import Metrics
from .request import SessionKey

log = logging.getLogger(__name__)


def label_for(source: str | None) -> str:
    """A short readable name for a model source."""
    return parse_source(source).label


@dataclass(frozen=True)
class Entry:
    id: str
    source: str | None


class ModelRegistry:
    """Holds the served model. ``switch`` loads the new one before letting the old one go, so a failed
    load leaves the previous model serving."""

    def __init__(self, sources: Sequence[str | None], load: Callable[..., ChatModel] = load_model, **load_kwargs):
        if not sources:
            raise ValueError("at least one model source is needed")
        self.entries: dict[str, Entry] = {}
        for source in sources:
            self._register(source)
        self._load = load
        self._load_kwargs = load_kwargs
        self._lock = threading.Lock()
        self.current_id: str | None = None
        self.model: ChatModel | None = None
        self.loading: str | None = None
        self.load_error: str | None = None
        self.progress: tuple[float, str] | None = None  # the load under way: (fraction done, what it does)
        self._ready = threading.Event()
        self._ever_loaded = False
        self._loads = 0  # loads started: a free that waited behind one does not free what it brought
        self._vocab_sizes: dict[str, int | None] = {}  # of the models loaded so far
        self.metrics = Metrics(lambda: self.model)

    def _register(self, source: str | None) -> str:
        base = label = label_for(source)
        n = 2
        while label in self.entries:
            label, n = f"{base} #{n}", n + 1
        self.entries[label] = Entry(label, source)
        return label

    @property
    def ids(self) -> list[str]:
        return list(self.entries)

    def add(self, source: str) -> str:
        """The id of ``source``: the registered one, or a new entry (the operator loaded it from the page)."""
        known = [entry.id for entry in self.entries.values() if entry.source == source]
        return known[0] if known else self._register(source)

    def remove(self, model_id: str) -> None:
        """Forgets an entry that is not being served (a load from the page that failed, or one freed)."""
        if model_id != self.current_id and len(self.entries) > 1:
            self.entries.pop(model_id, None)

    def unload(self) -> str | None:
        """Frees the served model and its caches; nothing serves until a model is chosen. Returns its id.
        RuntimeError while a load is under way (what it brings in would be freed the moment it arrives)."""
        loads = self._loads
        if self.loading is not None:
            raise RuntimeError(f"{self.loading} is loading: free a model once the load has finished")
        with self._lock:
            if self._loads != loads:  # a load ran while this waited for the lock: it was not the one to free
                raise RuntimeError("another model was just loaded: free it again if that is the one to free")
            previous, model_id = self.model, self.current_id
            self.model, self.current_id = None, None
            self._ready.clear()
        _let_go(previous)
        return model_id

    def resolve(self, name: str) -> str:
        """A registered id for ``name``: the id itself, "default" (the first entry), or an id's short form
        (before " (" or " @", e.g. "gemma-3-270m" for "gemma-3-270m (embedded)") when only one id has it.
        Anything else is returned as it is (and is then unknown)."""
        if name in self.entries:
            return name
        if name == "default":
            return self.ids[0]
        short = [i for i in self.entries if i.split(" (")[0].split(" @ ")[0] == name]
        return short[0] if len(short) == 1 else name

    def vocab_size(self, model_id: str) -> int | None:
        """How many token ids ``model_id`` reads, where known without loading it: it was loaded before, or it is
        a checkpoint folder (its config.json says). None otherwise."""
        if model_id in self._vocab_sizes:
            return self._vocab_sizes[model_id]
        source = self.entries[model_id].source
        config = Path(source) / "config.json" if source else None
        try:
            data = json.loads(config.read_text()) if config is not None and config.is_file() else {}
        except (OSError, ValueError):
            return None
        size = (data.get("text_config") or {}).get("vocab_size") or data.get("vocab_size")
        return size if isinstance(size, int) and size > 0 else None

    def get(self) -> ChatModel:
        """The loaded model; RuntimeError while nothing is loaded yet."""
        model = self.model
        if model is None:
            raise RuntimeError("no model is loaded yet")
        return model

    def switch(self, model_id: str, progress: Callable[[float, str], None] | None = None) -> ChatModel:
        """Loads ``model_id`` and frees the previous model and its session caches.

        Raises KeyError for an unknown id and whatever the load raises (the previous model keeps serving).
        """
        entry = self.entries[model_id]
        with self._lock:
            if model_id == self.current_id and self.model is not None:
                return self.model
            self._loads += 1
            self.loading = model_id

            def report(fraction: float, message: str) -> None:
                self.progress = (fraction, message)  # every page shows it, not only the one that asked
                if progress is not None:
                    progress(fraction, message)

            try:
                model = self._load(entry.source, progress=report, **self._load_kwargs)
            finally:
                self.loading, self.progress = None, None
            previous, self.model, self.current_id = self.model, model, model_id
            self._vocab_sizes[model_id] = model.vocab_size
            self._ever_loaded = True
            self._ready.set()
        _let_go(previous)
        return model

    @property
    def unloaded(self) -> bool:
        """The operator freed the served model and none is loading."""
        return self.model is None and self.loading is None and self._ever_loaded

    def wait_ready(self, timeout: float | None = None) -> ChatModel:
        """The loaded model, waiting up to ``timeout`` s for a load under way; RuntimeError when none arrives:
        at once when nothing is loading (the operator freed the model, or the load failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (model := self.model) is None:
            if self.unloaded:
                raise RuntimeError("no model is loaded: choose one in the Model list")
            if self.loading is None and self.load_error:
                raise RuntimeError(self.load_error)
            if deadline is not None and time.monotonic() >= deadline:
                raise RuntimeError(self.load_error or "the model is still loading")
            self._ready.wait(0.25)
        return model

    def load_in_background(self, model_id: str) -> threading.Thread:
        """Starts loading ``model_id`` so a server can answer (with 503 / a wait) while it loads."""

        def run():
            try:
                self.switch(model_id)
            except Exception as e:  # reported to callers of wait_ready and in the page
                self.load_error = f"could not load {model_id}: {e}"
                log.error(self.load_error)

        self.loading = model_id
        thread = threading.Thread(target=run, name="model-load", daemon=True)
        thread.start()
        return thread

    def clear_session(self, session: SessionKey) -> None:
        if self.model is not None:
            self.model.clear_cache(session)


def _let_go(model: ChatModel | None) -> None:
    """Frees a model that no longer serves: its sessions' memory (to disk where it has a tier), then the model."""
    if model is not None:
        model.release()
        del model
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")  # only a local model imported it; a remote-only server never does
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
