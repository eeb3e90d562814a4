"""Continuing an answer (``continue_final_message``, the page's Continue): the reply is the text that follows
the last answer, and within a session an answer cut off by max_tokens or Stop goes on exactly as a larger
max_tokens would have gone on (greedy), from the cache; another person sending the same text learns nothing."""

from __future__ import annotations

import httpx
import pytest
from test_remote import Scripted, model_at, upstream  # noqa: F401 (a fixture)

import app
from llm_backends.openai_api import chat_request
from llm_backends.request import SessionKey
from llm_backends.serving import ModelRegistry
from test_app import free_port

ASK = [{"role": "user", "content": "Explain how a car engine works, step by step, in detail."}]
QWEN = {"enable_thinking": False}


def answer(model, messages, max_tokens, user=None, **fields):
    out = model.create(messages, max_tokens=max_tokens, temperature=0, user=user, **fields)
    return out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"], out["usage"]


def go_on(model, text, max_tokens, user=None, ask=ASK, **fields):
    messages = [*ask, {"role": "assistant", "content": text}]
    return answer(model, messages, max_tokens, user, continue_final_message=True, **fields)


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "embedded"])
def test_a_continued_answer_is_the_longer_answer(name, request):
    """Cut at several lengths and continued (twice, for one cut), in one session: each time the very answer a
    larger max_tokens gives, with every token but the last sampled one from the cache."""
    model = request.getfixturevalue(name)
    extra = {"enable_thinking": False} if name == "qwen3" else {}
    whole, finish, _ = answer(model, ASK, 24, **extra)
    assert finish == "length" and whole
    for cut in (3, 7, 13):
        user = f"{name}-{cut}"
        start, finish, first = answer(model, ASK, cut, user, **extra)
        assert finish == "length" and whole.startswith(start)
        more, _, usage = go_on(model, start, 24 - cut, user, **extra)
        assert start + more == whole, (cut, start, more)
        assert usage["prompt_tokens"] == first["prompt_tokens"] + cut
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    start, _, _ = answer(model, ASK, 5, "twice", **extra)
    middle, _, _ = go_on(model, start, 6, "twice", **extra)
    rest, _, _ = go_on(model, start + middle, 13, "twice", **extra)
    assert start + middle + rest == whole


def test_without_its_session_the_text_is_read_as_written(embedded):
    """The model's own tokens are the session's: the same text continued by another session is tokenized as
    rendered, and nothing comes from the first one's cache."""
    start, _, _ = answer(embedded, ASK, 7, "owner")
    rendered = embedded.count_tokens(
        embedded.request([*ASK, {"role": "assistant", "content": start}], continue_final=True)
    )
    _, _, usage = go_on(embedded, start, 17, "stranger")
    assert usage["prompt_tokens"] == rendered and usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_an_answer_that_was_edited_or_finished_is_continued_as_text(qwen3):
    start, _, first = answer(qwen3, ASK, 6, "editor", **QWEN)
    edited = start + " and"
    rendered = qwen3.count_tokens(qwen3.request([*ASK, {"role": "assistant", "content": edited}], continue_final=True))
    _, _, usage = go_on(qwen3, edited, 4, "editor", **QWEN)
    assert usage["prompt_tokens"] == rendered
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"]


def test_stop_leaves_an_answer_that_continues_exactly(gemma3):
    whole, _, _ = answer(gemma3, ASK, 40)
    session = SessionKey("python", "", "stopped")
    stream = gemma3.stream(gemma3.request(ASK, session=session, temperature=0, max_new_tokens=20))
    text = ""
    for chunk in stream:
        text += chunk.text
        if len(text) >= 4:
            stream.cancel()
    assert chunk.finish_reason == "cancelled" and whole.startswith(text) and text != whole
    more, _, usage = go_on(gemma3, text, 20, "stopped")
    assert whole.startswith(text + more) and more
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"messages": ASK, "continue_final_message": True}, "assistant's text answer"),
        ({"messages": [{"role": "assistant", "content": "Hi"}], "continue_final_message": True}, "user message"),
        ({"messages": [*ASK, {"role": "assistant", "content": "x"}]}, "last message must be from the user"),
        (
            {
                "messages": [*ASK, {"role": "assistant", "content": "x"}],
                "continue_final_message": True,
                "add_generation_prompt": True,
            },
            "add_generation_prompt",
        ),
        (
            {
                "messages": [*ASK, {"role": "assistant", "content": "x"}],
                "continue_final_message": True,
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        ({"messages": [*ASK, {"role": "assistant", "content": "x"}], "continue_final_message": "yes"}, "true"),
    ],
)
def test_bad_continuations_are_refused_by_name(qwen3, fields, needle):
    with pytest.raises(ValueError, match=needle):
        chat_request(qwen3, fields)


