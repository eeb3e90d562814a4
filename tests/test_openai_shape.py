"""ChatModel.create returns OpenAI chat.completion dicts, streamed or not, with the same greedy text."""

from __future__ import annotations

import pytest

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


def test_create_returns_a_chat_completion(gemma3):
    out = gemma3.create(HELLO, temperature=0, max_tokens=8)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert isinstance(out["created"], int) and out["model"] == gemma3.get_model_info()["name"]
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 8


def test_streamed_create_matches_the_plain_one(qwen3):
    plain = qwen3.create(HELLO, temperature=0, max_tokens=12, model="tiny")
    events = list(
        qwen3.create(
            HELLO, temperature=0, max_tokens=12, model="tiny", stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "tiny" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("content", "") for d in deltas) == plain["choices"][0]["message"]["content"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == plain["choices"][0]["message"].get(
        "reasoning_content", ""
    )
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12


def test_create_maps_thinking_and_user_to_the_engine(qwen3):
    off = qwen3.create(HELLO, temperature=0, max_tokens=6, chat_template_kwargs={"enable_thinking": False})
    assert "reasoning_content" not in off["choices"][0]["message"]
    on = qwen3.create(HELLO, temperature=0, max_tokens=6, reasoning_effort="high")
    assert on["choices"][0]["message"]["reasoning_content"]
    qwen3.create(HELLO, temperature=0, max_tokens=6, user="alice")
    again = qwen3.create(HELLO, temperature=0, max_tokens=6, user="alice")
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 17}, "n must be an integer from 1 to 16"),
        ({"frobnicate": 1}, "unsupported field"),
        ({"reasoning_effort": "max"}, "effort"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_new_tokens"),
    ],
)
def test_create_rejects_bad_requests(qwen3, kwargs, match):
    with pytest.raises(ValueError, match=match):
        qwen3.create(HELLO, **kwargs)
