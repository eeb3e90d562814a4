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


def test_a_session_larger_than_the_whole_budget_goes_alone_not_everyone_else():
    store = SessionStore(max_bytes=300)
    for name in "ab":
        lease, e = store.checkout(name, lambda: entry(100))
        store.checkin(lease, e)
    lease, e = store.checkout("huge", lambda: entry(1000))
    store.checkin(lease, e)
    assert list(store._entries) == ["a", "b"] and store.info()["evictions"] == 1


def _tiered_store(tmp_path, **kwargs):
    from llm_backends import SessionKey
    from llm_backends.disk_tier import DiskTier

    store = SessionStore(max_bytes=10**6, tier=DiskTier(tmp_path, "model", 2**30), **kwargs)
    return store, [SessionKey("python", "", name) for name in "abcd"]


def _use(store, key, n_bytes=100):
    lease, e = store.checkout(key, lambda: entry(n_bytes))
    e.ids = [1, 2, 3]
    store.checkin(lease, e)


def test_writing_a_session_to_disk_holds_up_nobody_elses_checkout(tmp_path):
    import threading

    store, (a, b, c, _) = _tiered_store(tmp_path, max_sessions=1)
    writing, finish = threading.Event(), threading.Event()
    write = store.tier.write

    def slow_write(key, payload):  # a big session being written
        writing.set()
        finish.wait(10)
        return write(key, payload)

    store.tier.write = slow_write
    _use(store, a)
    evicting = threading.Thread(target=_use, args=(store, b))  # pushes a out, to disk
    evicting.start()
    try:
        assert writing.wait(10)
        done = threading.Event()
        threading.Thread(target=lambda: (store.checkout(c, lambda: entry(10)), done.set())).start()
        assert done.wait(5), "another person's checkout waited for the write"
    finally:
        finish.set()
        evicting.join(10)
    assert store.tier.path(a).exists()


def test_a_session_cleared_and_used_again_is_written_when_the_server_stops(tmp_path):
    store, (a, *_) = _tiered_store(tmp_path)
    _use(store, a)
    store.clear(a)  # New chat
    _use(store, a)  # the new chat's first reply
    store.persist()
    assert store.tier.path(a).exists() and not store._outgoing


def test_a_write_that_lands_while_its_session_is_cleared_is_removed(tmp_path):
    store, (a, b, *_) = _tiered_store(tmp_path, max_sessions=1)
    write = store.tier.write

    def cleared_meanwhile(key, payload):
        store.clear(key)  # New chat, after the copy was taken and before its file is in place
        return write(key, payload)

    store.tier.write = cleared_meanwhile
    _use(store, a)
    _use(store, b)  # evicts a
    assert not store.tier.path(a).exists() and not list(tmp_path.glob("*.kv"))


def test_failures_on_the_way_to_disk_are_logged_and_the_others_still_written(tmp_path, caplog):
    import logging

    store, (a, b, c, d) = _tiered_store(tmp_path)
    for key in (a, b, c):
        _use(store, key)

    def refusing(**kwargs):
        raise RuntimeError("CUDA out of memory")

    store._entries[b].payload = refusing
    with caplog.at_level(logging.WARNING):
        store.persist()
        store.tier.write = lambda key, payload: 1 / 0
        store.max_sessions = 1
        _use(store, d)  # evicts a, b and c; the writes fail: the reply that evicted them does not
    assert store.tier.path(a).exists() and store.tier.path(c).exists() and not store.tier.path(b).exists()
    assert "out of memory" in caplog.text and "ZeroDivisionError" in caplog.text
    store._entries[d].payload = refusing
    store.release()  # the model is let go: its memory goes even where a session cannot be written
    assert store.info()["sessions"] == 0