def test_a_remote_model_asks_its_upstream_to_continue(upstream):  # noqa: F811 (the fixture)
    seen = []

    def script(handler, body):
        seen.append(body)
        reply = {"choices": [{"message": {"role": "assistant", "content": " more"}, "finish_reason": "stop"}]}
        handler.answer(200, __import__("json").dumps(reply).encode())

    Scripted.script = script
    model = model_at(upstream)
    out = model.create([*ASK, {"role": "assistant", "content": "Some"}], continue_final_message=True)
    assert out["choices"][0]["message"]["content"] == " more"
    assert seen[-1]["continue_final_message"] is True and seen[-1]["add_generation_prompt"] is False
    assert seen[-1]["messages"][-1] == {"role": "assistant", "content": "Some"}


@pytest.fixture(scope="module")
def door(gemma3_dir):
    registry = ModelRegistry([str(gemma3_dir)], max_cache_bytes=2**28)
    registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port(), api_keys=["key-a", "key-b"], concurrency=2)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{config.port}/v1/chat/completions"
    demo.close()


def post(url: str, key: str, **body) -> dict:
    response = httpx.post(url, json={"temperature": 0, **body}, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_through_the_http_door_only_the_owner_continues_from_its_tokens(door):
    whole = post(door, "key-a", messages=ASK, max_tokens=20)["choices"][0]["message"]["content"]
    first = post(door, "key-a", messages=ASK, max_tokens=6, user="me")
    start = first["choices"][0]["message"]["content"]
    cont = [*ASK, {"role": "assistant", "content": start}]
    mine = post(door, "key-a", messages=cont, max_tokens=14, user="me", continue_final_message=True)
    assert start + mine["choices"][0]["message"]["content"] == whole
    assert mine["usage"]["prompt_tokens_details"]["cached_tokens"] == mine["usage"]["prompt_tokens"] - 1
    # Another key, same user name and the same words: its own session, nothing of the first one's.
    theirs = post(door, "key-b", messages=cont, max_tokens=14, user="me", continue_final_message=True)
    assert theirs["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_stop_string_begun_in_the_answer_and_ended_in_the_continuation_ends_it(embedded):
    """The base model's transcript ends an answer at its next "\nQuestion:": cut between the newline and the
    rest, the continuation must not write the question into the answer (as sent back by the API, and trimmed as
    the page sends it)."""
    ask = [{"role": "user", "content": "What is 2+2?"}]
    whole, finish, _ = answer(embedded, ask, 60)
    assert finish == "stop"
    for cut in (7, 8):
        start, finish, _ = answer(embedded, ask, cut, f"stop-{cut}")
        assert finish == "length" and "Question" not in whole
        for sent in (start, start.strip()):
            more, finish, _ = go_on(embedded, sent, 60 - cut, f"stop-{cut}", ask)
            assert (more, finish) == ("", "stop"), (cut, sent, more)


def test_other_peoples_cut_answers_never_push_out_a_persons_own(gemma3):
    """Another person's many cut-off replies leave this person's continuation exact (a shared list let them push
    it out: the answer then changed, and its prompt_tokens told that others had been busy)."""
    whole, _, _ = answer(gemma3, ASK, 20)
    start, _, _ = answer(gemma3, ASK, 6, "patient")
    for i in range(70):
        others = gemma3.request(ASK, session=SessionKey("api", f"other-{i}", "x"), temperature=0, max_new_tokens=1)
        list(gemma3.stream(others))
    more, _, usage = go_on(gemma3, start, 14, "patient")
    assert start + more == whole and usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_a_session_cleared_while_its_answer_runs_keeps_nothing_of_it(gemma3):
    session = SessionKey("python", "", "cleared")
    stream = gemma3.stream(gemma3.request(ASK, session=session, temperature=0, max_new_tokens=8))
    next(stream)
    gemma3.clear_sessions(session)
    assert list(stream)[-1].finish_reason == "length"
    assert gemma3._cut.get(session) is None and session not in gemma3.sessions._entries
