"""Sessions are namespaced by who may use them: no /v1 field or header reaches a page session's cache."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

import app
from llm_backends import SessionKey
from llm_backends.serving import ModelRegistry
from test_app import free_port

# message, then ChatSettings: system prompt, temperature, top-p, top-k, max new tokens, rep. penalty, seed, thinking
GREEDY = ("", 0, 1, 0, 16, 1, -1, False)
FIRST = "Tell me about the sea, the sky and the mountains."


@pytest.fixture(scope="module")
def server(qwen3_dir):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**28)
    registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port(), concurrency=4)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{config.port}", registry
    demo.close()


def stats_title(reply) -> str:
    return [m for m in reply if "to first token" in (m.get("metadata") or {}).get("title", "")][-1]["metadata"]["title"]


def answer_of(reply) -> str:
    return "".join(m["content"] for m in reply if not (m.get("metadata") or {}).get("title"))


def test_a_page_session_hash_sent_through_every_v1_field_and_header_reuses_nothing(server):
    base, registry = server
    person = Client(base + "/", verbose=False)
    first = person.predict(FIRST, *GREEDY, api_name="/chat")
    secret = person.session_hash
    conversation = [
        {"role": "user", "content": FIRST},
        {"role": "assistant", "content": answer_of(first)},
        {"role": "user", "content": "And the rivers?"},
    ]
    body = {"messages": conversation, "max_tokens": 4, "temperature": 0, "enable_thinking": False}
    url = f"{base}/v1/chat/completions"

    r = httpx.post(url, json={**body, "session_id": secret}, timeout=60)
    assert r.status_code == 400 and "session_id" in r.json()["error"]["message"], r.text
    attempts = [
        ({**body, "user": secret}, {}),
        ({**body, "user": f"page:{secret}"}, {}),
        (body, {"X-Session-Id": secret}),
        (body, {"X-Session-Id": f"page::{secret}"}),
        (body, {"Cookie": f"session_hash={secret}", "X-Gradio-Session": secret}),
        ({**body, "metadata": {"session_hash": secret}}, {}),
    ]
    for sent, headers in attempts:
        # Each attempt starts without an API session of that name: `user` and X-Session-Id name the same one.
        name = headers.get("X-Session-Id") or sent.get("user")
        if name:
            registry.get().clear_cache(SessionKey("api", "", name))
        r = httpx.post(url, json=sent, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, (sent.get("user"), headers)

    second = person.predict("And the rivers?", *GREEDY, api_name="/chat")
    assert "from cache" in stats_title(second), "the person's own next turn still reuses their cache"


def test_the_same_api_user_name_under_another_key_is_another_session(qwen3_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llm_backends.http_api import add_openai_routes

    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    registry.switch(registry.ids[0])
    body = {"messages": [{"role": "user", "content": FIRST}], "max_tokens": 2, "temperature": 0, "user": "bob"}
    cached = []
    for key in ("first-key", "second-key"):
        routes = FastAPI()
        add_openai_routes(routes, registry, api_key=key, exposed=False)
        client = TestClient(routes)
        for _ in range(2):
            r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0 and cached[1] > 0, "one key's user reuses its own cache"
    assert cached[2] == 0, "the same user name under another key starts afresh"
