"""Isolation under load, bounded memory, stop storms, bad input through every entrance, secrets kept out of logs."""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import math
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from llm_backends import SessionKey, load_model
from llm_backends.serving import ModelRegistry
from test_app import free_port

KEY = "sekret-key-123"
PROMPTS = [f"Question {i}: tell me about the number {i * 7} and the sea." for i in range(16)]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "enable_thinking": False}


@pytest.fixture(scope="module")
def server(qwen3_dir):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**28)
    registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port(), api_keys=[KEY], concurrency=16)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{config.port}", registry
    demo.close()


def reference(model, prompt: str) -> str:
    return "".join(c.text for c in model.stream_chat([{"role": "user", "content": prompt}], **GREEDY))


def test_16_parallel_http_sessions_get_their_own_exact_answers(server):
    base, registry = server
    expected = [reference(registry.get(), p) for p in PROMPTS]

    def ask(i):
        body = {
            "messages": [{"role": "user", "content": PROMPTS[i]}],
            "temperature": 0,
            "max_tokens": 10,
            "user": f"h{i}",
            "chat_template_kwargs": {"enable_thinking": False},
        }
        r = httpx.post(
            f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        )
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == expected, "cross-talk between parallel sessions"


def test_16_parallel_gradio_sessions_get_their_own_exact_answers(server):
    base, registry = server
    expected = [reference(registry.get(), p) for p in PROMPTS]
    clients = [Client(base + "/", verbose=False) for _ in range(16)]

    def ask(i):
        reply = clients[i].predict(PROMPTS[i], "", 0, 1, 0, 16, 1, 0, False, api_name="/chat")
        return "".join(m["content"] for m in reply if not (m.get("metadata") or {}).get("title"))

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    expected16 = [
        "".join(
            c.text
            for c in registry.get().stream_chat(
                [{"role": "user", "content": p}], temperature=0, max_new_tokens=16, enable_thinking=False
            )
        )
        for p in PROMPTS
    ]
    assert answers == expected16
    assert len(expected) == 16


def test_100_sessions_under_a_small_budget_evict_lru_and_answer_exactly_after(qwen3_dir):
    budget = 400_000
    model = load_model(str(qwen3_dir), max_cache_bytes=budget)
    first_answers = {}
    for i in range(100):
        messages = [{"role": "user", "content": PROMPTS[i % 16] + f" ({i})"}]
        first_answers[i] = "".join(c.text for c in model.stream_chat(messages, session_id=f"s{i}", **GREEDY))
        info = model.cache_info()
        assert info["bytes"] <= budget, info
    info = model.cache_info()
    assert info["evictions"] > 0 and info["sessions"] < 100
    # Session 0 was evicted long ago: its next turn re-prefills and answers exactly as a fresh computation.
    messages = [
        {"role": "user", "content": PROMPTS[0] + " (0)"},
        {"role": "assistant", "content": first_answers[0]},
        {"role": "user", "content": "And then?"},
    ]
    chunks = list(model.stream_chat(messages, session_id="s0", **GREEDY))
    fresh = list(model.stream_chat(messages, **GREEDY))
    own_history = len(model.render(messages[:1]))
    # Its own cache is gone; it may start from what another of the same caller's sessions shares (the
    # question's words before " (16)" and the like), never from its own evicted history.
    assert chunks[-1].stats.cached_tokens < own_history, "the evicted session's own history is gone"
    assert "".join(c.text for c in chunks) == "".join(c.text for c in fresh)


def generating_threads() -> list[str]:
    """Threads other than this one whose stack is inside the engine right now."""
    frames = sys._current_frames()
    me = threading.get_ident()
    return [
        t.name
        for t in threading.enumerate()
        if t.ident != me and t.ident in frames and "llm_backends" in "".join(traceback.format_stack(frames[t.ident]))
    ]


def test_100_start_stop_cycles_leak_no_threads_or_memory(qwen3):
    process = psutil.Process()
    messages = [{"role": "user", "content": "Tell me a long story about the sea."}]

    def cycle(i):
        stream = qwen3.stream_chat(messages, session_id=f"storm{i % 4}", max_new_tokens=500, temperature=0.8)
        for _ in itertools.islice(stream, 2):  # a couple of chunks (a sampled stop token may end it sooner)
            pass
        stream.close()

    for i in range(10):
        cycle(i)
    gc.collect()
    rss = process.memory_info().rss
    for i in range(100):
        cycle(i)
    gc.collect()
    assert generating_threads() == [], "a thread is still inside the engine"
    growth = process.memory_info().rss - rss
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 cycles"
    assert qwen3.cache_info()["in_use"] == 0
    last = list(qwen3.stream_chat(messages, session_id="storm0", temperature=0, max_new_tokens=8))
    assert last[-1].finish_reason == "length"


