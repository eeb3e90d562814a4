"""OpenAI chat-completion shapes, shared by ``ChatModel.create()`` and the HTTP routes: request fields onto a
ChatRequest, and a ChatStream into ``chat.completion`` / ``chat.completion.chunk`` dicts."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from .backend import ChatModel, ChatStream
from .request import ChatRequest, SessionKey

# Accepted for compatibility; only their neutral values are supported.
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0}
# Request fields besides messages, model, stream and user. response_format, tools and logprobs reach
# build_request, which refuses what no backend honours yet instead of answering without it.
FIELDS = {
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "top_k",
    "repetition_penalty",
    "enable_thinking",
    "chat_template_kwargs",
    "reasoning_effort",
    "stream_options",
    "response_format",
    "tools",
    "tool_choice",
    "logprobs",
    "top_logprobs",
} | set(NEUTRAL)


def chat_request(model: ChatModel, messages, fields: dict, *, session: SessionKey | None, stream: bool) -> ChatRequest:
    """Maps OpenAI request fields onto a ChatRequest for ``model``; ValueError naming an unknown or bad one."""
    fields = dict(fields)
    for name, neutral in NEUTRAL.items():
        if fields.pop(name, neutral) not in (neutral, None):
            raise ValueError(f"{name} other than {neutral!r} is not supported")
    unknown = set(fields) - FIELDS
    if unknown:
        raise ValueError(f"unsupported field(s): {', '.join(sorted(unknown))}")
    max_tokens = fields.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = fields.get("max_tokens")
    if fields.get("tool_choice") not in (None, "none") and not fields.get("tools"):
        raise ValueError("tool_choice needs tools")
    return model.request(
        messages,
        session=session,
        max_new_tokens=max_tokens,
        temperature=fields.get("temperature"),
        top_p=fields.get("top_p"),
        top_k=fields.get("top_k"),
        repetition_penalty=fields.get("repetition_penalty"),
        seed=fields.get("seed"),
        thinking=_thinking(fields),
        stop=fields.get("stop"),
        stream=stream,
        response_format=fields.get("response_format"),
        tools=fields.get("tools"),
        logprobs=(fields.get("top_logprobs") or 0) if fields.get("logprobs") else None,
    )


def session_for(space: str, principal: str, user) -> SessionKey | None:
    """The session ``user`` names within one caller's space; ValueError unless it is a string."""
    if user is None or user == "":
        return None
    if not isinstance(user, str):
        raise ValueError("user must be a string")
    return SessionKey(space, principal, user)


def _thinking(fields: dict) -> bool | None:
    template_kwargs = fields.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise ValueError("chat_template_kwargs must be an object")
    if "enable_thinking" in template_kwargs:
        return template_kwargs["enable_thinking"]
    if fields.get("enable_thinking") is not None:
        return fields["enable_thinking"]
    effort = fields.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise ValueError(f"reasoning_effort must be none, minimal, low, medium or high, not {effort!r}")
    return effort not in ("none", "minimal")


def include_usage(fields: dict) -> bool:
    options = fields.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ValueError("stream_options must be an object")
    return bool(options.get("include_usage"))


def head(model: ChatModel, name: str | None) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name or model.info.name}


def usage(stats) -> dict | None:
    """OpenAI's usage object, or None where the upstream of a remote model did not count the prompt."""
    if stats is None or stats.prompt_tokens is None:
        return None
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens or 0},
    }


def create(chat_model: ChatModel, messages, *, model=None, stream=False, space: str, principal: str, **fields):
    """A ``chat.completion`` dict, or with ``stream`` an iterator of ``chat.completion.chunk`` dicts, for a
    caller in ``space``/``principal`` whose ``user`` field names one of its sessions.

    Raises ValueError for bad input before generating.
    """
    session = session_for(space, principal, fields.pop("user", None))
    wants_usage = include_usage(fields)
    request = chat_request(chat_model, messages, fields, session=session, stream=bool(stream))
    chat = chat_model.stream(request)
    if stream:
        return chunk_events(chat, head(chat_model, model), wants_usage)
    return completion(chat, head(chat_model, model))


def completion(chat: ChatStream, head: dict) -> dict:
    """Reads the whole reply into a ``chat.completion`` dict."""
    text, reasoning, last = [], [], None
    with chat:
        for chunk in chat:
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


def chunk_events(chat: ChatStream, head: dict, include_usage: bool) -> Iterator[dict]:
    """``chat.completion.chunk`` dicts as the reply streams; closing the iterator closes ``chat``."""

    def event(delta: dict, finish_reason=None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    with chat:
        yield event({"role": "assistant", "content": ""})
        for chunk in chat:
            delta = {}
            if chunk.reasoning:
                delta["reasoning_content"] = chunk.reasoning
            if chunk.text:
                delta["content"] = chunk.text
            if delta:
                yield event(delta)
            if chunk.finish_reason is not None:
                yield event({}, chunk.finish_reason)
                counted = usage(chunk.stats)
                if include_usage and counted is not None:
                    yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": counted}
