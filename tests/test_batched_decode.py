"""Concurrent sessions decode in one batch, each over its own cache, and get the answers they get alone."""

from __future__ import annotations

import threading

import pytest

from llm_backends import load_model

GREEDY = {"temperature": 0, "max_new_tokens": 24}


def prompts(n: int) -> list[list[dict]]:
    # Different lengths, some past the tiny Gemma's 16-token sliding window.
    return [[{"role": "user", "content": "tell me more " * (1 + 3 * i) + f"about number {i}"}] for i in range(n)]


def solo(model, messages) -> list[str]:
    return [c.text for c in model.stream_chat(messages, **GREEDY)]


def together(model, conversations, *, stop_after: dict[int, int] | None = None) -> list:
    results: list = [None] * len(conversations)
    barrier = threading.Barrier(len(conversations))

    def run(i: int) -> None:
        try:
            barrier.wait()
            stream = model.stream_chat(conversations[i], session_id=f"batch-{i}", **GREEDY)
            texts = []
            for chunk in stream:
                texts.append(chunk.text)
                if stop_after and len(texts) == stop_after.get(i):
                    stream.close()
                    break
            results[i] = texts
        except Exception as e:  # handed to the test thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.mark.parametrize("name", ["gemma3", "qwen3"])
def test_concurrent_sessions_batch_and_match_their_solo_answers(name, request):
    model = request.getfixturevalue(name)
    batcher = model.engine.runner.batcher
    assert batcher is not None, "the transformers engine batches decode steps"
    conversations = prompts(6)
    alone = [solo(model, messages) for messages in conversations]
    batches, rows = batcher.batches, batcher.rows
    results = together(model, conversations)
    assert results == alone
    assert (batcher.rows - rows) / (batcher.batches - batches) > 2, "steps of different sessions shared a pass"
    assert batcher._decoding == 0 and not batcher._running and not batcher._pending


def test_a_stream_closed_mid_batch_stops_alone(gemma3):
    conversations = prompts(4)
    alone = [solo(gemma3, messages) for messages in conversations]
    results = together(gemma3, conversations, stop_after={1: 3})
    assert results[1] == alone[1][:3]
    assert [results[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    assert gemma3.engine.runner.batcher._decoding == 0 and not gemma3.engine.runner.batcher._running


def test_a_failed_batched_step_fails_each_stream_and_resets_its_cache(qwen3_dir, monkeypatch):
    model = load_model(str(qwen3_dir), max_cache_bytes=2**26)
    conversations = prompts(3)
    alone = [solo(model, messages) for messages in conversations]
    forward = model.model.forward

    def failing(*args, **kwargs):
        if kwargs.get("position_ids") is not None:  # only the batched decode step passes positions
            raise RuntimeError("simulated device failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", failing)
    results = together(model, conversations)
    assert all(isinstance(r, RuntimeError) and "simulated" in str(r) for r in results)
    monkeypatch.setattr(model.model, "forward", forward)
    assert model.engine.runner.batcher._decoding == 0 and not model.engine.runner.batcher._running
    again = together(model, conversations)
    assert again == alone, "after the failure the sessions answer exactly, from a fresh cache"
