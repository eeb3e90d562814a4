"""OpenAI's ``n``: several replies to one request, read from one reading of its prompt, each what a lone request
with its seed gives; through Python, /v1 (the openai client) and a remote front."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import TINY_LOAD
from llm_backends import load_model
from llm_backends.backend import CHOICE_AHEAD, MAX_CHOICES, Choices
from llm_backends.request import SessionKey
from llm_backends.session_cache import CacheEntry

# Longer than the tiny Gemma's 16-token sliding window: a copy of the prompt's cache must carry its windows.
ASK = [{"role": "user", "content": "tell me a long story about a dragon, a castle and a baker " * 3}]
SAMPLED = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 10}


def texts(reply: dict) -> list[str]:
    return [c["message"]["content"] for c in reply["choices"]]


@pytest.mark.parametrize("name", ["gemma3", "qwen3"])
def test_each_of_n_replies_is_what_a_lone_request_with_its_seed_gives(name, request):
    model = request.getfixturevalue(name)
    extra = {"enable_thinking": False} if name == "qwen3" else {}
    together = model.create(ASK, n=3, seed=11, **SAMPLED, **extra)
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    alone = [model.create(ASK, seed=11 + i, **SAMPLED, **extra) for i in range(3)]
    assert texts(together) == [texts(a)[0] for a in alone]
    assert len(set(texts(together))) > 1, "each reply has its own seed"
    assert together["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
    assert together["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    total = together["usage"]["prompt_tokens"] + together["usage"]["completion_tokens"]
    assert together["usage"]["total_tokens"] == total


def test_the_prompt_is_read_once_and_the_other_replies_start_from_its_cache(gemma3, monkeypatch):
    reads = []
    prefill = gemma3.engine.prefill
    monkeypatch.setattr(
        gemma3.engine,
        "prefill",
        lambda entry, tokens, *a, **k: reads.append(len(tokens)) or prefill(entry, tokens, *a, **k),
    )
    stream = gemma3.stream_choices(gemma3.request(ASK, temperature=0, max_new_tokens=6), 3)
    assert isinstance(stream, Choices)
    with stream:
        last = {c.index: c for c in stream if c.finish_reason is not None}
    assert sorted(last) == [0, 1, 2]
    prompt = last[0].stats.prompt_tokens
    assert reads == [prompt], "one reading of the whole prompt"
    assert last[0].stats.cached_tokens == 0
    assert [last[i].stats.cached_tokens for i in (1, 2)] == [prompt, prompt]
    # Greedy: all three are the lone greedy answer.
    greedy = gemma3.create(ASK, n=3, temperature=0, max_tokens=6)
    assert texts(greedy) == texts(gemma3.create(ASK, temperature=0, max_tokens=6)) * 3


def test_where_the_prompts_cache_cannot_be_copied_the_others_read_it_themselves(gemma3_dir, monkeypatch, caplog):
    model = load_model(str(gemma3_dir), max_cache_bytes=2**26, **TINY_LOAD)
    expected = texts(model.create(ASK, n=2, seed=5, **SAMPLED))

    def no_memory(self):
        raise MemoryError("no room")

    monkeypatch.setattr(CacheEntry, "copy", no_memory)
    monkeypatch.setattr(type(model.engine.new_entry()), "copy", no_memory)
    assert texts(model.create(ASK, n=2, seed=5, **SAMPLED)) == expected
    assert "could not copy a prompt's cache" in caplog.text


def test_streamed_replies_name_their_index_and_usage_comes_once_all_have_ended(qwen3):
    kwargs = {**SAMPLED, "seed": 3, "enable_thinking": False}
    whole = qwen3.create(ASK, n=2, **kwargs)
    events = list(qwen3.create(ASK, n=2, stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed, finishes, roles = {0: "", 1: ""}, {}, []
    for e in events[:-1]:
        (choice,) = e["choices"]
        streamed[choice["index"]] += choice["delta"].get("content") or ""
        if choice["delta"].get("role"):
            roles.append(choice["index"])
        if choice["finish_reason"]:
            assert choice["index"] not in finishes
            finishes[choice["index"]] = choice["finish_reason"]
    assert roles == [0, 1] and sorted(finishes) == [0, 1]
    assert [streamed[0], streamed[1]] == texts(whole)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_raw_completions_give_n_continuations_with_their_own_offsets(gemma3):
    prompt = "The baker opened the door and"
    together = gemma3.create_completion(prompt, n=2, seed=9, logprobs=1, **SAMPLED)
    alone = [gemma3.create_completion(prompt, seed=9 + i, logprobs=1, **SAMPLED)["choices"][0] for i in range(2)]
    assert [c["text"] for c in together["choices"]] == [a["text"] for a in alone]
    assert [c["logprobs"]["tokens"] for c in together["choices"]] == [a["logprobs"]["tokens"] for a in alone]
    events = list(gemma3.create_completion(prompt, n=2, seed=9, stream=True, logprobs=1, **SAMPLED))
    for index, expected in enumerate(alone):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == expected["text"]
        offsets = [o for c in mine if c["logprobs"] for o in c["logprobs"]["text_offset"]]
        assert offsets == expected["logprobs"]["text_offset"]
    assert gemma3.create_completion(prompt, n=2, best_of=2, max_tokens=2)["choices"][1]["index"] == 1


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"n": 0}, "n must be an integer from 1 to 16"),
        ({"n": MAX_CHOICES + 1}, "n must be"),
        ({"n": "2"}, "n must be"),
        ({"n": True}, "n must be"),
        ({"n": 1.5}, "n must be"),
    ],
)
def test_a_bad_n_is_refused_before_any_work(qwen3, fields, match):
    before = qwen3.cache_info()
    with pytest.raises(ValueError, match=match):
        qwen3.create(ASK, user="bad-n", **fields)
    with pytest.raises(ValueError, match=match):
        qwen3.create_completion("x", **fields)
    assert qwen3.cache_info() == before


def test_best_of_other_than_n_is_refused(gemma3):
    with pytest.raises(ValueError, match=r"best_of other than n \(2\)"):
        gemma3.create_completion("x", n=2, best_of=3)


def test_the_first_reply_is_the_sessions_and_the_others_are_in_none(gemma3_dir):
    model = load_model(str(gemma3_dir), max_cache_bytes=2**26, **TINY_LOAD)
    first = model.create(ASK, n=2, user="s", seed=1, **SAMPLED)
    assert model.cache_info()["sessions"] == 1
    prompt = first["usage"]["prompt_tokens"]
    held = model.sessions._entries[SessionKey("python", "", "s")].ids
    assert len(held) == prompt + SAMPLED["max_tokens"] - 1  # the last token picked is never read
    shown = model.tokenizer.decode(held[prompt:])
    assert texts(first)[0].startswith(shown) and not texts(first)[1].startswith(shown)
    for answer in texts(first):  # either answer goes on from the prompt's cache
        follow = [*ASK, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
        again = model.create(follow, user="s", temperature=0, max_tokens=2)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt
    assert model.cache_info()["sessions"] == 1


def settled(batcher) -> int:
    """The batcher's rows once no pass has run for a moment."""
    rows, deadline = -1, time.monotonic() + 10
    while rows != batcher.rows and time.monotonic() < deadline:
        rows = batcher.rows
        time.sleep(0.3)
    return rows


