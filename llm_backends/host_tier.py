"""Sessions' caches in host RAM for a model on a GPU (``host_cache_bytes``): a session evicted from GPU memory
is copied here, and copied back when it returns instead of being read again from its start. Kept least recently
used first out, by bytes; what falls out goes on to the disk tier where there is one (``cache_dir``).

On a CPU the session store's own memory is host RAM already, so a model there has no host tier unless one is
asked for (the tests ask, to run the same path without a GPU).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


def payload_bytes(value) -> int:
    """Bytes of the tensors in a payload (``CacheEntry.payload()``): dicts, lists and tuples of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


def moved(value, device: torch.device, pin: bool = False):
    """The payload with every tensor copied to ``device`` (into pinned memory with ``pin``, which a GPU copies
    from at full speed); other values as they are."""
    if isinstance(value, torch.Tensor):
        if pin:
            return torch.empty_like(value, device="cpu", pin_memory=True).copy_(value)
        return value.to(device, copy=True)
    if isinstance(value, dict):
        return {k: moved(v, device, pin) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved(v, device, pin) for v in value)
    return value


class HostTier:
    """Session key -> a payload held in host RAM, least recently used first out when over ``max_bytes``."""

    def __init__(self, max_bytes: int, device: str | torch.device):
        if max_bytes <= 0:
            raise ValueError("the host tier needs a positive byte budget")
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self.puts = self.takes = 0
        self._held: OrderedDict[Hashable, tuple[dict, int]] = OrderedDict()
        self._lock = threading.Lock()

    def to_host(self, entry) -> dict:
        """An evicted entry's payload (its states and every restore point) copied to host RAM, pinned where the
        model is on a GPU. Raises NotImplementedError for a cache kind without a payload (MLX)."""
        payload = entry.payload(restore_points=len(entry.checkpoints), clone=False)
        return moved(payload, torch.device("cpu"), pin=self.device.type == "cuda")

    def put(self, key: Hashable, payload: dict) -> list[tuple[Hashable, dict]]:
        """Holds a payload made by ``to_host``; returns the (key, payload) pairs that fell out to make room,
        oldest first (a payload larger than the whole budget falls out at once)."""
        size = payload_bytes(payload)
        with self._lock:
            self._held.pop(key, None)
            self._held[key] = (payload, size)
            self.puts += 1
            fallen = []
            total = sum(s for _, s in self._held.values())
            while self._held and total > self.max_bytes:
                old, (old_payload, old_size) = self._held.popitem(last=False)
                total -= old_size
                fallen.append((old, old_payload))
            return fallen

    def take(self, key: Hashable, new_entry: Callable[[], object]):
        """The session's entry, copied back to the model's device and no longer held here; None if not held."""
        with self._lock:
            held = self._held.pop(key, None)
        if held is None:
            return None
        entry = new_entry()
        entry.load_payload(moved(held[0], self.device))
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
            }
