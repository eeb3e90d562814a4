"""Session caches on disk (``cache_dir``): written when a session leaves memory (evicted, or the server
stops) and read back when that session returns, also after a restart.

Each file holds one session's token ids and KV states, behind a SHA-256 of its bytes, the identity of the
model that computed them (checkpoint files, precision, this code and the library versions) and a hash of its
session key, so a damaged file, one from another model or one put under another session's name is ignored
with a log line (and removed), never loaded. A file's name is a hash of the model identity (so one model's
files can all be removed) and a hash of the session key (which includes the person, so one person's key never
finds another's file, and a deleted chat's files go for every model). Names tell nobody whose session it is;
a folder this tier creates is readable by its owner only. The folder is kept under a byte budget, oldest file
first; a session larger than the whole budget is not written.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from . import host_tier

log = logging.getLogger(__name__)
DIGEST = 32  # bytes of SHA-256 ahead of the payload
NAME = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{64}\.kv$")  # the only files this tier reads, counts or removes
TMP_PREFIX = ".llm-chat-"  # a write in progress: <TMP_PREFIX><random>.tmp
STALE_TMP_S = 3600  # a write in progress older than this was left by a process that died while writing


def session_hash(key: Hashable) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()


class DiskTier:
    """A folder of session caches for one model, LRU by bytes."""

    def __init__(self, folder: str | os.PathLike, identity: str, max_bytes: int):
        """Raises ValueError where ``folder`` cannot be created or written (checked now, not at the first
        eviction)."""
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=TMP_PREFIX, suffix=".tmp"):
                pass
        except OSError as e:
            raise ValueError(f"cache_dir {str(self.folder)!r} is not a folder this process can write ({e})") from e
        self._remove_stale_writes()
        self.identity = identity
        self.max_bytes = max_bytes
        self.writes = self.reads = self.rejected = 0
        self._lock = threading.Lock()

    def _remove_stale_writes(self) -> None:
        """Removes this tier's temporary files left by a process killed while writing (only those: another server
        on the same folder may be writing one now, and other files are not ours)."""
        cutoff = time.time() - STALE_TMP_S
        for path in self.folder.glob(f"{TMP_PREFIX}*.tmp"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:  # gone meanwhile, or not ours to remove
                pass

    @property
    def _model_prefix(self) -> str:
        return hashlib.sha256(self.identity.encode()).hexdigest()[:16]

    def path(self, key: Hashable) -> Path:
        return self.folder / f"{self._model_prefix}-{session_hash(key)}.kv"

    def clear(self) -> int:
        """Removes every session file of this model (other models' files stay); returns how many."""
        files = self._files(f"{self._model_prefix}-*.kv")
        return sum(self._remove(path) for _, _, path in files)

    def forget(self, key: Hashable) -> None:
        """Removes the session's files, this model's and every other model's (a deleted chat leaves no words)."""
        for _, _, path in self._files(f"*-{session_hash(key)}.kv"):
            self._remove(path)

    def write(self, key: Hashable, payload: dict) -> bool:
        """Writes a payload (``CacheEntry.payload()``) atomically; False, with a log line, if it failed or is larger
        than the whole budget (written, it would push every other file out and then itself)."""
        tmp = None
        try:
            buffer = io.BytesIO()
            torch.save({"identity": self.identity, "session": session_hash(key), **payload}, buffer)
            data = buffer.getvalue()
            if DIGEST + len(data) > self.max_bytes:
                log.warning(
                    "a session cache of %d bytes is not written: larger than the disk budget (%d)",
                    DIGEST + len(data),
                    self.max_bytes,
                )
                return False
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=TMP_PREFIX, suffix=".tmp", delete=False) as tmp:
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
        """The session's entry from disk, or None (no file, or a file that fails its checks, which is removed)."""
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
            if payload.get("session") != session_hash(key):
                raise ValueError("it was written for another session")
            if "devices" in payload:  # written from host RAM: each tensor goes back where it came from
                payload = host_tier.placed(payload)
            entry = new_entry()
            entry.load_payload(payload)
        except Exception as e:  # damaged, foreign or unreadable: never loaded, and not read again
            log.warning("ignoring the session cache %s: %s", path.name, e)
            self._remove(path)
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
            if not NAME.match(path.name):
                continue
            try:
                stat = path.stat()
            except OSError:  # removed by another thread meanwhile
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return found

    @staticmethod
    def _remove(path: Path) -> bool:
        """Removes a session file; False, with a log line, where it cannot be (a folder shared with another user)."""
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove the session cache %s (%s)", path.name, e)
            return False
        return True

    def _shrink(self) -> None:
        files = self._files()
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if self._remove(path):
                total -= size

    def info(self) -> dict:
        """This model's files, and the whole folder's bytes (the budget is the folder's, shared with other
        models' files)."""
        mine = self._files(f"{self._model_prefix}-*.kv")
        with self._lock:
            return {
                "folder": str(self.folder),
                "sessions": len(mine),
                "bytes": sum(size for _, size, _ in mine),
                "folder_bytes": sum(size for _, size, _ in self._files()),
                "budget_bytes": self.max_bytes,
                "writes": self.writes,
                "reads": self.reads,
                "rejected": self.rejected,
            }
