"""One contract: a request built once with the family's defaults, one backend interface the page and /v1 use
alone, one cancellation path, errors as one clear message at every door, the seed surface streaming thoughts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from forwards import count_forwards
from gradio_client import Client

import app
from llm_backends import ChatStream, Qwen3Object, SessionKey, build_request, load_model
from llm_backends.backend import ChatModel, ModelInfo
from llm_backends.chunks import Chunk, Stats
from llm_backends.registry import BACKENDS
from llm_backends.serving import ModelRegistry
from test_app import free_port

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


def spy_requests(model) -> list:
    """Records every ChatRequest the model is asked to stream (the instance attribute shadows the method)."""
    seen, stream = [], model.stream

    def recording(request):
        seen.append(request)
        return stream(request)

    model.stream = recording
    return seen


# --- 1. one request object ----------------------------------------------------------------------------------


def test_unset_sampling_takes_the_family_defaults_through_every_door(qwen3, gemma3):
    thinking = qwen3.request(HELLO).sampling
    assert (thinking.temperature, thinking.top_p, thinking.top_k) == (0.6, 0.95, 20)
    plain = qwen3.request(HELLO, thinking=False).sampling
    assert (plain.temperature, plain.top_p, plain.top_k) == (0.7, 0.8, 20)
    gemma = gemma3.request(HELLO).sampling
    assert (gemma.temperature, gemma.top_p, gemma.top_k, gemma.max_new_tokens) == (1.0, 0.95, 64, 512)
    assert gemma3.request(HELLO, top_k=0, temperature=0).sampling.top_k is None, "explicit values win; 0 = off"

    seen = spy_requests(qwen3)
    try:
        list(qwen3.stream_chat(HELLO, max_new_tokens=2))
        qwen3.create(HELLO, max_tokens=2)
        list(qwen3.create(HELLO, max_tokens=2, stream=True))
    finally:
        del qwen3.stream
    assert [r.sampling for r in seen] == [qwen3.request(HELLO, max_new_tokens=2).sampling] * 3


def test_an_api_caller_gets_the_family_defaults_over_http(qwen3_dir):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    model = registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port())
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    seen = spy_requests(model)
    try:
        body = {"messages": HELLO, "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}}
        r = httpx.post(f"http://127.0.0.1:{config.port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        demo.close()
    (request,) = seen
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.top_k) == (0.7, 0.8, 20)
    assert request.session is None and request.thinking is False


def test_a_python_caller_names_and_clears_its_own_sessions_by_string(qwen3):
    list(qwen3.stream_chat(HELLO, session_id="alice", temperature=0, max_new_tokens=2))
    assert SessionKey("python", "", "alice") in qwen3.sessions._entries
    qwen3.clear_cache("alice")
    assert SessionKey("python", "", "alice") not in qwen3.sessions._entries


def test_a_request_names_sessions_only_through_session_keys():
    with pytest.raises(ValueError, match="SessionKey"):
        build_request(HELLO, family=None, context_length=None, session="page-hash")
    with pytest.raises(ValueError, match="space"):
        SessionKey("admin", "", "x")


# --- 2. one backend interface --------------------------------------------------------------------------------


class EchoModel(ChatModel):
    """A fourth backend written against the interface alone: it answers with the last message reversed."""

    def __init__(self, target):
        self.info = ModelInfo(name=f"echo {target}", family=None, backend="echo", source=f"echo:{target}", device="-")
        self.cleared = []

    def stream(self, request):
        text = request.messages[-1]["content"][::-1]
        stats = Stats(
            prompt_tokens=len(text), cached_tokens=0, completion_tokens=1, ttft_s=0, tokens_per_s=0, total_s=0
        )
        chunks = iter([Chunk(text=text), Chunk(finish_reason="stop", stats=stats)])
        return ChatStream(chunks, threading.Event(), prompt_tokens=len(text))

    def count_tokens(self, request):
        return None

    def cache_info(self):
        return {"sessions": 0}

    def clear_sessions(self, session=None):
        self.cleared.append(session)


def load(target, options):
    return EchoModel(target)


def label(target):
    return f"echo {target}"


def test_a_fourth_backend_is_one_file_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(BACKENDS, "echo", "test_contract")  # the one line; this module is the one file
    model = load_model("echo:parrot")
    assert isinstance(model, EchoModel)
    registry = ModelRegistry(["echo:parrot"])
    registry.switch(registry.ids[0])
    assert registry.ids == ["echo parrot"]
    config = app.AppConfig(port=free_port())
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    try:
        base = f"http://127.0.0.1:{config.port}"
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "olleh"}]})
        assert r.json()["choices"][0]["message"]["content"] == "hello"
        reply = Client(base + "/", verbose=False).predict("dlrow", "", 0, 1, 0, 16, 1, -1, False, api_name="/chat")
        assert any(m["content"] == "world" for m in reply)
    finally:
        demo.close()


def test_a_remote_only_server_does_not_import_torch():
    script = (
        "import sys, app\n"
        "from llm_backends.remote import RemoteChatModel\n"
        "from llm_backends.serving import ModelRegistry\n"
        "registry = ModelRegistry(['openai:http://127.0.0.1:9/v1#m'])\n"
        "registry.model = RemoteChatModel('http://127.0.0.1:9/v1#m', check=False)\n"
        "registry.current_id = registry.ids[0]\n"
        "app.build_app(registry, app.AppConfig())\n"
        "print(sorted(m for m in ('torch', 'transformers', 'mlx') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class Upstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that, like llama-cpp-python's, sends usage only in whole replies."""

    bodies: list = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, payload: bytes, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "tiny"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Upstream.bodies.append(body)
        if body.get("stream"):
            events = [{"choices": [{"delta": {"content": w}, "finish_reason": None}]} for w in ("Hi", " there")]
            events.append({"choices": [{"delta": {}, "finish_reason": "stop"}]})
            payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            self._send(200, payload.encode(), "text/event-stream")
            return
        reply = {
            "choices": [{"message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        }
        self._send(200, json.dumps(reply).encode())


@pytest.fixture()
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Upstream.bodies = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_the_remote_backend_reports_the_upstreams_own_usage_and_sends_only_what_was_set(upstream):
    model = load_model(f"openai:{upstream}#tiny")
    out = model.create(HELLO, temperature=0, user="ann")
    assert out["usage"]["prompt_tokens"] == 12 and out["usage"]["completion_tokens"] == 3
    assert out["choices"][0]["message"]["content"] == "Hi there"
    streamed = list(model.create(HELLO, stream=True, stream_options={"include_usage": True}))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed if e["choices"]) == "Hi there"
    assert not any("usage" in e for e in streamed), "no usage is made up when the upstream sent none"
    whole, stream = Upstream.bodies
    assert "stream" not in whole and whole["temperature"] == 0 and "top_p" not in whole and "top_k" not in whole
    assert whole["user"] and "ann" not in whole["user"], "the session travels as an opaque name"
    assert stream["stream"] is True and stream["stream_options"] == {"include_usage": True}


# --- 3. sessions namespaced by who may use them -> tests/test_session_privacy.py ------------------------------


# --- 4. one cancellation path, errors as one message ------------------------------------------------------------


def test_close_from_another_thread_stops_a_stream_that_is_being_read(qwen3):
    stream = qwen3.stream_chat(HELLO, session_id="close-race", temperature=0, max_new_tokens=3000)
    forward_calls, handle = count_forwards(qwen3)
    reader_error = []

    def read():
        try:
            for _ in stream:
                pass
        except Exception as e:  # noqa: BLE001 (the test reports whatever the reader saw)
            reader_error.append(e)

    reader = threading.Thread(target=read)
    try:
        reader.start()
        while len(forward_calls) < 5:
            time.sleep(0.001)
        stream.close()  # while the reader thread is inside next(): no "generator already executing"
        settled = len(forward_calls)
        reader.join(10)
        assert not reader.is_alive() and not reader_error
        assert len(forward_calls) <= settled + 1, "the model stopped before its next token"
        assert qwen3.cache_info()["in_use"] == 0
    finally:
        handle.remove()


@pytest.fixture()
def failing_server(qwen3_dir):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    model = registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port())
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{config.port}", model
    demo.close()


@pytest.mark.parametrize(
    "error, shown",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory while generating"),
        (ZeroDivisionError("division by zero"), "internal error while generating (ZeroDivisionError)"),
    ],
)
def test_a_failure_while_generating_is_one_clear_message_at_every_door(failing_server, monkeypatch, error, shown):
    base, model = failing_server

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(model.engine.runner, "decode", broken)
    reply = Client(base + "/", verbose=False).predict("Hi", "", 0, 1, 0, 16, 1, -1, False, api_name="/chat")
    notes = [m["metadata"]["title"] for m in reply if (m.get("metadata") or {}).get("title")]
    assert any(shown in n for n in notes), reply
    assert "Traceback" not in json.dumps(reply)

    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": HELLO}, timeout=60)
    assert r.status_code == 500 and shown in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={"messages": HELLO, "stream": True}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data:")]
    assert shown in events[-1] and '"error"' in events[-1]
    assert model.cache_info()["in_use"] == 0


