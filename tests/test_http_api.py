"""The OpenAI-compatible /v1 API, driven by the official openai client, and the remote backend."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from forwards import count_forwards
from gradio_client import Client

import app
from llm_backends import openai_api
from llm_backends.remote import RemoteChatModel
from llm_backends.serving import ModelRegistry
from test_app import free_port

KEY = "test-key"
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def api(qwen3_dir, gemma3_dir):
    registry = ModelRegistry([str(qwen3_dir), str(gemma3_dir)], max_cache_bytes=2**28)
    registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port(), api_keys=[KEY], concurrency=4)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    base = f"http://127.0.0.1:{config.port}"
    yield base, registry
    demo.close()


@pytest.fixture()
def client(api):
    base, _ = api
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)


def test_models_lists_the_dropdown_entries(client, api):
    _, registry = api
    assert [m.id for m in client.models.list()] == registry.ids


def test_streaming_gives_the_same_greedy_text_as_non_streaming(client, api):
    model = api[1].ids[0]
    kwargs = dict(
        model=model,
        messages=HELLO,
        temperature=0,
        max_tokens=16,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    plain = client.chat.completions.create(**kwargs)
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == 16


def test_thinking_comes_back_as_reasoning_content(client, api):
    out = client.chat.completions.create(
        model=api[1].ids[0],
        messages=HELLO,
        temperature=0,
        max_tokens=8,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    assert out.choices[0].message.model_extra.get("reasoning_content")


def test_same_user_reuses_the_cache(client, api):
    model = api[1].ids[0]
    messages = list(HELLO)
    first = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8, user="bob")
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "Tell me more."},
    ]
    second = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8, user="bob")
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    # Another user name under the same key is the same principal: it may start from bob's prefix (the key's
    # holder sent both); under another key it would not (tests/test_session_privacy.py).
    other = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8, user="eve")
    assert other.usage.prompt_tokens_details.cached_tokens > 0


def test_wrong_or_missing_key_is_401(api):
    base, registry = api
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    response = httpx.post(f"{base}/v1/chat/completions", json={"messages": HELLO})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"model": "nope", "messages": HELLO}, 404, "does not exist"),
        ({"model": "../../etc/passwd", "messages": HELLO}, 404, "does not exist"),
        ({"model": "/tmp", "messages": HELLO}, 404, "does not exist"),
        ({"messages": []}, 400, "empty"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"messages": HELLO, "temperature": -1}, 400, "temperature"),
        ({"messages": HELLO, "max_tokens": 0}, 400, "max_new_tokens"),
        ({"messages": "hi"}, 400, "messages"),
        ([1, 2], 400, "object"),
        ({"messages": HELLO, "tool_choice": {"type": "function", "function": "f"}}, 400, "tool_choice"),
        ({"messages": HELLO, "stop": ["z" * 2000]}, 400, "stop"),
        ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, 400, ""),
        ({"messages": HELLO, "presence_penalty": 3}, 400, "presence_penalty"),
        ({"messages": HELLO, "logit_bias": {"10000000": 1}}, 400, "ids are below"),
        ({"messages": HELLO, "n": 0}, 400, "n must be an integer from 1 to 16"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(api, body, status, needle):
    base, _ = api
    response = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_the_peers_sampling_settings_reach_the_model_through_the_openai_client(client, api):
    """min_p, the presence and frequency penalties and logit_bias, as the openai client sends them (logit_bias
    keys become strings in JSON), give what the Python door gives; a large bias forces its token."""
    _, registry = api
    model, name = registry.get(), registry.current_id
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    the = model.tokenizer.encode(" the", add_special_tokens=False)
    assert len(the) == 1
    forced = client.chat.completions.create(
        model=name, messages=HELLO, max_tokens=5, temperature=0, logit_bias={the[0]: 100}, extra_body=no_thinking
    )
    assert forced.choices[0].message.content == " the" * 5
    fields = {"temperature": 0.8, "seed": 11, "min_p": 0.1, "presence_penalty": 1.0, "frequency_penalty": 0.5}
    over_http = client.chat.completions.create(
        model=name,
        messages=HELLO,
        max_tokens=12,
        presence_penalty=fields["presence_penalty"],
        frequency_penalty=fields["frequency_penalty"],
        temperature=fields["temperature"],
        seed=fields["seed"],
        extra_body={**no_thinking, "min_p": fields["min_p"]},
    )
    direct = model.create(HELLO, max_tokens=12, enable_thinking=False, **fields)
    assert over_http.choices[0].message.content == direct["choices"][0]["message"]["content"]


def test_a_bad_request_naming_another_model_loads_nothing_and_keeps_every_cache(api, client):
    base, registry = api
    before = registry.current_id
    client.chat.completions.create(model=before, messages=HELLO, max_tokens=2, user="keeps-its-cache")
    sessions = registry.get().cache_info()["sessions"]
    other = next(i for i in registry.ids if i != before)
    for body in (
        {"messages": [], "temperature": -1},
        {"messages": HELLO, "temperature": -1},
        {"messages": HELLO, "x": 1},
        {"messages": HELLO, "logit_bias": {"10000000": 5}},  # past the other model's vocabulary (its config says)
        {"messages": HELLO, "presence_penalty": 10**400},
    ):
        r = httpx.post(
            f"{base}/v1/chat/completions", json={"model": other, **body}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 400, r.text
    r = httpx.post(
        f"{base}/v1/completions", json={"model": other, "prompt": 5}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400, r.text
    assert registry.current_id == before and registry.get().cache_info()["sessions"] == sessions


def test_a_body_nested_too_deeply_is_400_not_a_server_error(api):
    base, _ = api
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"[" * 5000 + b"]" * 5000, b'{"messages": ' + b"[" * 200 + b"]" * 200 + b"}"):
        r = httpx.post(f"{base}/v1/chat/completions", content=body, headers=auth)
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text


def test_malformed_json_and_wrong_content_type_are_400(api):
    base, _ = api
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        f"{base}/v1/chat/completions", content=b"{not json", headers={**auth, "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/chat/completions", content=b"hello", headers={**auth, "Content-Type": "text/plain"})
    assert r.status_code == 400


def test_parallel_users_each_get_their_own_answer(client, api):
    model = api[1].ids[0]
    prompts = ["Hello, how are you?", "What is the capital of France?", "Tell me about the sea.", "你好，世界！"]

    def ask(i_prompt):
        i, prompt = i_prompt
        out = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=12,
            user=f"par-{i}",
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        return out.choices[0].message.content

    reference = [ask((100 + i, p)) for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, enumerate(prompts)))
    assert answers == reference


def test_n_replies_through_the_openai_client_and_through_a_remote_front(client, api):
    base, registry = api
    model = registry.ids[0]
    kwargs = dict(
        model=model,
        messages=HELLO,
        temperature=1.0,
        max_tokens=8,
        seed=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    alone = [client.chat.completions.create(**{**kwargs, "seed": 4 + i}).choices[0].message.content for i in range(2)]
    whole = client.chat.completions.create(n=2, **kwargs)
    assert [c.index for c in whole.choices] == [0, 1]
    assert [c.message.content for c in whole.choices] == alone
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(n=2, stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == alone
    # A remote model asks its upstream once per reply, each with its own seed: the same replies.
    front = RemoteChatModel(f"{base}/v1#{model}", api_key=KEY)
    fronted = front.create(HELLO, n=2, temperature=1.0, max_tokens=8, seed=4, enable_thinking=False)
    assert [c["message"]["content"] for c in fronted["choices"]] == alone


def test_remote_backend_streams_from_another_instance_through_the_page(api, tmp_path):
    base, registry = api
    remote_id = registry.ids[0]
    source = f"openai:{base}/v1#{remote_id}"
    front_registry = ModelRegistry([source], max_cache_bytes=2**26)
    import os

    os.environ["OPENAI_API_KEY"] = KEY
    try:
        front_registry.switch(front_registry.ids[0])
    finally:
        del os.environ["OPENAI_API_KEY"]
    config = app.AppConfig(port=free_port())
    front = app.serve(config, front_registry, prevent_thread_lock=True, quiet=True)
    try:
        page = Client(f"http://127.0.0.1:{config.port}/", verbose=False)
        job = page.submit("Hello, how are you today?", "", 0, 1, 0, 16, 1, 0, False, api_name="/chat")
        updates = list(job)
        reply = job.outputs()[-1]
        answer = "".join(m["content"] for m in reply if not (m.get("metadata") or {}).get("title"))
        local = registry.get().create(HELLO, temperature=0, max_tokens=16, enable_thinking=False)
        assert answer == local["choices"][0]["message"]["content"]
        assert len(updates) >= 2
    finally:
        front.close()


def test_remote_errors_are_shown_in_the_chat_not_as_tracebacks(api):
    base, _ = api
    registry = ModelRegistry([f"openai:{base}/v1#whatever"], max_cache_bytes=2**26)
    from llm_backends.remote import RemoteChatModel

    registry.model, registry.current_id = (
        RemoteChatModel(registry.entries[registry.ids[0]].source, check=False),
        registry.ids[0],
    )
    config = app.AppConfig(port=free_port())
    front = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    try:
        page = Client(f"http://127.0.0.1:{config.port}/", verbose=False)
        reply = page.predict("Hi", "", 0, 1, 0, 16, 1, 0, False, api_name="/chat")
        titles = " ".join((m.get("metadata") or {}).get("title", "") for m in reply)
        assert "401" in titles or "API key" in titles, reply
    finally:
        front.close()


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_mid_stream_stops_the_generation(api, n):
    import time

    base, registry = api
    model = registry.get()
    calls, handle = count_forwards(model)
    body = {"messages": HELLO, "stream": True, "max_tokens": 3000, "temperature": 0, "user": "leaver", "n": n}
    try:
        with httpx.stream(
            "POST", f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i > 6:
                    break
        time.sleep(1.0)
        settled = len(calls)
        time.sleep(1.0)
        assert len(calls) == settled, "generation went on after the client left"
        assert settled < 1000
        assert model.cache_info()["in_use"] == 0
    finally:
        handle.remove()


def test_requests_while_a_model_loads_get_503(api):
    base, registry = api
    registry.loading = registry.ids[1]
    try:
        r = httpx.post(
            f"{base}/v1/chat/completions", json={"messages": HELLO}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    finally:
        registry.loading = None


def test_v1_on_an_exposed_server_without_a_key_is_refused(qwen3_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llm_backends.http_api import add_openai_routes

    fastapi_app = FastAPI()
    add_openai_routes(fastapi_app, ModelRegistry([str(qwen3_dir)]), api_key=None, exposed=True)
    r = TestClient(fastapi_app).get("/v1/models")
    assert r.status_code == 401 and "--api-key" in r.json()["error"]["message"]


def test_events_are_computed_ahead_of_a_slow_reader_only_so_far_and_the_stream_closes_when_it_leaves():
    import asyncio
    import threading

    from llm_backends import http_api

    pulled, closed = [], threading.Event()

    def events():
        try:
            for i in range(10_000):
                pulled.append(i)
                yield {"n": i}
        finally:
            closed.set()

    class Request:
        async def is_disconnected(self) -> bool:
            return False

    async def read_two_then_leave() -> list[str]:
        stream = http_api._sse(events(), Request())
        lines = [await stream.__anext__(), await stream.__anext__()]
        await asyncio.sleep(0.5)  # the reader stops reading; the producer may run ahead, but only so far
        assert len(pulled) <= http_api.SSE_AHEAD + 3
        await stream.aclose()  # the client leaves
        return lines

    lines = asyncio.run(read_two_then_leave())
    assert lines == ['data: {"n": 0}\n\n', 'data: {"n": 1}\n\n']
    assert closed.wait(5), "the events (the reply's stream) were closed"
    assert len(pulled) <= http_api.SSE_AHEAD + 3


def test_an_error_mid_stream_is_reported_in_band():
    import asyncio

    from llm_backends import http_api

    def events():
        yield {"n": 0}
        raise RuntimeError("the device fell over")

    class Request:
        async def is_disconnected(self) -> bool:
            return False

    async def read_all() -> list[str]:
        return [line async for line in http_api._sse(events(), Request())]

    lines = asyncio.run(read_all())
    assert lines[0] == 'data: {"n": 0}\n\n'
    assert '"type": "server_error"' in lines[1] and "RuntimeError" in lines[1] and len(lines) == 2


def test_a_document_in_a_file_part_is_read_as_text_here_and_through_a_remote_front(client, api):
    import base64

    from llm_backends.remote import RemoteChatModel

    base, registry = api
    note = "data:text/plain;base64," + base64.b64encode(b"The code word is heron.\n").decode()
    question = {"type": "text", "text": "What is the code word?"}
    messages = [
        {"role": "user", "content": [{"type": "file", "file": {"filename": "note.txt", "file_data": note}}, question]}
    ]
    pasted = [
        {"role": "user", "content": "File: note.txt\n```\nThe code word is heron.\n```\n\nWhat is the code word?"}
    ]
    kwargs = dict(
        model=registry.ids[0],
        temperature=0,
        max_tokens=8,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    read = client.chat.completions.create(messages=messages, **kwargs)
    typed = client.chat.completions.create(messages=pasted, **kwargs)
    assert read.choices[0].message.content == typed.choices[0].message.content
    assert read.usage.prompt_tokens == typed.usage.prompt_tokens
    front = RemoteChatModel(f"{base}/v1#{registry.ids[0]}", api_key=KEY)
    fronted = front.create(messages, temperature=0, max_tokens=8, enable_thinking=False)
    assert fronted["choices"][0]["message"]["content"] == read.choices[0].message.content
    binary = "data:application/zip;base64," + base64.b64encode(bytes(range(64))).decode()
    bad = [{"role": "user", "content": [{"type": "file", "file": {"filename": "x.zip", "file_data": binary}}]}]
    response = httpx.post(
        f"{base}/v1/chat/completions", json={"messages": bad}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400 and "(x.zip) is not a text file" in response.json()["error"]["message"]


def test_a_model_is_retrieved_by_its_id_or_short_name_and_an_unknown_one_is_404(client, api):
    _, registry = api
    for model_id in registry.ids:
        assert client.models.retrieve(model_id).id == model_id
    assert client.models.retrieve("default").id == registry.ids[0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("nope")


def post(base: str, path: str, body) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_tokenize_counts_what_the_model_reads_and_detokenize_reads_it_back(client, api):
    base, registry = api
    model = registry.get()
    text = "Hello world, how are you?"
    vllm = post(base, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert vllm["tokens"] == model.tokenize(text) and vllm["count"] == len(vllm["tokens"])
    assert vllm["max_model_len"] == model.info.context_length
    assert "".join(vllm["token_strs"]) == model.detokenize(vllm["tokens"])
    llama = post(base, "/tokenize", {"content": text, "with_pieces": True}).json()  # llama.cpp: no BOS by default
    assert "".join(t["piece"] for t in llama["tokens"]) == text
    assert [t["id"] for t in llama["tokens"]] == model.tokenize(text, special=False)
    back = post(base, "/detokenize", {"tokens": [t["id"] for t in llama["tokens"]]}).json()
    assert back == {"prompt": text, "content": text}
    # A piece that is part of a character comes as its bytes (llama.cpp's shape).
    accents = "naïve café 😀 ☃"
    pieces = [t["piece"] for t in post(base, "/tokenize", {"content": accents, "with_pieces": True}).json()["tokens"]]
    assert any(isinstance(p, list) for p in pieces)
    assert b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in pieces) == accents.encode()
    # A chat: the template's tokens, as many as the model reads for it; a chat request's other fields are taken.
    chat = {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": False}, "temperature": 0, "max_tokens": 1}
    counted = post(base, "/tokenize", chat).json()["count"]
    reply = client.chat.completions.create(
        model=registry.current_id,
        messages=HELLO,
        max_tokens=1,
        extra_body={"chat_template_kwargs": chat["chat_template_kwargs"]},
    )
    assert counted == reply.usage.prompt_tokens


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/tokenize", {}, "send one of"),
        ("/tokenize", {"prompt": "a", "messages": HELLO}, "send one of"),
        ("/tokenize", {"prompt": 5}, "prompt must be a string"),
        ("/tokenize", {"content": "a", "with_pieces": "yes"}, "with_pieces"),
        ("/tokenize", {"messages": [{"role": "user", "content": 5}]}, "content"),
        ("/tokenize", {"prompt": "a", "frobnicate": 1}, "unsupported field"),
        ("/tokenize", {"messages": HELLO, "frobnicate": 1}, "unsupported field"),
        ("/tokenize", {"content": "word " * 2_000_000}, "more than the model's context"),
        ("/detokenize", {"tokens": "abc"}, "tokens must be a list"),
        ("/detokenize", {"tokens": [-1]}, "tokens must be"),
        ("/detokenize", {"tokens": [10**9]}, "below"),
        ("/detokenize", {"tokens": [True]}, "tokens must be"),
    ],
)
def test_bad_tokenize_requests_are_400_naming_the_field(api, path, body, needle):
    base, _ = api
    response = post(base, path, body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


def test_tokenize_naming_another_model_loads_nothing_and_every_route_needs_the_key(api):
    base, registry = api
    before = registry.current_id
    other = next(i for i in registry.ids if i != before)
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        response = post(base, path, {**body, "model": other})
        assert response.status_code == 400 and "loaded model's tokenizer" in response.text
        assert post(base, path, {**body, "model": before}).status_code == 200
        assert httpx.post(f"{base}{path}", json=body).status_code == 401
    assert httpx.get(f"{base}/v1/models/{before}").status_code == 401
    assert registry.current_id == before


def test_a_remote_model_has_no_tokenizer_here(api):
    base, registry = api
    front = RemoteChatModel(f"{base}/v1#{registry.ids[0]}", api_key=KEY)
    with pytest.raises(ValueError, match="tokenizer is not here"):
        openai_api.tokenized(front, {"prompt": "hi"})
    with pytest.raises(ValueError, match="tokenizer is not here"):
        openai_api.detokenized(front, {"tokens": [1]})
