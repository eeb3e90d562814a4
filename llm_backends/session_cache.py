"""Per-session KV caches, each with the exact token ids it holds; bounded by bytes and count, LRU first out.

A sliding-window layer keeps only its last window of keys, so once a conversation passes the window it
cannot be rewound. So each entry keeps restore points (llama.cpp calls them context checkpoints) where each
turn begins and at the end of each prompt: the sliding layers' states there (and at a prompt's end the logits
that followed). A retry, an undo, an edit of a recent turn or a re-tokenised answer resumes from the nearest
one instead of re-reading the whole history. Models without sliding layers rewind by cropping and keep
restore points only at prompt ends (for the logits a retry needs).
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from . import host_tier
from .request import SessionKey

log = logging.getLogger(__name__)

# A new session copies another's cache only for at least this many tokens: a copy costs a pass over the
# donor's whole cache, and re-reading a template's few head tokens costs less.
MIN_SHARED = 32
MAX_SYSTEM_PROMPTS = 16  # system prompts whose states are kept for other people's new sessions (LRU)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _is_sliding(layer) -> bool:
    return bool(getattr(layer, "is_sliding", False))


def _layer_bytes(layer) -> int:
    storage = getattr(layer, "storage_bytes", None)  # a layer with spare room (kv_layers.py) counts it
    if storage is not None:
        return storage
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None:
        return 0
    return keys.numel() * keys.element_size() + values.numel() * values.element_size()


@dataclass(frozen=True)
class Checkpoint:
    """The cache as it was when it held exactly ``length`` tokens: the sliding layers' keys and values
    (None for a full layer, which a crop rewinds) and, at a prompt's end, the logits that followed, so a
    retry needs no forward pass (None where a turn begins inside a prompt)."""

    length: int
    states: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]
    logits: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        tensors = [t for state in self.states if state is not None for t in state]
        tensors += [self.logits] if self.logits is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)


def clone_windows(layers: Sequence) -> tuple:
    """A restore point's states: each sliding layer's keys and values cloned, None for the other layers."""
    return tuple(
        (layer.keys.clone(), layer.values.clone()) if _is_sliding(layer) and layer.is_initialized else None
        for layer in layers
    )


@dataclass
class CacheEntry:
    """A KV cache and its ledger: ``ids`` are exactly the tokens the cache holds, in order."""

    make_cache: Callable[[], object]
    max_checkpoints: int = 4
    cache: object = None
    ids: list[int] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    found: str = "none"  # where the last checkout found it: memory, host, disk, shared or none (SessionStore.hits)
    # How the runner's kind of cache is copied (for another session), and its sliding layers' windows cloned (for
    # a restore point); the runner may have faster ways for its own kind.
    copy_cache: Callable[[object], object] = copy.deepcopy
    clone_windows: Callable[[Sequence], tuple] = clone_windows

    def __post_init__(self):
        if self.cache is None:
            self.cache = self.make_cache()

    @property
    def nbytes(self) -> int:
        layers = getattr(self.cache, "layers", ())
        return sum(_layer_bytes(layer) for layer in layers) + sum(c.nbytes for c in self.checkpoints)

    def reset(self) -> None:
        """Forgets everything: the next prompt is prefilled from scratch."""
        self.cache = self.make_cache()
        self.ids = []
        self.checkpoints = []

    def can_trim(self, length: int) -> bool:
        """Whether the cache can be cut back to its first ``length`` tokens in place."""
        if length >= len(self.ids):
            return True
        return not any(
            _is_sliding(layer) and layer.cumulative_length >= layer.sliding_window for layer in self.cache.layers
        )

    def trim(self, length: int) -> None:
        """Cuts the cache and ledger back to ``length`` tokens; the caller checks ``can_trim`` first."""
        remove = len(self.ids) - length
        if remove > 0:
            self.cache.crop(-remove)  # transformers 5: a negative count of tokens to remove
            del self.ids[length:]
        self.checkpoints = [c for c in self.checkpoints if c.length <= length]

    @property
    def has_sliding_layers(self) -> bool:
        return any(_is_sliding(layer) for layer in getattr(self.cache, "layers", ()))

    def save_checkpoint(self, logits: torch.Tensor | None) -> None:
        """Records a restore point at the current length; ``logits`` are the model's output there (a prompt's
        end) or None (a turn boundary inside a prompt, which only a sliding cache needs)."""
        if self.max_checkpoints <= 0 or (logits is None and not self.has_sliding_layers):
            return
        states = self.clone_windows(self.cache.layers)
        kept = [c for c in self.checkpoints if c.length != len(self.ids)]
        kept.append(Checkpoint(len(self.ids), states, None if logits is None else logits.detach().clone()))
        self.checkpoints = sorted(kept, key=lambda c: c.length)[-self.max_checkpoints :]

    def hold_logits(self, logits: torch.Tensor) -> None:
        """Keeps ``logits`` as what follows the cache's current end, so that ``rewind_for`` the tokens it holds
        needs no forward pass: a restore point that restores nothing (where none there has them already)."""
        length = len(self.ids)
        if any(c.length == length and c.logits is not None for c in self.checkpoints):
            return
        layers = getattr(self.cache, "layers", self.cache)
        kept = [c for c in self.checkpoints if c.length != length]
        self.checkpoints = [*kept, Checkpoint(length, (None,) * len(layers), logits.detach().clone())]

    def restore(self, checkpoint: Checkpoint) -> None:
        """Rewinds to a restore point: full layers are cropped, sliding layers get their saved window back."""
        remove = len(self.ids) - checkpoint.length
        for layer, state in zip(self.cache.layers, checkpoint.states, strict=True):
            if state is None:
                if not _is_sliding(layer) and remove:
                    layer.crop(-remove)
            else:
                layer.keys, layer.values = state
                layer.cumulative_length = checkpoint.length
        del self.ids[checkpoint.length :]
        self.checkpoints = [c for c in self.checkpoints if c.length <= checkpoint.length]

    def rewind_for(self, prompt_ids: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """Makes the cache hold the longest reusable prefix of ``prompt_ids``.

        Returns (tokens kept, logits after them or None). Logits come only from a restore point that holds
        the whole prompt (a retry); otherwise at least one prompt token is left to prefill. When the cache
        cannot be cut back in place it resumes from the nearest restore point, else from empty.
        """
        target = common_prefix_len(self.ids, prompt_ids)
        if target == len(prompt_ids):
            exact = [c for c in self.checkpoints if c.length == target and c.logits is not None]
            if exact:
                self.restore(exact[0])
                return target, exact[0].logits
            target -= 1
        return self.rewind_to(target), None

    def rewind_to(self, length: int) -> int:
        """Makes the cache hold at most its first ``length`` tokens (nothing after them remains): cut back in
        place, or resumed from the nearest restore point, or emptied. Returns the tokens kept."""
        if self.can_trim(length):
            self.trim(min(length, len(self.ids)))
            return len(self.ids)
        usable = [c for c in self.checkpoints if c.length <= length]
        if usable:
            self.restore(max(usable, key=lambda c: c.length))
            return len(self.ids)
        self.reset()
        return 0

    def payload(self, restore_points: int = 2, clone: bool = True) -> dict:
        """The token ids, each layer's states and the last ``restore_points`` restore points (where the last
        exchange began and its prompt ended: what a returning session needs to go on), for the disk and host
        tiers. ``clone=False`` hands over the layers' own tensors (an evicted entry, which nothing uses any more:
        no second copy on the device)."""
        layers = []
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", False) or layer.keys is None:
                layers.append(None)
                continue
            seen = getattr(layer, "cumulative_length", None)
            keys, values = (layer.keys.clone(), layer.values.clone()) if clone else (layer.keys, layer.values)
            layers.append({"keys": keys, "values": values, "seen": seen})
        kept = self.checkpoints[-restore_points:] if restore_points else []
        points = [{"length": c.length, "states": list(c.states), "logits": c.logits} for c in kept]
        return {"ids": list(self.ids), "layers": layers, "restore_points": points}

    def load_payload(self, payload: dict) -> None:
        """Takes the states ``payload()`` gave; raises ValueError if they do not fit this model's cache."""
        layers = payload["layers"]
        if len(layers) != len(self.cache.layers):
            raise ValueError(f"{len(layers)} layers stored, the model has {len(self.cache.layers)}")
        for layer, saved in zip(self.cache.layers, layers, strict=True):
            if saved is None:
                continue
            layer.lazy_initialization(saved["keys"], saved["values"])
            layer.keys, layer.values = saved["keys"], saved["values"]
            if saved["seen"] is not None:
                layer.cumulative_length = saved["seen"]
        self.ids = [int(i) for i in payload["ids"]]
        self.checkpoints = (
            [
                Checkpoint(int(c["length"]), tuple(None if x is None else tuple(x) for x in c["states"]), c["logits"])
                for c in payload.get("restore_points", [])
                if len(c["states"]) == len(layers) and int(c["length"]) <= len(self.ids)
            ][-self.max_checkpoints :]
            if self.max_checkpoints > 0
            else []
        )

    # Whether copy() works for this kind of cache (a new session may then start from this one's prefix).
    copyable = True

    def copy(self) -> CacheEntry:
        """An independent entry holding the same tokens (restore points, which are never changed, are shared)."""
        return CacheEntry(
            make_cache=self.make_cache,
            max_checkpoints=self.max_checkpoints,
            cache=self.copy_cache(self.cache),
            ids=list(self.ids),
            checkpoints=list(self.checkpoints),
            copy_cache=self.copy_cache,
            clone_windows=self.clone_windows,
        )


