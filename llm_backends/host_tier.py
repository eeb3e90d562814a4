"""Sessions' caches in host RAM for a model on a GPU (``host_cache_bytes``): a session evicted from GPU memory
is copied here, and copied back when it returns instead of being read again from its start. Kept least recently
used first out, by bytes; what falls out goes on to the disk tier where there is one (``cache_dir``).

On a CPU the session store's own memory is host RAM already, so a model there has no host tier unless one is
asked for (the tests ask, to run the same path without a GPU).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)


def payload_bytes(value) -> int:
    """Bytes of the tensors in a payload (``CacheEntry.payload()``): dicts, lists and tuples of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


def on_host(payload: dict) -> dict:
    """The payload with every tensor copied to host RAM, and under "devices" where each one was (a model spread
    over several GPUs has its layers on different ones), which ``placed`` reads. Pageable memory, not pinned:
    torch keeps freed pinned blocks, rounded up to a power of two, for good."""
    copies = _map(payload, lambda t: t.to("cpu", copy=True))
    return {**copies, "devices": _map(payload, lambda t: str(t.device), lambda _: None)}


def placed(payload: dict) -> dict:
    """A payload from ``on_host`` with every tensor copied back to the device it came from."""
    devices = payload["devices"]  # what was added after on_host (the disk tier's "identity") has no tensors
    return {k: _placed(v, devices.get(k)) for k, v in payload.items() if k != "devices"}


def _map(value, tensor: Callable, other: Callable = lambda v: v):
    """``value``'s dicts, lists and tuples, with ``tensor(t)`` for each tensor in them and ``other(v)`` for the
    rest."""
    if isinstance(value, torch.Tensor):
        return tensor(value)
    if isinstance(value, dict):
        return {k: _map(v, tensor, other) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, tensor, other) for v in value)
    return other(value)


def _placed(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _placed(v, device[k]) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_placed(v, d) for v, d in zip(value, device, strict=True))
    return value


class HostTier:
    """Session key -> a payload held in host RAM, least recently used first out when over ``max_bytes``."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("the host tier needs a positive byte budget")
        self.max_bytes = max_bytes
        self.puts = self.takes = self.failed = 0
        self._held: OrderedDict[Hashable, tuple[dict, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def to_host(entry) -> dict:
        """An evicted entry's payload (its states and every restore point) copied to host RAM (``on_host``).
        The entry's own tensors are copied from, not cloned first: nothing else uses an evicted entry."""
        return on_host(entry.payload(restore_points=len(entry.checkpoints), clone=False))

    def put(self, key: Hashable, payload: dict) -> list[tuple[Hashable, dict]]:
        """Holds a payload made by ``to_host``; returns the (key, payload) pairs that fell out to make room,
        oldest first. A payload larger than the whole budget falls out at once, alone: it would otherwise push
        every other session out before itself."""
        size = payload_bytes(payload)
        with self._lock:
            self._held.pop(key, None)
            self.puts += 1
            if size > self.max_bytes:
                return [(key, payload)]
            self._held[key] = (payload, size)
            fallen = []
            total = sum(s for _, s in self._held.values())
            while self._held and total > self.max_bytes:
                old, (old_payload, old_size) = self._held.popitem(last=False)
                total -= old_size
                fallen.append((old, old_payload))
            return fallen

    def take(self, key: Hashable, new_entry: Callable[[], object]):
        """The session's entry, copied back to its devices and no longer held here; None if not held, or if the
        copy back failed (say the GPU is out of memory), with a log line: the session is then read again."""
        with self._lock:
            held = self._held.pop(key, None)
        if held is None:
            return None
        try:
            entry = new_entry()
            entry.load_payload(placed(held[0]))
        except Exception as e:  # noqa: BLE001 (any failure of the copy back costs a recomputation, nothing else)
            log.warning("could not bring a session cache back from host RAM (%s); it is read again", e)
            with self._lock:
                self.failed += 1
            return None
        with self._lock:
            self.takes += 1
        return entry

    def drop(self, key: Hashable | None = None) -> None:
        """Forgets one session (or, with None, all)."""
        with self._lock:
            if key is None:
                self._held.clear()
            else:
                self._held.pop(key, None)

    def held(self) -> list[tuple[Hashable, dict]]:
        """Every (key, payload) held, oldest first (for the disk tier when the server stops)."""
        with self._lock:
            return [(key, payload) for key, (payload, _) in self._held.items()]

    def info(self) -> dict:
        with self._lock:
            return {
                "sessions": len(self._held),
                "bytes": sum(s for _, s in self._held.values()),
                "budget_bytes": self.max_bytes,
                "puts": self.puts,
                "takes": self.takes,
                "failed": self.failed,
            }