BAD_PYTHON = [
    ([{"role": "user", "content": ""}], {}),
    ([{"role": "user", "content": " \n\t "}], {}),
    ([{"role": "user", "content": "x " * 500_000}], {}),
    ([{"role": "tool", "content": "x"}], {}),
    ([{"role": "user", "content": {"text": "x"}}], {}),
    ([{"role": "user", "content": "hi"}], {"temperature": math.nan}),
    ([{"role": "user", "content": "hi"}], {"top_p": -1}),
    ([{"role": "user", "content": "hi"}], {"max_new_tokens": 10**12}),
]


def test_bad_input_through_the_python_api_changes_no_cache(qwen3):
    list(qwen3.stream_chat([{"role": "user", "content": "hi"}], session_id="keep", **GREEDY))
    before = qwen3.cache_info()
    for messages, kwargs in BAD_PYTHON:
        with pytest.raises(ValueError):
            qwen3.stream_chat(messages, session_id="keep", **kwargs)
    assert qwen3.cache_info() == before


def session_ids(registry, user: str) -> list[int]:
    """The token ledger one API user's cache holds (peeking at the store, for this test only)."""
    principal = "key:" + hashlib.sha256(KEY.encode()).hexdigest()[:16]
    return list(registry.get().sessions._entries[SessionKey("api", principal, user)].ids)


BAD_HTTP = [
    {"messages": [{"role": "user", "content": ""}]},
    {"messages": [{"role": "user", "content": "   "}]},
    {"messages": [{"role": "user", "content": "x " * 500_000}]},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user", "content": ["not", "parts"]}]},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e300},
    {"messages": [{"role": "user", "content": "hi"}], "top_p": -3},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12},
    {"messages": [{"role": "user", "content": "hi"}], "seed": "x"},
    {"messages": [{"role": "user", "content": "hi"}], "model": "../../etc/passwd"},
    {"messages": [{"role": "user", "content": "hi"}], "model": "/etc"},
    {"messages": [{"role": "user", "content": "hi"}], "model": "unknown-model"},
]


def test_bad_input_through_http_gets_clear_errors_and_the_server_stays_up(server):
    base, registry = server
    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "user": "keep"}
    assert httpx.post(f"{base}/v1/chat/completions", json=good, headers=auth, timeout=60).status_code == 200
    before = session_ids(registry, "keep")
    for body in BAD_HTTP:
        r = httpx.post(f"{base}/v1/chat/completions", json={**body, "user": "keep"}, headers=auth, timeout=60)
        assert r.status_code in (400, 404), (body, r.text)
        assert r.json()["error"]["message"]
    r = httpx.post(
        f"{base}/v1/chat/completions", content=b'{"messages": [', headers={**auth, "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    r = httpx.post(
        f"{base}/v1/chat/completions",
        content=b"messages=hi",
        headers={**auth, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400
    assert session_ids(registry, "keep") == before, "bad requests left the session's cache as it was"
    assert httpx.post(f"{base}/v1/chat/completions", json=good, headers=auth, timeout=60).status_code == 200


def test_bad_input_through_the_gradio_api_shows_errors_and_the_server_stays_up(server):
    base, registry = server
    client = Client(base + "/", verbose=False)
    for message in ("", "   ", "x " * 500_000):
        with pytest.raises(AppError, match="empty user message|context"):
            client.predict(message, "", 0, 1, 0, 16, 1, 0, False, api_name="/chat")
    with pytest.raises(AppError):
        client.predict("hi", "", 50, 1, 0, 16, 1, 0, False, api_name="/chat")
    with pytest.raises(AppError):
        client.predict("../../etc/passwd", api_name="/switch_model")
    assert registry.current_id == registry.ids[0]
    reply = client.predict("hi", "", 0, 1, 0, 16, 1, 0, False, api_name="/chat")
    assert reply


def test_no_secret_appears_in_logs(qwen3_dir, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    registry.switch(registry.ids[0])
    password = "pa55-word-xyz"
    config = app.parse_args(["--port", str(free_port()), "--auth", f"ann:{password}", "--api-key", KEY], env={})
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=False)
    try:
        base = f"http://127.0.0.1:{config.port}"
        httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong-guess"})
        httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        httpx.post(f"{base}/login", data={"username": "ann", "password": "bad"})
    finally:
        demo.close()
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert password not in logged and KEY not in logged
