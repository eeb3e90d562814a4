"""Bad input raises ValueError with a clear message and leaves the session untouched."""

from __future__ import annotations

import math

import pytest

GOOD = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ("hello", "list"),
        ([{"role": "assistant", "content": "hi"}], "last message must be from the user"),
        ([{"role": "wizard", "content": "hi"}], "role"),
        ([{"role": "user", "content": 42}], "content must be a string"),
        ([{"role": "user", "content": None}], "content must be a string"),
        ([{"role": "user", "content": ["a"]}], "content must be a string"),
        ([{"role": "user", "content": "   "}], "empty user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
            "only the first message",
        ),
        (["just a string"], "must be a dict"),
    ],
)
def test_bad_messages_raise_value_error(qwen3, messages, match):
    with pytest.raises(ValueError, match=match):
        qwen3.stream_chat(messages)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature must be a finite"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1e9}, "temperature"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -5}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": "x"}, "seed"),
        ({"stop": [1, 2]}, "stop"),
        ({"enable_thinking": "yes"}, "enable_thinking"),
        ({"session_id": 12}, "session_id"),
    ],
)
def test_bad_parameters_raise_value_error(qwen3, kwargs, match):
    with pytest.raises(ValueError, match=match):
        qwen3.stream_chat(GOOD, **kwargs)


def test_a_conversation_beyond_the_context_is_refused(qwen3):
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(ValueError, match="context"):
        qwen3.stream_chat(long)


def test_bad_input_leaves_the_session_untouched(qwen3):
    session = "untouched"
    list(qwen3.stream_chat(GOOD, session_id=session, temperature=0, max_new_tokens=8))
    before = qwen3.cache_info()
    for bad in ([], [{"role": "user", "content": 1}], [{"role": "assistant", "content": "x"}]):
        with pytest.raises(ValueError):
            qwen3.stream_chat(bad, session_id=session)
    with pytest.raises(ValueError):
        qwen3.stream_chat(GOOD, session_id=session, temperature=math.nan)
    assert qwen3.cache_info() == before
    chunks = list(qwen3.stream_chat(GOOD, session_id=session, temperature=0, max_new_tokens=8))
    assert chunks[-1].stats.cached_tokens == chunks[-1].stats.prompt_tokens, "the session's cache was kept"
