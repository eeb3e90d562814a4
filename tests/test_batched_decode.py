"""Concurrent sessions decode in one batch, each over its own cache, and get the answers they get alone."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import TINY_LOAD
from llm_backends import cpu_kernels, load_model
from llm_backends.decode_step import DecodeStep

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
    assert batcher._decoding == 0 and not batcher._running and not batcher._pending and not batcher._arrivals


def test_greedy_sessions_take_the_shared_passs_picks_and_pick_alone_if_those_fail(gemma3, monkeypatch, caplog):
    from llm_backends import batching

    conversations = prompts(4)
    alone = [solo(gemma3, messages) for messages in conversations]
    calls, pick = [], cpu_kernels.argmax_rows

    def counted(values):
        calls.append(len(values))
        return pick(values)

    monkeypatch.setattr(batching.cpu_kernels, "argmax_rows", counted)
    assert together(gemma3, conversations) == alone
    assert calls and max(calls) > 1, "one call picked several sessions' tokens"
    assert "greedy picks failed" not in caplog.text

    def broken(values):
        raise RuntimeError("no picks")

    monkeypatch.setattr(batching.cpu_kernels, "argmax_rows", broken)
    assert together(gemma3, conversations) == alone
    assert "greedy picks failed" in caplog.text


def test_a_stream_closed_mid_batch_stops_alone(gemma3):
    conversations = prompts(4)
    alone = [solo(gemma3, messages) for messages in conversations]
    results = together(gemma3, conversations, stop_after={1: 3})
    assert results[1] == alone[1][:3]
    assert [results[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    assert gemma3.engine.runner.batcher._decoding == 0 and not gemma3.engine.runner.batcher._running


def test_a_failed_batched_step_fails_each_stream_and_leaves_its_cache_sound(qwen3_dir, monkeypatch):
    model = load_model(str(qwen3_dir), max_cache_bytes=2**26, **TINY_LOAD)
    conversations = prompts(3)
    alone = [solo(model, messages) for messages in conversations]
    step = model.engine.runner.step
    feed = step.feed

    def failing(caches, pieces, positions, wanted):
        if all(len(piece) == 1 for piece in pieces):  # decode steps only; the prompts (pieces) are still read
            raise RuntimeError("simulated device failure")
        return feed(caches, pieces, positions, wanted)

    monkeypatch.setattr(step, "feed", failing)
    results = together(model, conversations)
    assert all(isinstance(r, RuntimeError) and "simulated" in str(r) for r in results)
    monkeypatch.setattr(step, "feed", feed)
    assert model.engine.runner.batcher._decoding == 0 and not model.engine.runner.batcher._running
    again = together(model, conversations)
    assert again == alone, "after the failure the sessions answer exactly"


def test_a_prompt_that_fails_in_a_shared_pass_fails_alone(gemma3, monkeypatch):
    conversations = [[{"role": "user", "content": f"{word} fails " * (3 + i)}] for i, word in enumerate("pqrstu")]
    alone = [solo(gemma3, messages) for messages in conversations]
    others = {t for i, c in enumerate(conversations) if i != 2 for t in gemma3.render(c)}
    poison = next(t for t in gemma3.render(conversations[2]) if t not in others)  # in the third prompt only
    feed = gemma3.engine.runner.step.feed
    passes = []

    def failing(caches, pieces, positions, wanted):
        passes.append(len(pieces))
        if any(poison in piece for piece in pieces):
            raise MemoryError("simulated: no room for this prompt")
        return feed(caches, pieces, positions, wanted)

    monkeypatch.setattr(gemma3.engine.runner.step, "feed", failing)
    results = together(gemma3, conversations)
    assert isinstance(results[2], Exception) and "out of memory" in str(results[2])  # that session, and it alone
    assert [results[i] for i in (0, 1, 3, 4, 5)] == [alone[i] for i in (0, 1, 3, 4, 5)]
    assert max(passes) > 1, "the failing prompt shared a pass with others"


@pytest.mark.parametrize("name", ["gemma3_dir", "qwen3_dir"])
@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_the_written_out_decode_step_gives_transformers_logits_bit_for_bit(name, quantization, request):
    model = load_model(  # the CPU's steps (on a GPU machine too)
        str(request.getfixturevalue(name)), quantization=quantization, max_cache_bytes=2**26, device="cpu"
    )
    runner = model.engine.runner
    assert runner.step is not None and runner.step.fused_attention
    runner.step = DecodeStep.for_model(runner.model, fused_attention=False)  # the same ops as transformers
    lengths = [40, 7, 25]  # past the tiny Gemma's 16-token window, and not
    ours, theirs = ([runner.new_entry() for _ in lengths] for _ in range(2))
    for entries in (ours, theirs):
        for entry, n in zip(entries, lengths, strict=True):
            runner.forward(entry, list(range(5, 5 + n)))
    for step in range(5):
        rows = 3 if step % 2 == 0 else 1
        tokens = [10 + step + 7 * i for i in range(rows)]
        got = runner.forward_rows(ours[:rows], tokens)
        with torch.inference_mode():
            expected = runner._forward_rows(theirs[:rows], tokens)
        for entry, token in zip(theirs, tokens, strict=False):
            entry.ids.append(token)
        assert torch.equal(got, expected), step


@pytest.mark.parametrize("name", ["gemma3_dir", "qwen3_dir"])
def test_the_native_decode_step_gives_the_python_steps_logits_and_cache_bit_for_bit(name, request):
    model = load_model(str(request.getfixturevalue(name)), max_cache_bytes=2**26, device="cpu")
    runner = model.engine.runner
    native = runner.step
    assert native.native is not None, "int8 on a CPU decodes in one C++ call"
    python = DecodeStep.for_model(runner.model, native=False)
    lengths = [40, 7, 25]  # past the tiny Gemma's 16-token window, and not
    ours, theirs = ([runner.new_entry() for _ in lengths] for _ in range(2))
    for entries in (ours, theirs):
        for entry, n in zip(entries, lengths, strict=True):
            runner.forward(entry, list(range(5, 5 + n)))
    for step in range(70):  # past a cache buffer's spare room (kv_layers.STEP), so buffers move meanwhile
        rows = 3 if step % 3 else 1 + step % 2
        tokens = [10 + step + 7 * i for i in range(rows)]
        runner.step = native
        got = runner.forward_rows(ours[:rows], tokens)
        runner.step = python
        expected = runner.forward_rows(theirs[:rows], tokens)
        assert torch.equal(got, expected), step
    for a, b in zip(ours, theirs, strict=True):
        assert a.ids == b.ids
        for mine, reference in zip(a.cache.layers, b.cache.layers, strict=True):
            assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)
            assert mine.get_seq_length() == reference.get_seq_length()


@pytest.mark.parametrize("name", ["gemma3_dir", "qwen3_dir"])
def test_prompt_pieces_read_together_in_the_native_step_equal_their_tokens_decoded_one_at_a_time(name, request):
    model = load_model(str(request.getfixturevalue(name)), max_cache_bytes=2**26, device="cpu")
    step = model.engine.runner.step
    prompts = [list(range(5, 45)), list(range(7, 14)), list(range(9, 34))]  # past the tiny Gemma's window, and not
    together, alone = ([model.engine.new_entry() for _ in prompts] for _ in range(2))
    read, sizes, last, call = [0] * len(prompts), [5, 3, 17, 1, 9, 30], {}, 0
    while any(n < len(p) for n, p in zip(read, prompts, strict=True)):  # pieces of several sizes, from empty caches
        rows = [i for i, p in enumerate(prompts) if read[i] < len(p)]
        pieces = [prompts[i][read[i] : read[i] + sizes[(call + i) % len(sizes)]] for i in rows]
        wanted = [j for j, i in enumerate(rows) if read[i] + len(pieces[j]) == len(prompts[i])]
        logits = step.feed([together[i].cache for i in rows], pieces, [read[i] for i in rows], wanted)
        for j, i in enumerate(rows):
            read[i] += len(pieces[j])
        last.update({rows[j]: row for j, row in zip(wanted, logits, strict=True)})
        call += 1
    for i, prompt in enumerate(prompts):
        for position, token in enumerate(prompt):
            expected = step([alone[i].cache], [token], [position])[0]
        assert torch.equal(last[i], expected), i
        for mine, reference in zip(together[i].cache.layers, alone[i].cache.layers, strict=True):
            assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)
            assert mine.get_seq_length() == reference.get_seq_length()


def test_short_prompts_arriving_together_are_read_in_shared_passes_and_answer_as_alone(gemma3):
    batcher = gemma3.engine.runner.batcher
    # Each under RIDE_ALONG tokens, and new to the model's caches (words no other test sends).
    conversations = [[{"role": "user", "content": f"{word} arrives " * (2 + i)}] for i, word in enumerate("abcdef")]
    alone = [solo(gemma3, messages) for messages in conversations]
    calls = []
    feed = gemma3.engine.runner.step.feed

    def recording(caches, pieces, positions, wanted):
        calls.append([len(piece) for piece in pieces])
        return feed(caches, pieces, positions, wanted)

    gemma3.engine.runner.step.feed = recording
    try:
        assert together(gemma3, conversations) == alone
    finally:
        del gemma3.engine.runner.step.feed
    assert any(sum(n > 1 for n in call) > 1 for call in calls), calls  # several prompts read in one pass
    assert batcher._decoding == 0 and not batcher._running and not batcher._pending and not batcher._arrivals


def test_fused_decode_attention_is_sdpa_up_to_rounding_and_the_same_for_a_row_in_any_batch():
    import torch.nn.functional as F

    torch.manual_seed(0)
    lengths = [1, 17, 300, 64]
    keys = [torch.randn(1, 2, n + 5, 32)[:, :, :n] for n in lengths]  # views into longer storage, as in a cache
    values = [torch.randn(1, 2, n, 32) for n in lengths]
    query = torch.randn(len(lengths), 6, 32)
    together = cpu_kernels.ops().decode_attention(query, keys, values, 0.2)
    for i in range(len(lengths)):
        alone = cpu_kernels.ops().decode_attention(query[i : i + 1], keys[i : i + 1], values[i : i + 1], 0.2)
        assert torch.equal(alone[0], together[i])
        expected = F.scaled_dot_product_attention(
            query[i].view(1, 6, 1, 32), keys[i], values[i], scale=0.2, enable_gqa=True
        )
        assert torch.allclose(together[i], expected.view(6, 32), atol=1e-5)
    with pytest.raises(RuntimeError, match="one key and value tensor per row"):
        cpu_kernels.ops().decode_attention(query, keys[:2], values[:2], 0.2)


def test_the_compute_lock_goes_to_whoever_asked_first():
    import time

    from llm_backends.batching import FairLock

    lock, order = FairLock(), []
    waiting = threading.Event()

    def decode_step():
        waiting.set()
        with lock:
            order.append("decode step")

    with lock:  # a prefill's first piece
        thread = threading.Thread(target=decode_step)
        thread.start()
        waiting.wait()
        time.sleep(0.05)  # the step is waiting for the lock
    with lock:  # the prefill asks again at once for its next piece
        order.append("next piece")
    thread.join()
    assert order == ["decode step", "next piece"]


def arriving(streams: int):
    """A batcher over a stand-in forward pass that notes each pass's piece lengths; ``streams`` requests taken at
    once, each with a stand-in cache entry (the batcher only hands them on)."""
    from llm_backends.batching import DecodeBatcher

    passes = []

    def feed(entries, pieces, wanted):
        passes.append([len(piece) for piece in pieces])
        return torch.zeros(len(wanted), 4)

    batcher = DecodeBatcher(feed, max_batch=8, arrival_s=5.0)
    entries = [object() for _ in range(streams)]
    return batcher, passes, entries, [batcher.arrive() for _ in entries]


def test_streams_arriving_together_are_waited_for_and_read_in_one_pass():
    import time
    from functools import partial

    batcher, passes, entries, arrivals = arriving(4)

    def stream(i: int) -> None:
        time.sleep(0.02 * i)  # each prompt takes a while to render and its cache to be checked out
        arrivals[i].bind(entries[i])
        batcher.step(entries[i], [7] * (2 + i), decode=False)
        arrivals[i].close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert passes == [[2, 3, 4, 5]], "the first piece waited for the others' instead of going alone"
    assert not batcher._arrivals and not batcher._running and not batcher._pending

    # An arrival that ends without a step (closed, or its prompt read elsewhere) is waited for until then; one that
    # never comes, until it expires; and requests that keep coming hold a pass back for arrival_s in all.
    for end in ("close", "elsewhere", "never", "more and more"):
        batcher.arrival_s = 60.0 if end in ("close", "elsewhere") else 0.3
        waited, entry = batcher.arrive(), object()
        waited.bind(entry)
        ended = []
        endings = {"close": waited.close, "elsewhere": partial(batcher.arrived, entry), "never": lambda: None}
        endings["more and more"] = lambda: [batcher.arrive() for _ in range(3)]  # each expires 0.3 s after it came

        def end_it(end=end, ended=ended, endings=endings):
            time.sleep(0.05)
            ended.append(time.monotonic())
            endings[end]()
            if end == "more and more":
                for _ in range(10):
                    time.sleep(0.1)
                    batcher.arrive()

        ender = threading.Thread(target=end_it)
        ender.start()
        started = time.monotonic()
        batcher.step(object(), [1], decode=False)
        ran = time.monotonic()
        ender.join()
        assert ended and ran >= ended[0], f"{end}: the pass did not wait for the arrival"
        assert ran - started < (30 if end in ("close", "elsewhere") else 0.9), end
        batcher._arrivals.clear()
        assert not batcher._running


def test_a_prompt_is_read_in_small_pieces_while_others_decode_and_answers_the_same(gemma3, monkeypatch):
    messages = [{"role": "user", "content": "Tell me about the sea, the sky and the mountains. " * 12}]
    alone = solo(gemma3, messages)
    pieces = []
    forward = gemma3.engine.runner.forward

    def recording(entry, tokens, **options):
        pieces.append(len(tokens))
        return forward(entry, tokens, **options)

    monkeypatch.setattr(gemma3.engine.runner, "forward", recording)
    monkeypatch.setattr(gemma3.engine.runner, "others_decoding", lambda: True)
    monkeypatch.setattr(gemma3.engine, "shared_chunk", 16)
    assert solo(gemma3, messages) == alone
    assert len(pieces) > 3 and max(pieces) <= 16


def test_streams_whose_prompts_were_read_together_take_their_first_tokens_in_one_pass():
    import time

    batcher, passes, entries, arrivals = arriving(3)
    for arrival, entry in zip(arrivals, entries, strict=True):
        arrival.bind(entry)

    def stream(i: int) -> None:
        batcher.step(entries[i], [7] * 4, decode=False)  # the prompts, read in one pass
        time.sleep(0.03 * i)  # each handles its prompt's logits (a restore point, the first token) in its own time
        with batcher.decoding():
            batcher.step(entries[i], [1])
        arrivals[i].close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert passes == [[4, 4, 4], [1, 1, 1]], "the first session's first token went without the others'"
    assert time.monotonic() - started < 2.5, "a pass waited for a stream whose step was already pending"
    assert not batcher._arrivals and not batcher._running and not batcher._pending and batcher._decoding == 0

    # A pass that read a piece of an arriving stream's prompt gives it arrival_s again for its next step.
    arrival, entry = batcher.arrive(), object()
    arrival.bind(entry)
    arrival.expires = time.monotonic() + 1
    before = time.monotonic()
    batcher.step(entry, [7] * 4, decode=False)
    assert arrival.expires >= before + batcher.arrival_s
    arrival.close()


def test_a_stream_closed_unread_is_no_longer_waited_for_and_no_arrival_keeps_a_cache(gemma3):
    from llm_backends.batching import NO_ARRIVAL

    batcher = gemma3.engine.runner.batcher
    stream = gemma3.stream_chat([{"role": "user", "content": "never read"}], session_id="unread", **GREEDY)
    assert len(batcher._arrivals) == 1, "a CPU model with the C++ step waits for a new stream's first piece"
    stream.close()
    assert not batcher._arrivals
    NO_ARRIVAL.bind(gemma3.engine.new_entry())  # what a runner without a batcher hands out, to every stream
    assert NO_ARRIVAL.entry is None


def test_a_pass_retried_row_by_row_counts_only_the_passes_that_ran():
    from llm_backends.batching import DecodeBatcher, RowsIntact, _Step

    def feed(entries, pieces, wanted):
        if len(entries) > 1:
            raise RowsIntact() from RuntimeError("simulated: this pass changed no cache")
        return torch.zeros(len(wanted), 4)

    batcher = DecodeBatcher(feed, max_batch=8)
    steps = [_Step(object(), [1]), _Step(object(), [2])]
    batcher._run(steps)
    assert all(s.finished and s.error is None and s.logits is not None for s in steps)
    assert (batcher.batches, batcher.rows) == (2, 2), "the failed pass of two rows ran nothing"
