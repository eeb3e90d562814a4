"""Streaming: chunks grow a reply, the last chunk carries finish_reason and stats; closing stops the model."""

from __future__ import annotations

import threading

from forwards import count_forwards

from llm_backends import Chunk

GOOD = [{"role": "user", "content": "Tell me about the sea and the sky."}]


def test_last_chunk_carries_finish_reason_and_stats(qwen3):
    chunks = list(qwen3.stream_chat(GOOD, temperature=0, max_new_tokens=12))
    assert all(isinstance(c, Chunk) for c in chunks)
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length"
    s = last.stats
    assert s.completion_tokens == 12 and s.prompt_tokens > 5 and s.cached_tokens == 0
    assert 0 < s.ttft_s <= s.total_s and s.tokens_per_s > 0


def test_closing_a_stream_stops_the_model_within_one_token(qwen3):
    threads = threading.active_count()
    calls, handle = count_forwards(qwen3)
    try:
        stream = qwen3.stream_chat(GOOD, temperature=0, max_new_tokens=200, session_id="closing")
        next(stream)
        next(stream)
        stream.close()
        at_close = len(calls)
        assert at_close < 10
        assert qwen3.cache_info()["in_use"] == 0, "the session's cache was returned"
        assert threading.active_count() == threads, "no thread keeps generating"
        assert len(calls) == at_close
    finally:
        handle.remove()


def test_dropping_a_stream_returns_its_session(qwen3):
    import gc

    stream = qwen3.stream_chat(GOOD, temperature=0, max_new_tokens=200, session_id="dropped")
    next(stream)
    del stream
    gc.collect()
    assert qwen3.cache_info()["in_use"] == 0


def test_cancel_ends_with_a_cancelled_chunk_and_stats(qwen3):
    stream = qwen3.stream_chat(GOOD, temperature=0, max_new_tokens=200)
    chunks = [next(stream)]
    stream.cancel()
    chunks += list(stream)
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].stats.completion_tokens < 20


def test_stop_string_ends_the_reply_with_stop(qwen3):
    full = "".join(c.text for c in qwen3.stream_chat(GOOD, temperature=0, max_new_tokens=30, enable_thinking=False))
    marker = full.strip()[3:6]
    assert marker, full
    chunks = list(qwen3.stream_chat(GOOD, temperature=0, max_new_tokens=30, stop=[marker], enable_thinking=False))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert marker not in text and full.startswith(text)


def test_seeded_sampling_is_reproducible(qwen3):
    def sample(seed):
        stream = qwen3.stream_chat(GOOD, temperature=1.0, top_k=50, top_p=0.9, seed=seed, max_new_tokens=20)
        return "".join(c.text + c.reasoning for c in stream)

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_repetition_penalty_changes_greedy_output(qwen3):
    plain = list(qwen3.stream_chat(GOOD, temperature=0, max_new_tokens=30))
    penalised = list(qwen3.stream_chat(GOOD, temperature=0, max_new_tokens=30, repetition_penalty=5.0))
    assert "".join(c.reasoning for c in plain) != "".join(c.reasoning for c in penalised)
