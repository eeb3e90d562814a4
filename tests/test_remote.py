"""The remote backend against a scripted upstream that fails, stalls, or answers in odd shapes: errors reach the
person as readable messages (never the upstream's internals or a password), nothing waits forever or holds an
unbounded reply, and replies in the shapes real servers send come through whole."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llm_backends import ModelLoadError, remote
from llm_backends.remote import MAX_LINE_BYTES, RemoteChatModel, RemoteError, label
from llm_backends.request import SessionKey

ASK = [{"role": "user", "content": "Hello?"}]


def event(delta: dict | None = None, finish=None, **extra) -> bytes:
    body = {"choices": [{"delta": delta or {}, "finish_reason": finish}], **extra} if delta is not None else extra
    return f"data: {json.dumps(body)}\n\n".encode()


class Scripted(BaseHTTPRequestHandler):
    """POST answers with ``script(handler, body)``; every request's headers are kept."""

    script = None
    headers_seen: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Scripted.headers_seen.append(dict(self.headers))
        self.answer(200, json.dumps({"data": [{"id": "up"}]}).encode())

    def do_POST(self):
        Scripted.headers_seen.append(dict(self.headers))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            Scripted.script(self, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def answer(self, status: int, payload: bytes, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

    def send(self, payload: bytes):
        self.wfile.write(payload)
        self.wfile.flush()


@pytest.fixture()
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted.headers_seen = []
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def model_at(host: str, timeout: float = 5.0, user: str = "") -> RemoteChatModel:
    return RemoteChatModel(f"http://{user}{host}/v1#up", timeout=timeout)


def streamed(model, **fields):
    return list(model.stream(model.request(ASK, **fields)))


def test_an_error_the_upstream_sends_mid_stream_is_an_error_not_a_finished_reply(upstream):
    def script(handler, body):
        handler.start_stream()
        handler.send(event({"content": "Partial"}))
        handler.send(f"data: {json.dumps({'error': {'message': 'CUDA out of memory', 'code': 500}})}\n\n".encode())

    Scripted.script = script
    with pytest.raises(RemoteError, match="failed while answering: CUDA out of memory"):
        streamed(model_at(upstream))

    reply = {"choices": [{"message": {"content": "Whole anyway."}, "finish_reason": "stop"}]}
    Scripted.script = lambda handler, body: handler.answer(200, json.dumps(reply, indent=1).encode())
    chunks = streamed(model_at(upstream))
    assert "".join(c.text for c in chunks) == "Whole anyway." and chunks[-1].finish_reason == "stop"


def test_a_password_in_the_upstream_address_is_sent_as_basic_auth_and_never_shown(upstream):
    Scripted.script = lambda handler, body: handler.answer(500, b'{"error": {"message": "boom"}}')
    model = model_at(upstream, user="admin:s3cret@")
    expected = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert Scripted.headers_seen[-1]["Authorization"] == expected, "the model list was asked with the password"
    with pytest.raises(RemoteError) as error:
        streamed(model)
    assert Scripted.headers_seen[-1]["Authorization"] == expected
    shown = [str(error.value), label(f"http://admin:s3cret@{upstream}/v1#up"), *map(str, vars(model.info).values())]
    assert "boom" in str(error.value) and not any("s3cret" in text or "admin" in text for text in shown), shown


def test_each_upstream_may_read_its_own_key_from_the_variable_its_address_names(upstream, monkeypatch):
    Scripted.script = lambda handler, body: handler.answer(500, b'{"error": {"message": "boom"}}')
    monkeypatch.setenv("OPENAI_API_KEY", "k-everyone")
    monkeypatch.setenv("UPSTREAM_KEY", "k-this-one")
    model = model_at(upstream, user="$UPSTREAM_KEY@")
    assert Scripted.headers_seen[-1]["Authorization"] == "Bearer k-this-one", "the model list was asked with it"
    with pytest.raises(RemoteError) as error:
        streamed(model)
    assert Scripted.headers_seen[-1]["Authorization"] == "Bearer k-this-one"
    shown = [str(error.value), label(f"http://$UPSTREAM_KEY@{upstream}/v1#up"), *map(str, vars(model.info).values())]
    assert not any("k-this-one" in text or "UPSTREAM_KEY" in text for text in shown), shown
    model_at(upstream)
    assert Scripted.headers_seen[-1]["Authorization"] == "Bearer k-everyone", "an address naming none: the shared one"
    monkeypatch.delenv("UPSTREAM_KEY")
    with pytest.raises(ModelLoadError, match=r"read from \$UPSTREAM_KEY, which is not set"):
        model_at(upstream, user="$UPSTREAM_KEY@")
    with pytest.raises(ValueError, match="not a variable name"):
        model_at(upstream, user="$9lives@")


def test_an_upstream_that_never_answers_or_never_stops_cannot_hold_a_reply(upstream, monkeypatch):
    def keep_alives(handler, body):
        handler.start_stream()
        for _ in range(25):
            handler.send(b": keep-alive\n\n")
            time.sleep(0.1)
        handler.send(event({"content": "late but fine"}, finish="stop") + b"data: [DONE]\n\n")

    Scripted.script = keep_alives
    chunks = streamed(model_at(upstream, timeout=1))  # a proxy that pings while the model is queued or thinking
    assert "".join(c.text for c in chunks) == "late but fine" and chunks[-1].finish_reason == "stop"
    monkeypatch.setattr(remote, "KEEP_ALIVE_LIMIT", 1.0)
    started = time.perf_counter()
    with pytest.raises(RemoteError, match="did not answer within"):
        streamed(model_at(upstream, timeout=1))
    assert time.perf_counter() - started < 3, "keep-alives alone are an answer only so long"

    def letters(handler, body):  # a proxy that cuts tokens into characters
        handler.start_stream()
        for letter in "Hello world, this is fine.":
            handler.send(event({"content": letter}))
        handler.send(event({}, finish="stop") + b"data: [DONE]\n\n")

    Scripted.script = letters
    assert "".join(c.text for c in streamed(model_at(upstream), max_new_tokens=8)) == "Hello world, this is fine."

    def endless(handler, body):
        handler.start_stream()
        for _ in range(500):
            handler.send(event({"content": "word "}))

    Scripted.script = endless
    chunks = streamed(model_at(upstream), max_new_tokens=5)
    assert chunks[-1].finish_reason == "length" and len([c for c in chunks if c.text]) <= 5 * 4 + 16

    def one_huge_line(handler, body):
        handler.start_stream()
        handler.send(b"data: " + b"x" * (MAX_LINE_BYTES + 10))

    Scripted.script = one_huge_line
    with pytest.raises(RemoteError, match="longer than"):
        streamed(model_at(upstream))


def test_a_finished_reply_ends_even_where_the_upstream_sends_no_done_and_keeps_the_connection(upstream):
    def script(handler, body):
        handler.start_stream()
        handler.send(event({"content": "Complete answer."}))
        handler.send(event({}, finish="stop"))
        time.sleep(4)

    Scripted.script = script
    chunks = streamed(model_at(upstream, timeout=1))
    assert "".join(c.text for c in chunks) == "Complete answer." and chunks[-1].finish_reason == "stop"


def test_the_upstreams_internals_and_malformed_replies_become_short_readable_errors(upstream):
    traceback = b"Traceback (most recent call last):\n  raise RuntimeError('db password=hunter2')"
    Scripted.script = lambda handler, body: handler.answer(500, traceback, "text/plain")
    with pytest.raises(RemoteError) as error:
        streamed(model_at(upstream))
    assert str(error.value).endswith("answered 500") and "hunter2" not in str(error.value)
    Scripted.script = lambda handler, body: handler.answer(
        500, json.dumps({"error": {"message": "x" * 10_000}}).encode()
    )
    with pytest.raises(RemoteError) as error:
        streamed(model_at(upstream))
    assert len(str(error.value)) < 600
    for bad in ([1, 2], None, "text", {"choices": [None]}, {"choices": [{"delta": {"content": 5}}]}):

        def script(handler, body, bad=bad):
            handler.start_stream()
            handler.send(f"data: {json.dumps(bad)}\n\n".encode())

        Scripted.script = script
        with pytest.raises(RemoteError, match="not in OpenAI's shape"):
            streamed(model_at(upstream))


@pytest.mark.parametrize("ids", [("a", "b"), ("", "")])
def test_streamed_tool_calls_without_an_index_stay_separate_calls(upstream, ids):
    pieces = [
        {"id": ids[0], "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": ids[1], "function": {"name": "get_time", "arguments": '{"tz": '}},
        {"function": {"arguments": '"CET"}'}},
    ]

    def script(handler, body):
        handler.start_stream()
        for piece in pieces:
            handler.send(event({"tool_calls": [piece]}))
        handler.send(event({}, finish="tool_calls") + b"data: [DONE]\n\n")

    Scripted.script = script
    offered = [{"type": "function", "function": {"name": name}} for name in ("get_weather", "get_time")]
    events = list(model_at(upstream).create(ASK, stream=True, tools=offered))
    calls = [t for e in events if e["choices"] for t in e["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "CET"}),
    ]


def test_the_upstreams_cache_count_is_not_passed_on_and_the_session_name_is_keyed(upstream):
    bodies = []

    def script(handler, body):
        bodies.append(body)
        usage = {"prompt_tokens": 18, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 18}}
        handler.start_stream()
        handler.send(event({"content": "ok"}, finish="stop") + event(None, usage=usage) + b"data: [DONE]\n\n")

    Scripted.script = script
    session = SessionKey("api", "", "alice")
    stats = streamed(model_at(upstream), session=session)[-1].stats
    assert stats.prompt_tokens == 18 and stats.cached_tokens is None, "another person's prompt shows in that count"
    unkeyed = hashlib.sha256(repr(session).encode()).hexdigest()[:24]  # found by trying likely names
    assert bodies[0]["user"] and bodies[0]["user"] != unkeyed


def test_the_sampling_settings_go_to_the_upstream_as_set_and_unset_ones_not_at_all(upstream):
    bodies = []

    def script(handler, body):
        bodies.append(body)
        reply = {"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
        handler.answer(200, json.dumps(reply).encode())

    Scripted.script = script
    model = model_at(upstream)
    model.create(ASK, min_p=0.05, presence_penalty=1.5, frequency_penalty=-0.5, logit_bias={"42": -100, 7: 3})
    model.create(ASK)
    sent = bodies[0]
    assert (sent["min_p"], sent["presence_penalty"], sent["frequency_penalty"]) == (0.05, 1.5, -0.5)
    assert sent["logit_bias"] == {"7": 3, "42": -100} and all(type(b) is int for b in sent["logit_bias"].values())
    model.create(ASK, logit_bias={"5": 0.5})
    assert bodies[-1]["logit_bias"] == {"5": 0.5}
    assert not {"min_p", "presence_penalty", "frequency_penalty", "logit_bias"} & set(bodies[1])
    # llama.cpp's DRY and XTC fields go as set, and only those set (its own defaults are the upstream's).
    model.create(ASK, dry_multiplier=0.8, dry_sequence_breakers=["\n"], xtc_probability=0.5)
    assert {k: v for k, v in bodies[-1].items() if k.startswith(("dry_", "xtc_"))} == {
        "dry_multiplier": 0.8,
        "dry_sequence_breakers": ["\n"],
        "xtc_probability": 0.5,
    }
    assert not any(k.startswith(("dry_", "xtc_")) for k in bodies[1])