class _Outgoing:
    """A session's states on their way out of memory, to host RAM or disk, outside the store's lock: a clear of
    that session meanwhile cancels them (they go nowhere, and a file already written is removed)."""

    __slots__ = ("key", "cancelled")

    def __init__(self, key: Hashable):
        self.key, self.cancelled = key, False


@dataclass(eq=False)
class _KeptSystem:
    """A whole system prompt's states kept for other people's new sessions, and the sessions that sent it."""

    entry: CacheEntry
    size: int
    senders: set


class SessionStore:
    """Session key -> CacheEntry, least recently used evicted first when over the byte budget or the count.

    A stream checks its entry out for its whole run and back in at the end, so one cache is never used by
    two streams at once; a second concurrent stream of the same session simply starts from an empty cache.
    An evicted entry goes to ``host`` (host RAM, for a model on a GPU: ``host_tier.HostTier``) where there is
    one, and what falls out of that, or without it the evicted entry itself, to ``tier`` (``disk_tier.DiskTier``).
    """

    def __init__(self, max_bytes: int, max_sessions: int = 256, tier=None, host=None):
        if max_bytes <= 0 or max_sessions <= 0:
            raise ValueError("the session cache needs a positive byte budget and session count")
        self.max_bytes = max_bytes
        self.max_sessions = max_sessions
        self.tier = tier
        self.host = host
        self._outgoing: set[_Outgoing] = set()  # copies on their way to host RAM or disk now
        self.evictions = 0
        self.hits = {"memory": 0, "host": 0, "disk": 0, "shared": 0, "none": 0}
        self._entries: OrderedDict[Hashable, CacheEntry] = OrderedDict()
        # Each held entry's size, taken when it was put back (a held entry does not change), and their sum: a
        # put-back no longer walks every held entry's layers and restore points (~2 ms with 256 held).
        self._sizes: dict[Hashable, int] = {}
        self._bytes = 0
        self._leases: dict[int, Hashable] = {}
        # Per lease, the prompt it was checked out for and how much of it the operator wrote (see checkin).
        self._prompts: dict[int, tuple[Sequence[int], Callable[[], int]]] = {}
        # The states of whole system prompts (template head and system prompt, keyed by their exact ids), copied
        # once from the first session that sent each: what another person's new session may start from. Never a
        # live session, so neither its turns, its length nor its restore points can show in what is lent or how
        # long the copy takes. Counted in the byte budget, dropped before any session when over it, and when the
        # last session that sent one is cleared.
        self._systems: OrderedDict[tuple[int, ...], _KeptSystem] = OrderedDict()
        self._system_bytes = 0
        self._lease_ids = itertools.count()
        self._lock = threading.Lock()

    def checkout(
        self,
        session_id: Hashable,
        new_entry: Callable[[], CacheEntry],
        prompt_ids: Sequence[int] = (),
        shareable: Callable[[], int] = lambda: 0,
    ) -> tuple[int, CacheEntry]:
        """Takes the session's entry out of the store; returns (lease, entry).

        A session with no entry yet starts from a copy of the longest prefix of ``prompt_ids`` that one of the
        same principal's held sessions has (the owner keeps its own), or else from the kept states of a whole
        system prompt equal to the first ``shareable()`` tokens of ``prompt_ids`` (``_keep_system``): nothing of
        another person's session is copied, compared or timed, so what one person sends is never reused,
        counted or timed for another beyond a system prompt that both sent word for word.
        """
        with self._lock:
            entry = self._drop(session_id)
            lease = next(self._lease_ids)
            self._leases[lease] = session_id
            self._prompts[lease] = (prompt_ids, shareable)
        found = "memory" if entry is not None else None
        if entry is None and self.host is not None:
            entry = self.host.take(session_id, new_entry)
            found = "host" if entry is not None else None
        if entry is None and self.tier is not None:
            entry = self.tier.load(session_id, new_entry)
            found = "disk" if entry is not None else None
        donor, length = None, 0
        if entry is None:
            try:
                system = self._system_for(session_id, prompt_ids, shareable)
            except Exception:  # noqa: BLE001 (the template refused its probe, say: nothing is borrowed)
                log.exception("could not measure a prompt's system part")
                system = None
            with self._lock:
                donor, length = self._donor(session_id, prompt_ids, system)
                if donor is not None:
                    try:  # under the lock: the donor cannot be checked out and changed meanwhile
                        entry = donor.copy()
                    except Exception as e:  # noqa: BLE001 (no memory for it, say: this session starts empty)
                        log.warning("could not copy a shared prefix for a new session (%s)", e)
                        donor = None
            found = "shared" if donor is not None else "none"
        with self._lock:
            self.hits[found] += 1
        if entry is None:
            return lease, new_entry()
        entry.found = found
        if donor is not None and entry.rewind_to(length) == 0:
            entry.reset()
        return lease, entry

    def _system_for(self, session_id, prompt_ids, shareable) -> tuple[int, ...] | None:
        """The key under which another person's system prompt like this request's would be kept (its first
        ``shareable()`` ids), or None where the request has none to share."""
        if not prompt_ids or not isinstance(session_id, SessionKey):
            return None
        limit = shareable()
        return tuple(prompt_ids[:limit]) if MIN_SHARED <= limit < len(prompt_ids) else None

    def _donor(self, session_id, prompt_ids, system) -> tuple[CacheEntry | None, int]:
        """Under the lock: the entry a new session starts from and how many of its tokens: the longest prefix of
        ``prompt_ids`` among the same person's sessions, or a whole system prompt kept under ``system``."""
        if not prompt_ids or not isinstance(session_id, SessionKey):
            return None, 0
        best, best_length = None, 0
        for key, candidate in self._entries.items():
            if isinstance(key, SessionKey) and key.principal == session_id.principal and candidate.copyable:
                length = common_prefix_len(candidate.ids, prompt_ids)
                if length > best_length:
                    best, best_length = candidate, length
        kept = self._systems.get(system) if system is not None else None
        if kept is not None and len(system) > best_length:
            self._systems.move_to_end(system)
            best, best_length = kept.entry, len(system)
        length = min(best_length, len(prompt_ids) - 1)
        return (best, length) if length >= MIN_SHARED else (None, 0)

    def holds(self, lease: int) -> bool:
        """Whether ``lease`` is still out: its session was not cleared since its checkout."""
        with self._lock:
            return lease in self._leases

    def checkin(self, lease: int, entry: CacheEntry) -> None:
        """Puts an entry back unless its session was cleared meanwhile; then evicts to the budget (to the host
        and disk tiers, where there are). The first time a whole system prompt is held, its states are kept for
        other people (``_keep_system``)."""
        size = entry.nbytes  # the entry is still the caller's alone
        with self._lock:
            prompt_ids, shareable = self._prompts.pop(lease, ((), None))
            session_id = self._leases.get(lease)
        self._keep_system(session_id, entry, prompt_ids, shareable)
        with self._lock:
            session_id = self._leases.pop(lease, None)
            if session_id is None:
                return
            self._drop(session_id)  # a second stream of the same session put one back meanwhile
            self._entries[session_id] = entry
            self._sizes[session_id] = size
            self._bytes += size
            victims = self._evict(session_id)
        self._spill(victims)

    def _keep_system(self, session_id, entry: CacheEntry, prompt_ids, shareable) -> None:
        """Keeps a copy of ``entry`` cut back to its request's whole system prompt, unless one is kept already or
        the entry does not hold all of it (a prefill cancelled midway lends nothing)."""
        try:
            system = self._system_for(session_id, prompt_ids, shareable) if entry.copyable else None
        except Exception:  # noqa: BLE001 (the template refused its probe, say: nothing is kept)
            log.exception("could not measure a prompt's system part; it is not kept for others")
            return
        n = len(system) if system is not None else 0
        if not n or tuple(entry.ids[:n]) != system:
            return
        with self._lock:
            if self._held_by(system, session_id):
                return
        # Only where the cut can be made (in place, or from a restore point at the system prompt's end): a copy
        # that could not be cut back would be made and thrown away at every check-in.
        if not (entry.can_trim(n) or any(c.length == n for c in entry.checkpoints)):
            return
        try:  # outside the lock: the entry is still the caller's alone
            cut = entry.copy()
            if cut.rewind_to(n) != n:
                return
            kept = cut.copy()  # holds the n tokens only (the first copy kept room for the whole conversation)
        except Exception as e:  # noqa: BLE001 (no memory for it, say: the next one tries again)
            log.warning("could not keep a system prompt's states for others (%s)", e)
            return
        size = kept.nbytes
        with self._lock:
            if session_id not in self._leases.values():  # cleared (or the model let go) meanwhile
                return
            if self._held_by(system, session_id):
                return
            self._systems[system] = _KeptSystem(kept, size, {session_id})
            self._system_bytes += size
            while len(self._systems) > MAX_SYSTEM_PROMPTS:
                self._drop_system()

    def _held_by(self, system: tuple[int, ...], session_id) -> bool:
        """Under the lock: whether ``system`` is kept already; if so, ``session_id`` is one more that sent it."""
        kept = self._systems.get(system)
        if kept is None:
            return False
        kept.senders.add(session_id)
        self._systems.move_to_end(system)
        return True

    def _drop_system(self, system: tuple[int, ...] | None = None) -> None:
        """Under the lock: forgets ``system``'s states (the least recently used one's by default)."""
        if system is None:
            _, kept = self._systems.popitem(last=False)
        else:
            kept = self._systems.pop(system)
        self._system_bytes -= kept.size

    def _drop(self, key: Hashable) -> CacheEntry | None:
        """Takes a held entry out (under the lock); None if the session has none."""
        self._bytes -= self._sizes.pop(key, 0)
        return self._entries.pop(key, None)

    def _drop_all(self) -> None:
        self._entries.clear()
        self._sizes.clear()
        self._bytes = 0

    def _evict(self, newest: Hashable | None = None) -> list:
        """Under the lock: takes entries out until the held ones fit the budget; returns (key, entry, _Outgoing)
        for each. ``newest``, just put back, goes first if it alone is larger than the budget: it would otherwise
        push every other session out before itself."""
        victims = []
        # Kept system prompts first (within half the budget): a person's live session is worth more.
        while self._systems and (
            self._system_bytes > self.max_bytes // 2 or self._bytes + self._system_bytes > self.max_bytes
        ):
            self._drop_system()
        oversized = newest is not None and self._sizes.get(newest, 0) > self.max_bytes
        while self._entries and (
            self._bytes + self._system_bytes > self.max_bytes or len(self._entries) > self.max_sessions
        ):
            key = newest if oversized else next(iter(self._entries))  # else the least recently used
            oversized = False
            victims.append((key, self._drop(key), self._outgo(key)))
            self.evictions += 1
        return victims

    def _outgo(self, key: Hashable) -> _Outgoing:
        """Under the lock: marks a copy of ``key``'s states as on its way out (``clear`` cancels it)."""
        outgoing = _Outgoing(key)
        self._outgoing.add(outgoing)
        return outgoing

    def _spill(self, victims: list) -> None:
        """Evicted (key, entry, _Outgoing) go to host RAM, and what falls out of it to disk; without a host tier
        they go to disk. Sessions cleared meanwhile go nowhere."""
        if self.host is None and self.tier is None:  # nowhere to go (the usual case): nothing to copy or wait for
            with self._lock:
                self._outgoing.difference_update(outgoing for _, _, outgoing in victims)
            return
        if self.host is None:
            self._save(
                [(key, lambda v=victim: host_tier.on_host(v.payload(clone=False)), out) for key, victim, out in victims]
            )
            return
        fallen = []
        for key, victim, outgoing in victims:
            try:
                payload = self.host.to_host(victim)  # the copy, outside the lock
            except NotImplementedError:  # a cache kind the tiers do not hold
                payload = None
            except Exception as e:  # noqa: BLE001 (no room in RAM, say: the session is read again when it returns)
                log.warning("could not copy a session cache to host RAM (%s)", e)
                payload = None
            with self._lock:
                self._outgoing.discard(outgoing)
                if payload is not None and not outgoing.cancelled:
                    fallen += [(k, p, self._outgo(k)) for k, p in self.host.put(key, payload)]
        self._save(fallen)

    def _save(self, pending: list) -> None:
        """Writes (key, payload or a function giving it, _Outgoing) to the disk tier, outside the store's lock (a
        write takes as long as the session is big: nobody else's checkout waits for it, or can time it), except
        sessions cleared meanwhile; a file written while its session was being cleared is removed."""
        for key, payload, outgoing in pending:
            try:
                if self.tier is None or not isinstance(key, SessionKey) or outgoing.cancelled:
                    continue
                try:
                    data = payload() if callable(payload) else payload
                except NotImplementedError:  # a cache kind the tier does not hold (MLX)
                    continue
                written = self.tier.write(key, data)
                with self._lock:  # clear() cancels, then removes the files: one of the two removals sees this one
                    cancelled = outgoing.cancelled
                if written and cancelled:
                    self.tier.forget(key)
            except Exception:  # noqa: BLE001 (the session is read again when it returns; the reply goes on)
                log.exception("could not write a session cache to disk")
            finally:
                with self._lock:
                    self._outgoing.discard(outgoing)

    def persist(self) -> None:
        """Writes every session held in memory and in host RAM to the disk tier (when the server stops); they
        stay held. One session at a time is copied to host RAM, under the lock (so no reply changes it halfway
        through), and written outside it; one that fails is logged and the rest are still written."""
        if self.tier is None:
            return
        with self._lock:
            held = [] if self.host is None else [(k, p, self._outgo(k)) for k, p in self.host.held()]
            keys = [key for key in self._entries if isinstance(key, SessionKey)]
        self._save(held)
        for key in keys:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:  # checked out or evicted meanwhile
                    continue
                try:
                    payload = host_tier.on_host(entry.payload(clone=False))
                except NotImplementedError:  # a cache kind the tier does not hold (MLX)
                    continue
                except Exception as e:  # noqa: BLE001 (no room in RAM, say: this one is recomputed when it returns)
                    log.warning("could not copy a session cache for the disk (%s)", e)
                    continue
                outgoing = self._outgo(key)
            self._save([(key, payload, outgoing)])

    def release(self) -> None:
        """Frees the memory of every session (the model is being let go): with a disk tier they are written
        there first, so they resume when this model is loaded again."""
        try:
            self.persist()
        except Exception:  # noqa: BLE001 (the memory is let go all the same)
            log.exception("could not write the sessions to disk before letting the model go")
        with self._lock:
            self._drop_all()
            self._leases.clear()
            self._prompts.clear()
            self._systems.clear()
            self._system_bytes = 0
            if self.host is not None:
                self.host.drop()

    def clear(self, session_id: Hashable | None = None) -> None:
        """Drops one session's cache (or all), on disk too (a session's files for every model), including any that
        a running stream would put back or an eviction is copying out."""
        with self._lock:
            if session_id is None:
                self._drop_all()
                self._leases.clear()
                self._prompts.clear()
                self._systems.clear()
                self._system_bytes = 0
            else:
                self._drop(session_id)
                for system, kept in list(self._systems.items()):  # what nobody who sent it still holds goes too
                    kept.senders.discard(session_id)
                    if not kept.senders:
                        self._drop_system(system)
                for lease in [k for k, v in self._leases.items() if v == session_id]:
                    del self._leases[lease]
                    self._prompts.pop(lease, None)
            for outgoing in self._outgoing:
                if session_id is None or outgoing.key == session_id:
                    outgoing.cancelled = True
            if self.host is not None:
                self.host.drop(session_id)
        # The files go after the lock (a folder's listing): a write that lands meanwhile sees itself cancelled and
        # removes its file (_save).
        if self.tier is not None:
            if session_id is None:
                self.tier.clear()
            else:
                self.tier.forget(session_id)

    def info(self) -> dict:
        with self._lock:
            return {
                "sessions": len(self._entries),
                "bytes": self._bytes + self._system_bytes,
                "system_prompts": {"held": len(self._systems), "bytes": self._system_bytes},
                "budget_bytes": self.max_bytes,
                "max_sessions": self.max_sessions,
                "evictions": self.evictions,
                "in_use": len(self._leases),
                "hits": dict(self.hits),
                "host": None if self.host is None else self.host.info(),
                "disk": None if self.tier is None else self.tier.info(),
            }
