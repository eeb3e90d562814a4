"""Sessions are namespaced by who may use them: no /v1 field or header reaches a page session's cache."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

import app
from llm_backends.serving import ModelRegistry
from llm_backends.session_cache import common_prefix_len
from test_app import free_port

# message, then ChatSettings: system prompt, temperature, top-p, top-k, max new tokens, rep. penalty, seed, thinking
GREEDY = ("", 0, 1, 0, 16, 1, -1, False)
FIRST = "Tell me about the sea, the sky and the mountains."


KEY = "someone-elses-key"


@pytest.fixture(scope="module")
def server(qwen3_dir):
    # The API caller holds a key of their own, so they are another principal than the person in the page.
    # (On a local server without logins or keys, page and API are the one person using it, and share.)
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**28)
    registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port(), concurrency=4, api_keys=[KEY])
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

    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, json={**body, "session_id": secret}, headers=auth, timeout=60)
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
        # Each attempt starts with none of the API caller's own sessions, which it may reuse in full (its own).
        for key in [k for k in registry.get().sessions._entries if k.space == "api"]:
            registry.get().clear_cache(key)
        r = httpx.post(url, json=sent, headers={**auth, **headers}, timeout=60)
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


SYSTEM = "You are the help desk of the lighthouse museum. " * 12
SECRET = "My account number is 4417 and my password hint is the name of my first cat."


def test_a_shared_system_prompt_is_computed_once_and_nothing_else_crosses_principals(qwen3_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llm_backends.http_api import add_openai_routes

    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**28)
    model = registry.switch(registry.ids[0])
    routes = FastAPI()
    add_openai_routes(routes, registry, api_key=["key-ann", "key-bob", "key-cy"], exposed=False)
    client = TestClient(routes)
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": SECRET}]

    def ask(key: str, user: str, messages) -> dict:
        body = {"messages": messages, "max_tokens": 2, "temperature": 0, "user": user, "enable_thinking": False}
        r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    first = ask("key-ann", "ann-1", conversation)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    operator = common_prefix_len(
        model.render([conversation[0], {"role": "user", "content": "A"}], enable_thinking=False),
        model.render([conversation[0], {"role": "user", "content": "B"}], enable_thinking=False),
    )
    # Another person, same system prompt, their first message word for word the first person's: only the
    # operator's words are reused, nothing of the first person's.
    bob = ask("key-bob", "bob-1", conversation)
    assert 0 < bob["prompt_tokens_details"]["cached_tokens"] <= operator
    assert bob["prompt_tokens_details"]["cached_tokens"] >= operator - 2, "the system prompt was computed once"
    # The same person in a new session (a reloaded page, a new chat) reuses everything they sent before.
    again = ask("key-ann", "ann-2", conversation)
    assert again["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] - 1
    # Without a shared system prompt nothing crosses at all.
    plain = [{"role": "user", "content": SECRET}]
    ask("key-ann", "ann-3", plain)
    assert ask("key-cy", "cy-1", plain)["prompt_tokens_details"]["cached_tokens"] == 0
    # Answers stay exact: a donor's cache gives the same reply as a fresh computation.
    reused = model.create(conversation, max_tokens=12, temperature=0, user="py-1", enable_thinking=False)
    fresh = model.create(conversation, max_tokens=12, temperature=0, enable_thinking=False)
    assert reused["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
    assert reused["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


@pytest.fixture(scope="module")
def gemma3_wide_dir(tmp_path_factory):
    """A tiny Gemma 3 whose sliding window (512, as the real 270M's) holds a whole first turn: its template folds
    the system prompt into the first user turn."""
    from tiny_models import build_gemma3

    return build_gemma3(tmp_path_factory.mktemp("tiny-gemma3-wide"), sliding_window=512, with_template=True)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_another_persons_words_cannot_be_reached_by_sending_them_as_ones_own_system_prompt(
    family, qwen3_dir, gemma3_wide_dir
):
    """Another person may reuse the donor's own system prompt, never more because the asker's system prompt is
    longer: an asker who writes the first person's turn into their own system prompt (after the template's turn
    markers on Qwen; on Gemma, whose template folds the system prompt into the first turn, as it is) must learn
    nothing from cached_tokens. One server per guess, so the victim's cache is the only one to find."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llm_backends.http_api import add_openai_routes

    folder = qwen3_dir if family == "qwen3" else gemma3_wide_dir
    victim = [{"role": "system", "content": SYSTEM}] if family == "qwen3" else []  # Gemma: no system prompt at all
    victim.append({"role": "user", "content": SECRET})

    def trial(pin: str) -> tuple[int, int]:
        registry = ModelRegistry([str(folder)], max_cache_bytes=2**28)
        model = registry.switch(registry.ids[0])
        routes = FastAPI()
        add_openai_routes(routes, registry, api_key=["key-ann", "key-mal"], exposed=False)
        client = TestClient(routes)

        def cached(key: str, messages) -> int:
            body = {"messages": messages, "max_tokens": 1, "temperature": 0, "user": key, "enable_thinking": False}
            r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        cached("key-ann", victim)
        # The victim's rendered prompt up to their secret, less the head the template writes before a system prompt.
        text = model.tokenizer.decode(model.render(victim, enable_thinking=False))
        probe = model.tokenizer.decode(
            model.render(
                [{"role": "system", "content": "MARK"}, {"role": "user", "content": "x"}], enable_thinking=False
            )
        )
        head = probe[: probe.index("MARK")]
        forged = text[len(head) : text.index(SECRET)] + SECRET.replace("4417", pin)
        assert text.startswith(head)
        found = cached("key-mal", [{"role": "system", "content": forged}, {"role": "user", "content": "x"}])
        return found, model.operator_tokens(model.request(victim, thinking=False))

    right, operator = trial("4417")
    wrong, _ = trial("1111")
    assert right == wrong, "a right guess must look like a wrong one"
    assert right <= operator, "nothing past the victim's own system prompt"


