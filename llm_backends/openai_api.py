"""OpenAI chat-completion shapes, shared by ChatModel.create() and the HTTP routes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

# Accepted for compatibility; only their neutral values are supported.
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}
EXTRA = {
    "max_completion_tokens",
    "stop",
    "seed",
    "user",
    "session_id",
    "top_k",
    "repetition_penalty",
    "enable_thinking",
    "chat_template_kwargs",
    "reasoning_effort",
    "stream_options",
}


def _thinking(kwargs: dict) -> bool | None:
    template_kwargs = kwargs.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise ValueError("chat_template_kwargs must be an object")
    if "enable_thinking" in template_kwargs:
        return template_kwargs["enable_thinking"]
    if kwargs.get("enable_thinking") is not None:
        return kwargs["enable_thinking"]
    effort = kwargs.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise ValueError(f"reasoning_effort must be none, minimal, low, medium or high, not {effort!r}")
    return effort not in ("none", "minimal")


def stream_args(messages, *, temperature, max_tokens, top_p, **kwargs) -> dict:
    """Maps OpenAI request fields onto ``stream_chat`` keyword arguments; raises ValueError on unknown ones."""
    for name, neutral in NEUTRAL.items():
        if kwargs.pop(name, neutral) not in (neutral, None):
            raise ValueError(f"{name} other than {neutral!r} is not supported")
    unknown = set(kwargs) - EXTRA
    if unknown:
        raise ValueError(f"unsupported field(s): {', '.join(sorted(unknown))}")
    if kwargs.get("max_completion_tokens") is not None:
        max_tokens = kwargs["max_completion_tokens"]
    session = kwargs.get("session_id") or kwargs.get("user")
    if session is not None and not isinstance(session, str):
        raise ValueError("user must be a string")
    return dict(
        messages=messages,
        session_id=session or None,
        max_new_tokens=512 if max_tokens is None else max_tokens,
        temperature=0.7 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=kwargs.get("top_k"),
        repetition_penalty=kwargs.get("repetition_penalty"),
        seed=kwargs.get("seed"),
        enable_thinking=_thinking(kwargs),
        stop=kwargs.get("stop"),
    )


def usage(stats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def create(chat_model, messages, *, temperature=0.7, max_tokens=512, top_p=1.0, model=None, stream=False, **kwargs):
    """A ``chat.completion`` dict, or with ``stream`` an iterator of ``chat.completion.chunk`` dicts.

    Raises ValueError for bad input before generating.
    """
    include_usage = bool((kwargs.get("stream_options") or {}).get("include_usage"))
    chunks = chat_model.stream_chat(
        **stream_args(messages, temperature=temperature, max_tokens=max_tokens, top_p=top_p, **kwargs)
    )
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model or chat_model.get_model_info()["name"],
    }
    if stream:
        return _stream(chunks, head, include_usage)
    text, reasoning, last = [], [], None
    for chunk in chunks:
        text.append(chunk.text)
        reasoning.append(chunk.reasoning)
        last = chunk
    message = {"role": "assistant", "content": "".join(text)}
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    return {
        **head,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": last.finish_reason, "logprobs": None}],
        "usage": usage(last.stats),
    }


def _stream(chunks, head: dict, include_usage: bool) -> Iterator[dict]:
    def event(delta: dict, finish_reason=None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    try:
        yield event({"role": "assistant", "content": ""})
        for chunk in chunks:
            delta = {}
            if chunk.reasoning:
                delta["reasoning_content"] = chunk.reasoning
            if chunk.text:
                delta["content"] = chunk.text
            if delta:
                yield event(delta)
            if chunk.finish_reason is not None:
                yield event({}, chunk.finish_reason)
                if include_usage:
                    yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(chunk.stats)}
    finally:
        chunks.close()