def test_stop_on_the_page_closes_the_reply_stream(failing_server, monkeypatch):
    base, model = failing_server
    closed = []
    original = ChatStream.close
    monkeypatch.setattr(ChatStream, "close", lambda self: closed.append(self) or original(self))
    calls, handle = count_forwards(model)
    try:
        job = Client(base + "/", verbose=False).submit(
            "Write a long story about the sea.", "", 0, 1, 0, 4000, 1, -1, False, api_name="/chat"
        )
        deadline = time.time() + 60
        while len(calls) < 8 and time.time() < deadline:
            time.sleep(0.02)
        job.cancel()
        deadline = time.time() + 5
        while not closed and time.time() < deadline:
            time.sleep(0.02)
        assert closed, "the page closed its stream (it did not wait for garbage collection)"
        settled = len(calls)
        time.sleep(1.0)
        assert len(calls) <= settled + 1 and model.cache_info()["in_use"] == 0
    finally:
        handle.remove()


# --- 6. the seed surface streams while Qwen 3 thinks -------------------------------------------------------------


def test_predict_streams_the_thinking_marked_as_the_model_writes_it(qwen3_dir):
    bot = Qwen3Object(str(qwen3_dir), max_cache_bytes=2**26)
    pieces = list(bot.predict("Hello, how are you today?", "t1", temperature=0, max_new_tokens=12))
    assert pieces[0].startswith("<think>"), pieces
    text = "".join(pieces)
    assert text.count("<think>") == 1 and len(text) > len("<think>\n")
    answer = text.split("</think>")[-1].lstrip("\n") if "</think>" in text else ""
    assert bot._histories["t1"][-1] == {"role": "assistant", "content": answer}, "only the answer is remembered"
    plain = list(bot.predict("And you?", "t2", temperature=0, max_new_tokens=6, enable_thinking=False))
    assert not any("<think>" in p for p in plain)


