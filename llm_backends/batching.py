"""Concurrent sessions' decode steps as one forward pass: the batcher, and the attention that lets each row
of the batch read its own session's cache. The one place that reaches into transformers' attention registry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import cpu_kernels
from .session_cache import CacheEntry

ROW_ATTENTION = "llm_chat_rows"
log = logging.getLogger(__name__)


class RowStates:
    """One layer's keys and values for each row of a batched decode step (rows differ in length)."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values


class RowCaches:
    """Stands in for a transformers Cache in a batched decode step: row i's new key/value go into session
    i's own cache, and the attention sees each row's full states (``RowStates``), not a padded batch."""

    def __init__(self, caches: list):
        self.caches = caches

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = [], []
        for i, cache in enumerate(self.caches):
            k, v = cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx)
            keys.append(k)
            values.append(v)
        states = RowStates(keys, values)
        return states, states


def _row_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, except that a batched decode step (``RowStates``) attends row by row over each row's cache.

    A decode row attends to everything its cache returns: full layers hold the whole history and sliding
    layers return exactly the last window, so no mask is needed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, RowStates):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = [
        sdpa_attention_forward(module, query[i : i + 1], k, v, None, **kwargs)[0]
        for i, (k, v) in enumerate(zip(key.keys, key.values, strict=True))
    ]
    return torch.cat(rows, dim=0), None


def use_row_attention(model) -> bool:
    """Switches an sdpa model to the row-aware attention (registered once); False where it cannot."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", ROW_ATTENTION):
        return False
    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
    model.set_attn_implementation(ROW_ATTENTION)
    return True


@dataclass(eq=False)
class _Step:
    entry: CacheEntry
    tokens: list[int]
    wants_logits: bool = True
    decode: bool = True  # a decoding session's next token (the lead waits for those), not a piece of a prompt
    greedy: bool = False  # wants the argmax of its logits too (the pass picks all of them at once)
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    finished: bool = False
    logits: torch.Tensor | None = None
    best: int | None = None
    error: BaseException | None = None


class RowsIntact(Exception):
    """A pass failed without changing any of its sessions' caches (the C++ step writes only into spare room
    until it has finished): the batcher runs its steps again one by one. ``__cause__`` is the failure."""


class Arrival:
    """A stream on its way to its first decode step: its request taken, its prompt being rendered, its cache
    checked out, its prompt read. While it has no step pending a lead waits for it a moment (until ``expires``,
    set again when a pass has read a piece of its prompt), so that streams arriving together read their prompts
    in one pass, not one pass each while the others' preparation shares the cores, and then start decoding in one
    pass too. ``bind`` names its cache entry once it has one; its first decode step, a forward pass outside the
    batcher (a long prompt), or ``close`` ends it."""

    __slots__ = ("_batcher", "entry", "expires")

    def __init__(self, batcher: DecodeBatcher | None, expires: float):
        self._batcher = batcher
        self.entry: CacheEntry | None = None
        self.expires = expires

    def bind(self, entry: CacheEntry) -> None:
        if self._batcher is not None:  # NO_ARRIVAL, shared, must not keep a finished reply's cache alive
            self.entry = entry

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher._end(self)


NO_ARRIVAL = Arrival(None, 0.0)  # for a runner without a batcher


class FairLock:
    """A lock taken in the order it was asked for. ``threading.Lock`` is not: a thread that releases it and asks
    again at once, as a long prefill does between its pieces, usually gets it back before a decode step that
    has been waiting, so everyone else's tokens would stop until the whole prompt is read."""

    def __init__(self):
        self._turns = threading.Condition()
        self._next = 0  # the next ticket handed out
        self._serving = 0  # the ticket whose turn it is

    def __enter__(self) -> FairLock:
        with self._turns:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._turns.wait()
        return self

    def __exit__(self, *exc) -> None:
        with self._turns:
            self._serving += 1
            self._turns.notify_all()