def test_where_several_keys_share_a_server_only_the_metrics_key_reads_everyones_counts(qwen3_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llm_backends.http_api import add_openai_routes

    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    registry.switch(registry.ids[0])

    def scrape(keys, metrics_key, key) -> int:
        routes = FastAPI()
        add_openai_routes(routes, registry, api_key=keys, exposed=False, metrics_key=metrics_key)
        return TestClient(routes).get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code

    assert scrape(["key-ann"], None, "key-ann") == 200, "one key: its holder is the only caller"
    assert scrape(["key-ann", "key-mal"], None, "key-mal") == 403, "another caller's traffic is not theirs to read"
    assert scrape(["key-ann", "key-mal"], "ops", "key-mal") == 401
    assert scrape(["key-ann", "key-mal"], "ops", "ops") == 200
    assert scrape(["key-ann"], "ops", "key-ann") == 401, "with a metrics key, only it reads /metrics"
    import app

    assert app.parse_args(["--metrics-key", "ops"], env={}).metrics_key == "ops"
    assert app.parse_args([], env={"LLM_METRICS_KEY": "ops"}).metrics_key == "ops"


def test_another_persons_system_prompt_is_lent_whole_or_not_at_all(qwen3_dir):
    """A system prompt sent through the API is its sender's words too: another key that guesses its beginning
    must not see cached_tokens grow with each right word, only reuse it when it sends the same one whole."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llm_backends.http_api import add_openai_routes

    private = SYSTEM + "The vault code is 4417. Never tell it."

    def trial(guess: str) -> int:
        registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**28)
        registry.switch(registry.ids[0])
        routes = FastAPI()
        add_openai_routes(routes, registry, api_key=["key-ann", "key-mal"], exposed=False)
        client = TestClient(routes)
        cached = []
        for key, system in (("key-ann", private), ("key-mal", guess)):
            body = {
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hello."}],
                "max_tokens": 1,
                "temperature": 0,
                "enable_thinking": False,
                "user": key,
            }
            r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        return cached[1]

    right, wrong = trial(SYSTEM + "The vault code is 44"), trial(SYSTEM + "The vault code is 11")
    assert right == wrong == 0, "a beginning of someone's system prompt, right or wrong, reuses nothing"
    assert trial(private) > len(SYSTEM) // 8, "the same system prompt, whole, is computed once"


def _door(folder, keys, budget: int = 2**28):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llm_backends.http_api import add_openai_routes

    registry = ModelRegistry([str(folder)], max_cache_bytes=budget)
    model = registry.switch(registry.ids[0])
    routes = FastAPI()
    add_openai_routes(routes, registry, api_key=keys, exposed=False)
    client = TestClient(routes)

    def ask(key: str, messages, user: str | None = None) -> dict:
        body = {"messages": messages, "max_tokens": 2, "temperature": 0, "user": user or key, "enable_thinking": False}
        r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        return r.json()

    return model, ask


def test_what_another_person_is_lent_is_a_kept_system_prompt_never_a_copy_of_a_live_conversation(
    gemma3_wide_dir, monkeypatch
):
    """Past the sliding window and past the restore points a conversation keeps, a second person still starts
    from the system prompt; and what is copied for them is the system prompt alone, so neither the first
    person's turns nor how long their conversation has grown show in what is lent or in how long it takes."""
    from llm_backends.session_cache import CacheEntry

    model, ask = _door(gemma3_wide_dir, ["key-ann", "key-bob", "key-cy"])
    system = [{"role": "system", "content": SYSTEM}]
    conversation = [*system, {"role": "user", "content": SECRET}]
    for turn in range(10):  # ~900 tokens: restore points before the last 8 turns are gone
        answer = ask("key-ann", conversation)["choices"][0]["message"]["content"]
        conversation += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And {turn}?"}]
    operator = model.operator_tokens(model.request(conversation[:2], thinking=False))
    copied = []
    copy = CacheEntry.copy

    def recording(self):
        copied.append(len(self.ids))
        return copy(self)

    monkeypatch.setattr(CacheEntry, "copy", recording)
    for key in ("key-bob", "key-cy"):
        usage = ask(key, [*system, {"role": "user", "content": f"Hello from {key}."}])["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == operator, "the system prompt, computed once"
    assert copied and set(copied) == {operator}, "only the kept system prompt was copied"


def test_a_prompt_whose_system_part_was_not_read_whole_lends_nothing(qwen3_dir):
    """A first person whose prefill stopped inside the system prompt (a stream cancelled between pieces) leaves
    a cache holding part of it: nobody else may start from that part."""
    from llm_backends import SessionKey

    model, ask = _door(qwen3_dir, ["key-ann", "key-bob"])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello."}]
    request = model.request(messages, thinking=False, session=SessionKey("api", "ann", "ann"))
    prompt = model.render(messages, enable_thinking=False)
    operator = model.operator_tokens(request, prompt)
    lease, entry = model.sessions.checkout(request.session, model.engine.new_entry, prompt, lambda: operator)
    model.engine.runner.forward(entry, prompt[:64], logits=False)  # then the stream was cancelled
    model.sessions.checkin(lease, entry)
    usage = ask("key-bob", messages)["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert ask("key-ann", messages, user="ann-2")["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, (
        "bob's prompt, read whole, is kept for the next person"
    )


def test_a_cleared_session_takes_its_system_prompt_along_when_nobody_else_sent_it(qwen3_dir):
    model, ask = _door(qwen3_dir, ["key-ann", "key-bob", "key-cy"])
    private = [{"role": "system", "content": SYSTEM + "The vault code is 4417."}, {"role": "user", "content": "Hi."}]
    ask("key-ann", private)
    for key in list(model.sessions._entries):  # New chat: the person's session is cleared
        model.clear_sessions(key)
    assert model.cache_info()["system_prompts"]["held"] == 0
    assert ask("key-bob", private)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Sent by two, it stays while one of them still has a session.
    ask("key-cy", private)
    [bob] = [key for key in model.sessions._entries if key.name == "key-bob"]
    model.clear_sessions(bob)
    assert model.cache_info()["system_prompts"]["held"] == 1


def test_kept_system_prompts_give_way_to_live_sessions_and_hold_only_their_own_tokens(qwen3_dir):
    """On a tight budget the copies kept for other people go before anybody's session; and a copy made from a
    long first request is no larger than one made from a short one (it holds the system prompt, not room for the
    whole conversation)."""
    model, ask = _door(qwen3_dir, ["key-ann"], budget=8 * 2**20)
    conversations = {}
    for turn in range(2):
        for i in range(12):
            system = [{"role": "system", "content": f"Prompt number {i}. " + SYSTEM}]
            conversation = conversations.setdefault(i, [*system, {"role": "user", "content": "The sea. " * 60}])
            answer = ask("key-ann", conversation, user=f"chat-{i}")["choices"][0]["message"]["content"]
            conversation += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And {turn}?"}]
    info = model.cache_info()
    assert info["evictions"] == 0 and info["hits"]["memory"] == 12, "every second turn found its session"
    sizes = []
    for first in ("Hi.", "The sea. " * 200):
        model.clear_sessions()
        ask("key-ann", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}])
        sizes.append(model.cache_info()["system_prompts"]["bytes"])
    assert sizes[0] == sizes[1] > 0
