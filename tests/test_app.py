"""The app over HTTP with gradio_client: streamed multi-turn chat, isolation, model switch, Stop, auth refusal."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from forwards import count_forwards
from gradio_client import Client

import app
from llm_backends.serving import ModelRegistry

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.embedded
# message, system prompt, temperature, top-p, top-k, max new tokens, repetition penalty, seed, thinking
GREEDY = ("", 0, 1, 0, 24, 1, 0, False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(embedded, qwen3_dir, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config.json").write_text('{"model_type": "qwen3"}')
    registry = ModelRegistry([None, str(qwen3_dir), str(broken)], max_cache_bytes=2**30)
    registry.model, registry.current_id = embedded, registry.ids[0]  # reuse the session's loaded default
    config = app.AppConfig(port=free_port(), concurrency=2)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{config.port}/", registry
    demo.close()


def chat(client: Client, message: str, *params):
    job = client.submit(message, *(params or GREEDY), api_name="/chat")
    updates = [u for u in job]
    return job.outputs()[-1], updates


def answer_of(messages) -> str:
    return "".join(m["content"] for m in messages if not (m.get("metadata") or {}).get("title"))


def test_streamed_multi_turn_chat_on_the_embedded_default(server):
    url, registry = server
    client = Client(url, verbose=False)
    first, updates = chat(client, "Tell me about the history of lighthouses.")
    assert len(updates) >= 3, "the reply arrives in several steps"
    stats = [m for m in first if "to first token" in (m.get("metadata") or {}).get("title", "")]
    assert stats and answer_of(first).strip()
    second, _ = chat(client, "And the capital of Italy is")
    assert "from cache" in stats_title(second), "the second turn reused the session cache"


def test_two_clients_have_isolated_histories_and_caches(server):
    url, registry = server
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    chat(a, "Tell me about lighthouses.")
    chat(a, "Who built the first one?")
    b_reply, _ = chat(b, "Who built the first one?")
    assert "from cache" not in stats_title(b_reply), "a new visitor reuses nothing"
    a_reply, _ = chat(a, "And the second?")
    assert "from cache" in stats_title(a_reply), "the first visitor's cache is still theirs"
    history = b.predict("Hi", *GREEDY, api_name="/chat")
    assert "lighthouse" not in str(history).lower()


def stats_title(messages) -> str:
    return [m for m in messages if (m.get("metadata") or {}).get("title")][-1]["metadata"]["title"]


def test_stop_stops_the_backend(server):
    url, registry = server
    model = registry.get()
    calls, handle = count_forwards(model, time.perf_counter)
    try:
        client = Client(url, verbose=False)
        job = client.submit("Write a long story about the sea.", "", 0, 1, 0, 2000, 1, 0, False, api_name="/chat")
        deadline = time.time() + 60
        while len(calls) < 8 and time.time() < deadline:
            time.sleep(0.05)
        job.cancel()
        time.sleep(1.5)
        settled = len(calls)
        time.sleep(1.5)
        assert len(calls) == settled, "the model kept generating after Stop"
        assert settled < 200
        assert model.cache_info()["in_use"] == 0
    finally:
        handle.remove()


def test_model_switch_loads_frees_and_a_failed_load_keeps_serving(server):
    url, registry = server
    client = Client(url, verbose=False)
    default_id, qwen_id, broken_id = registry.ids
    client.predict(broken_id, api_name="/switch_model")
    assert registry.current_id == default_id, "a failed load keeps the previous model"
    client.predict(qwen_id, api_name="/switch_model")
    assert registry.current_id == qwen_id and registry.get().family.name == "qwen3"
    reply, _ = chat(client, "Hello", "", 0, 1, 0, 16, 1, 0, True)
    assert any("Thinking" in (m.get("metadata") or {}).get("title", "") for m in reply)
    client.predict(default_id, api_name="/switch_model")
    assert registry.current_id == default_id


def test_sharing_without_auth_is_refused():
    for argv in (["--share"], ["--host", "0.0.0.0"]):
        with pytest.raises(SystemExit, match="--auth user:password"):
            app.check_exposure(app.parse_args(argv, env={}))
    app.check_exposure(app.parse_args(["--host", "0.0.0.0", "--auth", "ann:secret"], env={}))
    app.check_exposure(app.parse_args(["--host", "0.0.0.0", "--insecure-no-auth"], env={}))
    app.check_exposure(app.parse_args([], env={"LLM_HOST": "127.0.0.1"}))
    out = subprocess.run(
        [sys.executable, "app.py", "--host", "0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLM_AUTH": ""},
    )
    assert out.returncode != 0 and "Refusing to serve" in out.stderr


def test_flags_have_environment_variables(tmp_path):
    logins = tmp_path / "logins"
    logins.write_text("ann:one\n# comment\nbob:two\n")
    config = app.parse_args(
        [],
        env={
            "LLM_MODELS": "a, b",
            "LLM_PORT": "9000",
            "LLM_AUTH": str(logins),
            "LLM_CONCURRENCY": "3",
            "LLM_SHARE": "true",
            "LLM_API_KEY": "k",
        },
    )
    assert config.models == ["a", "b"] and config.port == 9000 and config.concurrency == 3
    assert config.auth == [("ann", "one"), ("bob", "two")] and config.share and config.api_keys == ["k"]
    assert app.parse_args(["--port", "1234"], env={"LLM_PORT": "9000"}).port == 1234
    assert app.parse_args([], env={"SPACE_ID": "me/space"}).host == "0.0.0.0"


def test_the_exact_mode_is_a_flag_and_an_environment_variable():
    assert app.parse_args(["--exact"], env={}).exact
    assert app.parse_args([], env={"LLM_EXACT": "1"}).exact
    assert not app.parse_args([], env={}).exact
    from llm_backends import load_model

    with pytest.raises(ValueError, match="exact must be True or False"):
        load_model(exact="yes")


def test_history_sent_to_the_model_leaves_out_thinking_stats_and_notices():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "ponder", "metadata": {"title": "💭 Thinking"}},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}], "metadata": {}},
        {"role": "assistant", "content": "", "metadata": {"title": "0.1 s to first token"}},
    ]
    assert app.to_messages("sys", history, "next") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "next"},
    ]


def test_long_conversations_drop_the_fewest_oldest_turns_rendering_once_per_try(qwen3):
    turn = "word " * 600
    messages = [{"role": "system", "content": "s"}]
    for _ in range(4):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": turn}]
    messages.append({"role": "user", "content": "last"})
    request = qwen3.request(messages, max_new_tokens=256, fit_context=True)
    calls = []
    render = qwen3.render
    qwen3.render = lambda messages, **kwargs: calls.append(len(messages)) or render(messages, **kwargs)
    try:
        stream = qwen3.stream(request)
    finally:
        del qwen3.render
    assert stream.dropped_turns >= 1
    conversation_renders = [n for n in calls if n > 2]  # not the two probes that find the system prompt's end
    assert len(conversation_renders) <= 4, "rendered once, then bisected over 4 candidate cuts (3 more at most)"
    kept = messages[:1] + messages[1 + 2 * stream.dropped_turns :]
    assert kept[1]["role"] == "user" and kept[-1] == {"role": "user", "content": "last"}
    assert stream.prompt_tokens == len(qwen3.render(kept, enable_thinking=True))
    assert stream.prompt_tokens + 256 <= qwen3.info.context_length
    one_fewer = messages[:1] + messages[1 + 2 * (stream.dropped_turns - 1) :]
    assert len(qwen3.render(one_fewer, enable_thinking=True)) + 256 > qwen3.info.context_length, "the fewest dropped"
    stream.close()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        qwen3.stream(qwen3.request(messages, max_new_tokens=256))


def test_text_no_context_could_hold_is_refused_or_cut_before_it_is_rendered(qwen3):
    renders = []
    render = qwen3.render
    qwen3.render = lambda messages, **kwargs: renders.append(len(messages)) or render(messages, **kwargs)
    most = (qwen3.info.context_length - 256) * qwen3.longest_token
    huge = "word " * (most // 5 + 1)
    try:
        for fit_context in (False, True):
            with pytest.raises(ValueError, match=f"alone is {len(huge)} characters|{len(huge)} characters, more"):
                qwen3.stream(
                    qwen3.request([{"role": "user", "content": huge}], max_new_tokens=256, fit_context=fit_context)
                )
        system = [{"role": "system", "content": huge}, {"role": "user", "content": "hi"}]
        with pytest.raises(ValueError, match="the system prompt and the last message are"):
            qwen3.stream(qwen3.request(system, max_new_tokens=256, fit_context=True))
        assert renders == [], "refused without the template or the tokenizer reading megabytes"
        # A huge old turn is dropped without rendering any conversation that still holds it.
        history = [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]
        stream = qwen3.stream(qwen3.request([*history, {"role": "user", "content": "last"}], fit_context=True))
        assert stream.dropped_turns == 1 and max(renders) <= 2
        stream.close()
    finally:
        del qwen3.render
    tokens = qwen3.tokenizer(" " * 50_000 + "=" * 50_000 + "\n" * 50_000, add_special_tokens=False)["input_ids"]
    assert len(tokens) * qwen3.longest_token >= 150_000, "no token stands for more characters than its spelling"


def test_counting_characters_is_one_pass_however_many_turns(qwen3, monkeypatch):
    from llm_backends import local

    visited = []  # messages read by the character counts
    characters = local._characters
    monkeypatch.setattr(
        local, "_characters", lambda messages, *rest: visited.append(len(messages)) or characters(messages, *rest)
    )
    turn = "word " * (qwen3.info.context_length * qwen3.longest_token // 5 // 500)  # 1,000 of them hold 2 contexts
    messages = [{"role": "user", "content": turn}, {"role": "assistant", "content": "ok"}] * 1000
    stream = qwen3.stream(qwen3.request([*messages, {"role": "user", "content": "last"}], fit_context=True))
    stream.close()
    assert stream.dropped_turns >= 500 and sum(visited) <= 2 * len(messages) + 10, sum(visited)


def test_a_normalizer_that_folds_characters_widens_the_bound():
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from llm_backends.local import _folding

    raw = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.normalizer = normalizers.NFC()  # Qwen's: a letter and its marks become one character
    assert _folding(PreTrainedTokenizerFast(tokenizer_object=raw)) == 4
    raw.normalizer = normalizers.Replace(" ", "\u2581")  # Gemma's: one for one
    assert _folding(PreTrainedTokenizerFast(tokenizer_object=raw)) == 1
    raw.normalizer = None
    assert _folding(PreTrainedTokenizerFast(tokenizer_object=raw)) == 1


def slowly_loading(folder) -> tuple[ModelRegistry, threading.Event]:
    """A registry whose load reports 40 % progress, then waits for the event before loading ``folder``."""
    from llm_backends import load_model

    release = threading.Event()

    def slow_load(source, progress=None, **kwargs):
        progress(0.4, "converting the checkpoint")
        release.wait(60)
        return load_model(source, max_cache_bytes=2**26)

    return ModelRegistry([str(folder)], load=slow_load), release


def test_the_page_opens_while_the_model_loads(qwen3_dir):
    import httpx

    registry, release = slowly_loading(qwen3_dir)
    config = app.AppConfig(port=free_port())
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    try:
        base = f"http://127.0.0.1:{config.port}"
        assert httpx.get(base + "/", timeout=10).status_code == 200, "the page is up before the model"
        assert "converting the checkpoint (40%)" in app.info_text(registry), "the header shows the load's progress"
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        client = Client(base + "/", verbose=False)
        job = client.submit("Hello", "", 0, 1, 0, 16, 1, 0, False, api_name="/chat")
        deadline = time.time() + 10
        while not job.outputs() and time.time() < deadline:
            time.sleep(0.05)
        waiting = job.outputs()[0][0]["metadata"]["title"] if job.outputs() else ""
        assert "Waiting for the model to load" in waiting, "a message sent meanwhile says what it waits for"
        release.set()
        assert job.result(timeout=60), "a message sent during the load is answered once it finishes"
        assert registry.get().get_model_info()["family"] == "qwen3"
    finally:
        release.set()
        demo.close()


def test_the_header_says_plainly_when_the_model_is_a_base_model(embedded, qwen3):
    from llm_backends.serving import ModelRegistry

    assert embedded.capabilities.base_model and not qwen3.capabilities.base_model
    for model, expected in ((embedded, True), (qwen3, False)):
        registry = ModelRegistry(["x"], load=lambda *args, model=model, **kwargs: model)
        registry.switch(registry.ids[0])
        text = app.info_text(registry)
        assert ("base model" in text and "--model Qwen/Qwen3-0.6B" in text) is expected, text