def test_closing_n_replies_stops_them_all_even_those_waiting_for_the_prompt(gemma3):
    batcher = gemma3.engine.runner.batcher
    for read in (0, 1, 5):
        stream = gemma3.stream_choices(gemma3.request(ASK, temperature=1.0, max_new_tokens=400), 4)
        for _, _ in zip(range(read), stream, strict=False):
            pass
        stream.close()
        rows = settled(batcher)
        time.sleep(0.5)
        assert batcher.rows == rows, "no reply went on after the close"
        assert batcher._decoding == 0 and not batcher._running and not batcher._arrivals
    assert gemma3.cache_info()["in_use"] == 0
    one = texts(gemma3.create(ASK, temperature=0, max_tokens=3))[0]
    assert texts(gemma3.create(ASK, n=2, temperature=0, max_tokens=3)) == [one, one]


def test_a_close_from_another_thread_ends_a_reader_waiting_for_the_next_chunk(gemma3):
    stream = gemma3.stream_choices(gemma3.request(ASK, temperature=1.0, max_new_tokens=4000), 3)
    got, done = [], threading.Event()

    def read():
        for chunk in stream:
            got.append(chunk)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    stream.close()
    assert done.wait(10), "the reader still waits"
    assert len(got) < 3 * 4000


def test_a_reader_that_stops_reading_stops_the_model(gemma3):
    batcher = gemma3.engine.runner.batcher
    start = settled(batcher)
    with gemma3.stream_choices(gemma3.request(ASK, temperature=1.0, max_new_tokens=2000), 3) as stream:
        next(stream)
        ran = settled(batcher)
        time.sleep(1.0)
        assert batcher.rows == ran, "the replies ran on while nobody read them"
        assert ran - start < 3 * (CHOICE_AHEAD + 8), "each ran only a few chunks ahead"


