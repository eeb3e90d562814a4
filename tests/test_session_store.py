"""The session store: LRU by bytes and by count, clears that win over running streams."""

from __future__ import annotations

import pytest
import torch

from llm_backends.session_cache import CacheEntry, SessionStore, common_prefix_len


class Layer:
    is_sliding = False

    def __init__(self, n_bytes: int):
        self.keys = torch.zeros(n_bytes // 2, dtype=torch.uint8)
        self.values = torch.zeros(n_bytes // 2, dtype=torch.uint8)


class FakeCache:
    def __init__(self, n_bytes: int = 0):
        self.layers = [Layer(n_bytes)]


def entry(n_bytes: int) -> CacheEntry:
    return CacheEntry(make_cache=lambda: FakeCache(n_bytes))


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_store_evicts_least_recently_used_first_when_over_bytes():
    store = SessionStore(max_bytes=300)
    for name in "abc":
        lease, e = store.checkout(name, lambda: entry(100))
        store.checkin(lease, e)
    lease, e = store.checkout("a", lambda: entry(100))  # a becomes most recent
    store.checkin(lease, e)
    lease, e = store.checkout("d", lambda: entry(100))
    store.checkin(lease, e)
    info = store.info()
    assert info["sessions"] == 3 and info["bytes"] <= 300 and info["evictions"] == 1
    lease, e = store.checkout("b", lambda: entry(7))
    assert e.nbytes == 6, "b was the least recently used and was evicted"
    store.checkin(lease, e)


def test_store_bounds_session_count():
    store = SessionStore(max_bytes=10**9, max_sessions=2)
    for name in "abc":
        lease, e = store.checkout(name, lambda: entry(10))
        store.checkin(lease, e)
    assert store.info()["sessions"] == 2 and store.info()["evictions"] == 1


def test_clear_during_a_stream_drops_what_it_would_put_back():
    store = SessionStore(max_bytes=10**6)
    lease, e = store.checkout("a", lambda: entry(10))
    store.clear("a")
    store.checkin(lease, e)
    assert store.info()["sessions"] == 0
    lease, e = store.checkout("b", lambda: entry(10))
    store.clear()
    store.checkin(lease, e)
    assert store.info()["sessions"] == 0 and store.info()["in_use"] == 0


def test_store_rejects_a_non_positive_budget():
    with pytest.raises(ValueError):
        SessionStore(max_bytes=0)


def test_putting_an_entry_back_sizes_that_entry_alone_not_every_held_one():
    sized = []

    class Counted(CacheEntry):
        @property
        def nbytes(self) -> int:
            sized.append(self)
            return super().nbytes

    store = SessionStore(max_bytes=10**6)
    for name in range(50):
        lease, e = store.checkout(name, lambda: Counted(make_cache=lambda: FakeCache(100)))
        store.checkin(lease, e)
    sized.clear()
    lease, e = store.checkout(7, lambda: entry(100))
    store.checkin(lease, e)
    assert len(sized) <= 1, "a put-back walked every held entry's layers"
    assert store.info()["bytes"] == 50 * 100 and store.info()["sessions"] == 50
    store.clear(8)
    assert store.info()["bytes"] == 49 * 100
    lease, e = store.checkout(9, lambda: entry(100))  # out, then back with more tokens: counted at its new size
    e.cache.layers.append(Layer(40))
    store.checkin(lease, e)
    assert store.info()["bytes"] == 48 * 100 + 140
    store.clear()
    assert store.info()["bytes"] == 0 and store.info()["sessions"] == 0


def test_the_held_bytes_stay_the_sum_of_the_held_entries():
    store = SessionStore(max_bytes=1000, max_sessions=5)

    def held() -> int:
        return sum(e.nbytes for e in store._entries.values())

    for name in range(8):  # over the count, then over the bytes
        lease, e = store.checkout(name, lambda name=name: entry(100 + 50 * name))
        store.checkin(lease, e)
        assert store.info()["bytes"] == held() <= 1000
    first, a = store.checkout("twice", lambda: entry(10))  # one session's two streams at once
    second, b = store.checkout("twice", lambda: entry(30))
    store.checkin(first, a)
    store.checkin(second, b)
    lease, c = store.checkout(7, lambda: entry(1))
    store.clear(7)  # cleared during its stream: not put back
    store.checkin(lease, c)
    assert store.info()["bytes"] == held()
    store.release()
    assert store.info()["bytes"] == 0 == held()