class DecodeBatcher:
    """Runs concurrent sessions' decode steps as one forward pass, without a thread of its own.

    A session asking for a step joins the pending list. If no step is running, it leads: it waits a moment
    (at most ``gather_s``) for the other decoding sessions to ask too, takes up to ``max_batch`` pending
    steps, runs them, hands each its logits, and passes the lead to the oldest step still pending. So the
    work happens in the callers' threads and one session alone never waits.

    A step may also carry a short piece of a prompt (several tokens, logits wanted or not): arriving prompts are
    then read in the same forward pass as the others' next tokens, up to ``max_tokens`` tokens per pass.

    A greedy session's step also gets the argmax of its logits, picked for all such rows at once by the lead: a
    session thread that picked its own let go of the interpreter lock for it, and with eight sessions each
    waited ~1 ms to get it back behind the others, while the next pass waited for the last of them.

    The lead also waits a moment (``arrival_s``) for streams still on their way to their first decode step
    (``arrive``): eight requests at once then read their prompts in one pass instead of one each, and start
    decoding together.
    """

    def __init__(
        self,
        feed_rows: Callable[[Sequence[CacheEntry], Sequence[Sequence[int]], Sequence[int]], torch.Tensor],
        max_batch: int,
        gather_s: float = 0.01,
        max_tokens: int = 256,
        arrival_s: float = 0.03,
    ):
        self.feed_rows = feed_rows
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.max_tokens = max_tokens
        self.arrival_s = arrival_s
        self._lock = threading.Condition()
        self._pending: list[_Step] = []
        self._arrivals: list[Arrival] = []
        self._running = False
        self._decoding = 0  # sessions between their first and last decode step
        self.batches = 0
        self.rows = 0

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Held by a session from its first to its last decode step: the lead waits for such sessions."""
        self.join()
        try:
            yield
        finally:
            self.leave()

    @property
    def sessions_decoding(self) -> int:
        return self._decoding

    def join(self) -> None:
        with self._lock:
            self._decoding += 1

    def leave(self) -> None:
        with self._lock:
            self._decoding -= 1
            self._lock.notify_all()

    def arrive(self) -> Arrival:
        """A new stream announces itself (see ``Arrival``); it expires ``arrival_s`` from now."""
        now = time.monotonic()
        arrival = Arrival(self, now + self.arrival_s)
        with self._lock:
            self._arrivals = [a for a in self._arrivals if a.expires > now]  # those of streams never read
            self._arrivals.append(arrival)
        return arrival

    def arrived(self, entry: CacheEntry) -> None:
        """``entry``'s stream has begun its first forward pass elsewhere (a long prompt): no longer waited for."""
        with self._lock:
            self._end_arrival(entry)

    def _end(self, arrival: Arrival) -> None:
        with self._lock:
            if arrival in self._arrivals:
                self._arrivals.remove(arrival)
                self._lock.notify_all()

    def _end_arrival(self, entry: CacheEntry) -> None:
        """Under the lock: the arrival bound to ``entry``, if any, has arrived."""
        for arrival in self._arrivals:
            if arrival.entry is entry:
                self._arrivals.remove(arrival)
                self._lock.notify_all()
                return

    def step(
        self,
        entry: CacheEntry,
        tokens: Sequence[int],
        *,
        logits: bool = True,
        decode: bool = True,
        greedy: bool = False,
    ) -> tuple[torch.Tensor | None, int | None]:
        """Feeds ``tokens`` into ``entry`` in a shared pass; returns the last token's logits (None without
        ``logits``) and, with ``greedy``, their argmax (else None). ``decode``: the session's next token while it
        decodes (rather than a piece of its prompt)."""
        step = _Step(entry, list(tokens), logits, decode, greedy and logits)
        with self._lock:
            if decode:  # in the same breath as the step joins: a lead never runs between the two
                self._end_arrival(entry)
            self._pending.append(step)
            self._lock.notify_all()
            if self._running:
                lead = False
            else:
                self._running = lead = True
        if not lead:
            step.done.wait()
            if not step.lead:
                return self._result(step)
        try:
            while not step.finished:
                self._run(self._take())
        finally:  # whatever happens, the lead passes on: a lost lead would stall every session
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.done.set()
                else:
                    self._running = False
        return self._result(step)

    def _take(self) -> list[_Step]:
        started = time.monotonic()
        deadline = started + self.gather_s
        with self._lock:
            while not self._full():
                now = time.monotonic()
                # Arriving streams without a step pending are waited for until each expires, and in all at most
                # arrival_s: requests that keep coming must not hold the decoding sessions back for longer.
                self._arrivals = [a for a in self._arrivals if a.expires > now]
                pending = {id(s.entry) for s in self._pending}
                awaited = [a.expires for a in self._arrivals if a.entry is None or id(a.entry) not in pending]
                until = min(max(awaited, default=now), started + self.arrival_s)
                if sum(s.decode for s in self._pending) < min(self._decoding, self.max_batch):
                    until = max(until, deadline)
                if until <= now:
                    break
                self._lock.wait(until - now)
            batch, rest, tokens = [], [], 0
            for s in self._pending:  # in the order asked, every one that fits (the first one always)
                if not batch or (len(batch) < self.max_batch and tokens + len(s.tokens) <= self.max_tokens):
                    batch.append(s)
                    tokens += len(s.tokens)
                else:
                    rest.append(s)
            self._pending = rest
            return batch

    def _full(self) -> bool:
        """Whether the pending steps already fill a pass (waiting for more would only delay it)."""
        return len(self._pending) >= self.max_batch or sum(len(s.tokens) for s in self._pending) >= self.max_tokens

    def _run(self, batch: list[_Step]) -> None:
        wanted = [i for i, s in enumerate(batch) if s.wants_logits]
        ran = True  # counted in batches and rows (a pass retried step by step counts as its retries)
        try:
            try:
                logits = self.feed_rows([s.entry for s in batch], [s.tokens for s in batch], wanted)
            except Exception as e:
                if len(batch) > 1 and isinstance(e, RowsIntact):
                    # The caches are as they were: each step again alone, so only the steps that fail fail
                    # (a prompt too long for memory must not end everyone else's reply).
                    ran = False
                    for s in batch:
                        self._run([s])
                    return
                raise
            for row, i in enumerate(wanted):
                batch[i].logits = logits[row]
            if any(batch[i].greedy for i in wanted):
                try:
                    picks = cpu_kernels.argmax_rows(logits)
                except Exception:  # the caches have moved on already: the sessions pick from their logits instead
                    log.exception("the shared pass's greedy picks failed")
                else:
                    for row, i in enumerate(wanted):
                        if batch[i].greedy:
                            batch[i].best = picks[row]
        except BaseException as e:
            for s in batch:
                s.error = e.__cause__ if isinstance(e, RowsIntact) and e.__cause__ is not None else e
        finally:
            if ran:
                self.batches += 1
                self.rows += len(batch)
            read = {id(s.entry) for s in batch if not s.decode}
            if read:
                with self._lock:  # their next step (a piece, or the first token's) comes once they have handled this
                    expires = time.monotonic() + self.arrival_s
                    for arrival in self._arrivals:
                        if id(arrival.entry) in read:
                            arrival.expires = max(arrival.expires, expires)
            for s in batch:
                s.lead = False
                s.finished = True
                s.done.set()

    @staticmethod
    def _result(step: _Step) -> tuple[torch.Tensor | None, int | None]:
        if step.error is not None:
            raise step.error
        return step.logits, step.best