def test_when_the_first_reply_fails_reading_the_prompt_the_others_do_not_read_it(gemma3_dir, monkeypatch):
    model = load_model(str(gemma3_dir), max_cache_bytes=2**26, **TINY_LOAD)
    reads = []

    def broken(entry, tokens, cancel=None, *args, **kwargs):
        if cancel is not None and cancel.is_set():
            return None  # as prefill does: a cancelled reply reads nothing
        reads.append(len(tokens))
        raise RuntimeError("the prompt broke")

    monkeypatch.setattr(model.engine, "prefill", broken)
    with pytest.raises(RuntimeError, match="prompt broke"):
        model.create(ASK, n=3, **SAMPLED)
    time.sleep(0.5)
    assert reads == [reads[0]], "only the first reply read (tried to read) the prompt"
    monkeypatch.undo()
    assert len(model.create(ASK, n=3, **SAMPLED)["choices"]) == 3


def test_without_restore_points_the_prompt_is_still_read_once(gemma3_dir, monkeypatch):
    model = load_model(str(gemma3_dir), max_cache_bytes=2**26, restore_turns=0, **TINY_LOAD)
    reads = []
    prefill = model.engine.prefill
    monkeypatch.setattr(model.engine, "prefill", lambda e, t, *a, **k: reads.append(len(t)) or prefill(e, t, *a, **k))
    together = model.create(ASK, n=3, seed=2, **SAMPLED)
    assert len(reads) == 1
    monkeypatch.undo()
    assert texts(together) == [texts(model.create(ASK, seed=2 + i, **SAMPLED))[0] for i in range(3)]


def test_metrics_count_each_reply_and_the_prompt_once(gemma3):
    from llm_backends.metrics import Metrics

    metrics = Metrics(lambda: gemma3)
    stream = metrics.track(gemma3.stream_choices(gemma3.request(ASK, temperature=0, max_new_tokens=3), 3), "/v1")
    with stream:
        last = [c for c in stream if c.finish_reason is not None]
    value = metrics.registry.get_sample_value
    assert value("llm_replies_total", {"door": "/v1", "finish": "length"}) == 3
    assert value("llm_prompt_tokens_total") == last[0].stats.prompt_tokens
    assert value("llm_completion_tokens_total") == 9
    assert value("llm_cache_hits_total", {"tier": "memory"}) is None
    stream = metrics.track(gemma3.stream_choices(gemma3.request(ASK, temperature=0, max_new_tokens=400), 3), "/v1")
    with stream:
        next(stream)
    assert value("llm_replies_total", {"door": "/v1", "finish": "cancelled"}) == 3


def test_cancel_ends_each_reply_with_its_last_chunk(gemma3):
    stream = gemma3.stream_choices(gemma3.request(ASK, temperature=1.0, max_new_tokens=400), 2)
    finishes = {}
    with stream:
        for chunk in stream:
            if not finishes and chunk.text:
                stream.cancel()
            if chunk.finish_reason is not None:
                finishes[chunk.index] = chunk.finish_reason
    assert finishes == {0: "cancelled", 1: "cancelled"}


def test_a_reply_that_fails_ends_the_request_with_its_error(gemma3_dir, monkeypatch):
    model = load_model(str(gemma3_dir), max_cache_bytes=2**26, **TINY_LOAD)
    sampler = __import__("llm_backends.sampling", fromlist=["Sampler"]).Sampler
    pick = sampler.pick

    def failing(self, scores):
        if self.params.seed == 8:
            raise RuntimeError("the second reply broke")
        return pick(self, scores)

    monkeypatch.setattr(sampler, "pick", failing)
    with pytest.raises(RuntimeError, match="second reply broke"):
        model.create(ASK, n=2, seed=7, **SAMPLED)
    monkeypatch.undo()
    assert len(model.create(ASK, n=2, seed=7, **SAMPLED)["choices"]) == 2


def test_on_the_embedded_model_each_of_n_replies_is_its_seeds_lone_reply(embedded):
    prompt = "The capital of France is Paris. The capital of Italy is"
    fields = {"temperature": 0.9, "max_tokens": 12, "seed": 40}
    together = embedded.create_completion(prompt, n=3, **fields)
    alone = [embedded.create_completion(prompt, **{**fields, "seed": 40 + i}) for i in range(3)]
    assert [c["text"] for c in together["choices"]] == [a["choices"][0]["text"] for a in alone]
    chat = [{"role": "user", "content": "Name three colours."}]
    replies = texts(embedded.create(chat, n=2, **fields))
    assert replies == [texts(embedded.create(chat, **{**fields, "seed": 40 + i}))[0] for i in range(2)]
