"""Session caches on disk (``cache_dir``): written when a session leaves memory (evicted, or the server
stops) and read back when that session returns, also after a restart.

Each file holds one session's token ids and KV states, behind a SHA-256 of its bytes and the identity of the
model that computed them (checkpoint files, precision, this code and the library versions), so a damaged
file or one from another model is ignored with a log line, never loaded. A file's name is a hash of the
model identity (so one model's files can all be removed) and a hash of the identity with the session key
(which includes the person), so it tells nobody whose session it is, and one person's key never finds
another's file. The folder is kept under a byte budget, oldest file first.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from . import host_tier

log = logging.getLogger(__name__)
DIGEST = 32  # bytes of SHA-256 ahead of the payload


class DiskTier:
    """A folder of session caches for one model, LRU by bytes."""

    def __init__(self, folder: str | os.PathLike, identity: str, max_bytes: int):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _, _, stale in self._files("*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        self.identity = identity
        self.max_bytes = max_bytes
        self.writes = self.reads = self.rejected = 0
        self._lock = threading.Lock()

    @property
    def _model_prefix(self) -> str:
        return hashlib.sha256(self.identity.encode()).hexdigest()[:16]

    def path(self, key: Hashable) -> Path:
        name = hashlib.sha256(f"{self.identity}\0{key!r}".encode()).hexdigest()
        return self.folder / f"{self._model_prefix}-{name}.kv"

    def clear(self) -> int:
        """Removes every session file of this model (other models' files stay); returns how many."""
        files = self._files(f"{self._model_prefix}-*.kv")
        for _, _, path in files:
            path.unlink(missing_ok=True)
        return len(files)

    def save(self, key: Hashable, entry) -> bool:
        """Writes the entry; False, with a log line where it failed, for a cache this tier cannot hold."""
        try:
            payload = entry.payload()
        except NotImplementedError:
            return False
        return self.write(key, payload)

    def write(self, key: Hashable, payload: dict) -> bool:
        """Writes a payload (``CacheEntry.payload()``) atomically; False, with a log line, if it failed."""
        tmp = None
        try:
            buffer = io.BytesIO()
            torch.save({"identity": self.identity, **payload}, buffer)
            data = buffer.getvalue()
            with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as tmp:
                tmp.write(hashlib.sha256(data).digest())
                tmp.write(data)
            os.replace(tmp.name, self.path(key))
        except Exception as e:  # no room, no permission, no memory: the session is recomputed when it returns
            log.warning("could not write a session cache to %s (%s)", self.folder, e)
            if tmp is not None:
                Path(tmp.name).unlink(missing_ok=True)
            return False
        with self._lock:
            self.writes += 1
        self._shrink()
        return True

    def load(self, key: Hashable, new_entry: Callable[[], object]):
        """The session's entry from disk, or None (no file, or a file that fails its checks)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("could not read %s (%s)", path, e)
            return None
        try:
            digest, data = raw[:DIGEST], raw[DIGEST:]
            if hashlib.sha256(data).digest() != digest:
                raise ValueError("its checksum does not match its contents")
            payload = torch.load(io.BytesIO(data), weights_only=True)
            if payload.get("identity") != self.identity:
                raise ValueError("it was computed by another model, precision or version of this code")
            if "devices" in payload:  # written from host RAM: each tensor goes back where it came from
                payload = host_tier.placed(payload)
            entry = new_entry()
            entry.load_payload(payload)
        except Exception as e:  # damaged, foreign or unreadable: never loaded
            log.warning("ignoring the session cache %s: %s", path.name, e)
            with self._lock:
                self.rejected += 1
            return None
        try:
            os.utime(path)  # recently used
        except OSError:  # removed meanwhile (cleared, or the budget): the entry read stays good
            pass
        with self._lock:
            self.reads += 1
        return entry

    def _files(self, pattern: str = "*.kv") -> list[tuple[float, int, Path]]:
        found = []
        for path in self.folder.glob(pattern):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed by another thread meanwhile
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return found

    def _shrink(self) -> None:
        files = self._files()
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def info(self) -> dict:
        """This model's files (the byte budget is the folder's, shared with other models' files)."""
        files = self._files(f"{self._model_prefix}-*.kv")
        with self._lock:
            return {
                "folder": str(self.folder),
                "sessions": len(files),
                "bytes": sum(size for _, size, _ in files),
                "budget_bytes": self.max_bytes,
                "writes": self.writes,
                "reads": self.reads,
                "rejected": self.rejected,
            }