# --- 7. the page's inputs cannot fall out of order ---------------------------------------------------------------


def test_the_chat_api_parameters_follow_chat_settings(qwen3_dir):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    registry.switch(registry.ids[0])
    demo = app.build_app(registry, app.AppConfig())
    chat_fn = next(fn for fn in demo.fns.values() if fn.api_name == "chat")
    settings = fields(app.ChatSettings)
    labels = [block.label for block in chat_fn.inputs[-len(settings) :]]
    expected = {
        "system_prompt": "System prompt",
        "temperature": "Temperature (0 = greedy)",
        "top_p": "Top-p",
        "top_k": "Top-k (0 = off)",
        "max_new_tokens": "Max new tokens",
        "repetition_penalty": "Repetition penalty",
        "seed": "Seed (-1 = random)",
        "thinking": "Thinking (reasoning shown collapsed, never sent back to the model)",
        "thinking_budget": "Thinking budget (tokens, 0 = no limit)",
        "min_p": "Min-p (0 = off)",
        "presence_penalty": "Presence penalty",
        "frequency_penalty": "Frequency penalty",
        "dry_multiplier": "DRY (0 = off)",
        "xtc_probability": "XTC chance (0 = off)",
        "xtc_threshold": "XTC threshold",
    }
    assert labels == [expected[f.name] for f in settings]


class FakeRequest:
    """What the page's handlers read of a gr.Request."""

    def __init__(self, session_hash: str, username: str | None = None):
        self.session_hash, self.username = session_hash, username


def test_the_pages_stop_closes_a_reply_another_thread_is_reading(qwen3_dir):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    model = registry.switch(registry.ids[0])
    replies = app.Replies(registry)
    tab = FakeRequest("tab-1")
    settings = ("", 0, 1, 0, 2000, 1, -1, False)
    updates = []
    calls, handle = count_forwards(model)
    reader = threading.Thread(
        target=lambda: updates.extend(replies.respond("Tell me a long story.", [], tab, *settings))
    )
    try:
        reader.start()
        while len(calls) < 5:
            time.sleep(0.001)
        replies.stop(tab)
        settled = len(calls)
        reader.join(10)
        assert not reader.is_alive() and len(calls) <= settled + 1
        assert model.cache_info()["in_use"] == 0
    finally:
        handle.remove()

    replies._begin(SessionKey("page", "", "tab-2"))  # Stop arrives while the reply is being prepared
    replies.stop(FakeRequest("tab-2"))
    stream = model.stream_chat(HELLO, max_new_tokens=2)
    assert replies._hold(SessionKey("page", "", "tab-2"), stream) is False, "the reply is not started"
    stream.close()


def cached_of(updates) -> int:
    title = [m.metadata["title"] for m in updates[-1] if m.metadata and "to first token" in m.metadata["title"]][0]
    return int(title.split(", ")[1].split(" ")[0]) if "from cache" in title else 0


@pytest.mark.parametrize("exposed", [False, True])
def test_a_reloaded_page_finds_its_cache_locally_but_tabs_of_an_open_server_share_only_the_system_prompt(
    qwen3_dir, exposed
):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    model = registry.switch(registry.ids[0])
    replies = app.Replies(registry, exposed=exposed)
    system = "You answer questions about the sea. " * 8
    settings = (system, 0, 1, 0, 16, 1, -1, False)
    message = "My secret is the blue whale."
    list(replies.respond(message, [], FakeRequest("tab-a"), *settings))
    second = list(replies.respond(message, [], FakeRequest("tab-b"), *settings))
    prompt = model.request([{"role": "system", "content": system}, {"role": "user", "content": message}])
    operator = model.operator_tokens(prompt)
    assert operator > 20
    if exposed:
        assert 0 < cached_of(second) <= operator, "another tab gets the operator's words only"
    else:
        assert cached_of(second) > operator, "the one local person's reloaded page finds everything"
