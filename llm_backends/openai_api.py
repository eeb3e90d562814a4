"""OpenAI shapes, shared by ``ChatModel.create()`` / ``create_completion()`` and the HTTP routes: a request
body onto a ChatRequest (every field either honoured or refused by name), and a ChatStream into
``chat.completion`` / ``chat.completion.chunk`` or ``text_completion`` dicts, tool calls and logprobs included.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from . import tools as tool_calls
from .backend import ChatModel, ChatStream, choice_count
from .chunks import Chunk, Stats
from .request import ChatRequest, SessionKey, build_request

# Accepted for compatibility; only their neutral values are supported (``best_of`` also at ``n``: every reply
# generated is returned).
COMPLETION_NEUTRAL = {"echo": False, "suffix": None}
# Fields OpenAI documents as hints or bookkeeping: accepted, and nothing to honour (``user`` names a session).
HINTS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
SAMPLING = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "xtc_probability",
    "xtc_threshold",
    "seed",
    "stop",
    "max_tokens",
    "stream_options",
    "n",
}
CHAT_FIELDS = SAMPLING | {
    "messages",
    "model",
    "stream",
    "max_completion_tokens",
    "enable_thinking",
    "thinking_budget",
    "chat_template_kwargs",
    "reasoning_effort",
    "response_format",
    "tools",
    "tool_choice",
    "logprobs",
    "top_logprobs",
    "continue_final_message",
    "add_generation_prompt",
}
COMPLETION_FIELDS = SAMPLING | {"prompt", "model", "stream", "logprobs", "best_of"}


@dataclass(frozen=True)
class Call:
    """An accepted request: its stream, and how its events are shaped."""

    stream: ChatStream
    head: dict
    include_usage: bool
    parse_tools: bool = False
    one_call: bool = False  # parallel_tool_calls: false keeps the first call only
    n: int = 1  # replies, each chunk naming its own (Chunk.index)


def session_for(space: str, principal: str, user) -> SessionKey | None:
    """The session ``user`` names within one caller's space; ValueError unless it is a string."""
    if user is None or user == "":
        return None
    if not isinstance(user, str):
        raise ValueError("user must be a string")
    return SessionKey(space, principal, user)


def wants_stream(body: dict) -> bool:
    value = body.get("stream", False)
    if value is not None and not isinstance(value, bool):
        raise ValueError("stream must be true or false")
    return bool(value)


def _check_fields(body: dict, known: set[str], neutral: dict) -> None:
    for name, value in neutral.items():
        if body.get(name, value) not in (value, None):
            raise ValueError(f"{name} other than {value!r} is not supported")
    unknown = set(body) - known - HINTS - set(neutral)
    if unknown:
        raise ValueError(f"unsupported field(s): {', '.join(sorted(unknown))}")


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ValueError("stream_options must be an object")
    if not wants_stream(body):
        raise ValueError("stream_options is only allowed with stream: true")
    return bool(options.get("include_usage"))


def _sampling(body: dict, max_tokens) -> dict:
    return {
        "max_new_tokens": max_tokens,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),
        "min_p": body.get("min_p"),
        "repetition_penalty": body.get("repetition_penalty"),
        "presence_penalty": body.get("presence_penalty"),
        "frequency_penalty": body.get("frequency_penalty"),
        "logit_bias": body.get("logit_bias"),
        "dry_multiplier": body.get("dry_multiplier"),
        "dry_base": body.get("dry_base"),
        "dry_allowed_length": body.get("dry_allowed_length"),
        "dry_penalty_last_n": body.get("dry_penalty_last_n"),
        "dry_sequence_breakers": body.get("dry_sequence_breakers"),
        "xtc_probability": body.get("xtc_probability"),
        "xtc_threshold": body.get("xtc_threshold"),
        "seed": body.get("seed"),
        "stop": body.get("stop"),
    }


def _thinking(body: dict) -> bool | None:
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise ValueError("chat_template_kwargs must be an object")
    if "enable_thinking" in template_kwargs:
        return template_kwargs["enable_thinking"]
    if body.get("enable_thinking") is not None:
        return body["enable_thinking"]
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise ValueError(f"reasoning_effort must be none, minimal, low, medium or high, not {effort!r}")
    return effort not in ("none", "minimal")


def _head(model: ChatModel, name: str | None, prefix: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": name or model.info.name}


def open_chat(
    model: ChatModel,
    body: dict,
    *,
    session: SessionKey | None,
    model_name: str | None = None,
    fetch_image_urls: bool = False,
    owner: tuple[str, str] | None = None,
) -> Call:
    """Validates a chat request body and starts its reply; ValueError naming the first bad field. Images come
    as OpenAI ``image_url`` parts (data: URLs; http(s) URLs only with ``fetch_image_urls``); ``owner``: the
    caller (space, principal), also where the body names no session."""
    request = chat_request(model, body, session=session, fetch_image_urls=fetch_image_urls, owner=owner)
    include_usage = _include_usage(body)
    n = choice_count(body.get("n"))
    chat = model.stream_choices(request, n)
    parse = bool(request.tools) and request.tool_choice != "none"
    one_call = body.get("parallel_tool_calls") is False
    return Call(chat, _head(model, model_name, "chatcmpl"), include_usage, parse, one_call, n)


def chat_request(
    model,
    body: dict,
    *,
    session: SessionKey | None = None,
    fetch_image_urls: bool = False,
    owner: tuple[str, str] | None = None,
):
    """A chat request body as ``model``'s ChatRequest (ValueError naming the first bad field); nothing starts."""
    _check_fields(body, CHAT_FIELDS, {})
    choice_count(body.get("n"))
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ValueError("logprobs must be true or false (top_logprobs says how many alternatives)")
    if body.get("top_logprobs") is not None and not logprobs:
        raise ValueError("top_logprobs needs logprobs: true")
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise ValueError("parallel_tool_calls must be true or false")
    template_kwargs = body.get("chat_template_kwargs") or {}
    if isinstance(template_kwargs, dict) and set(template_kwargs) - {"enable_thinking"}:
        unknown = ", ".join(sorted(set(template_kwargs) - {"enable_thinking"}))
        raise ValueError(f"chat_template_kwargs supports enable_thinking only, not {unknown}")
    continuing = body.get("continue_final_message")
    if body.get("add_generation_prompt") not in (None, not continuing):
        # vLLM's pair: a new assistant turn is opened, or the last answer continued; never both, never neither.
        raise ValueError("add_generation_prompt must be the opposite of continue_final_message (or left out)")
    stream = wants_stream(body)
    request = model.request(
        body.get("messages"),
        continue_final=continuing,
        session=session,
        thinking=_thinking(body),
        thinking_budget=body.get("thinking_budget"),
        stream=stream,
        response_format=body.get("response_format"),
        tools=body.get("tools"),
        tool_choice=body.get("tool_choice"),
        logprobs=(body.get("top_logprobs") or 0) if logprobs else None,
        fetch_image_urls=fetch_image_urls,
        owner=owner,
        **_sampling(body, max_tokens),
    )
    _include_usage(body)
    return request


def open_completion(model: ChatModel, body: dict, *, session: SessionKey | None, model_name: str | None = None) -> Call:
    """Validates a raw completion request body (``prompt``) and starts it; ValueError naming a bad field."""
    request = completion_request(model, body, session=session)
    n = choice_count(body.get("n"))
    return Call(model.stream_choices(request, n), _head(model, model_name, "cmpl"), _include_usage(body), n=n)


def completion_request(model, body: dict, *, session: SessionKey | None = None):
    """A raw completion request body as ``model``'s ChatRequest (ValueError naming a bad field); nothing starts."""
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_NEUTRAL)
    n = choice_count(body.get("n"))
    best_of = body.get("best_of")
    if best_of is not None and (type(best_of) is not int or best_of != n):
        raise ValueError(f"best_of other than n ({n}) is not supported: every reply generated is returned")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string (or a list of one string)")
    logprobs = body.get("logprobs")
    if logprobs is not None and (
        isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20
    ):
        raise ValueError("logprobs must be an integer from 0 to 20: how many alternatives per token")
    request = model.request(
        None,
        prompt=prompt,
        session=session,
        stream=wants_stream(body),
        logprobs=logprobs,
        **_sampling(body, body.get("max_tokens")),
    )
    _include_usage(body)
    return request


# /tokenize takes vLLM's fields (a prompt, or messages with any chat request's fields, of which those that shape
# the prompt count) and llama.cpp's (content, add_special, with_pieces); /detokenize takes tokens.
TOKENIZE_TEXT_FIELDS = {"model", "prompt", "add_special_tokens", "content", "add_special", "with_pieces"}
TOKENIZE_FIELDS = TOKENIZE_TEXT_FIELDS | {"return_token_strs"}
MAX_DETOKENIZE = 2**20  # token ids one /detokenize may name


def tokenized(model, body: dict, *, fetch_image_urls: bool = False, owner: tuple[str, str] | None = None) -> dict:
    """vLLM's and llama.cpp's /tokenize: ``prompt`` (vLLM: with ``add_special_tokens``, default true) or
    ``content`` (llama.cpp: with ``add_special``, default false) as written, or ``messages`` (with any chat
    request's fields) as the model reads them, its chat template included. Returns ``tokens`` (with
    ``with_pieces``, llama.cpp's {"id", "piece"} pairs), ``count``, ``max_model_len`` and, with
    ``return_token_strs``, vLLM's ``token_strs``. ValueError naming a bad field."""
    given = [name for name in ("prompt", "content", "messages") if body.get(name) is not None]
    if len(given) != 1:
        raise ValueError("send one of prompt or content (text as written) or messages (a chat)")
    for flag in ("add_special_tokens", "add_special", "with_pieces", "return_token_strs"):
        if body.get(flag) not in (None, True, False):
            raise ValueError(f"{flag} must be true or false")
    if given == ["messages"]:
        chat = {k: v for k, v in body.items() if k not in TOKENIZE_FIELDS or k == "model"}
        ids = model.prompt_ids(chat_request(model, chat, fetch_image_urls=fetch_image_urls, owner=owner))
    else:
        unknown = set(body) - TOKENIZE_FIELDS
        if unknown:
            raise ValueError(f"unsupported field(s): {', '.join(sorted(unknown))}")
        text = body[given[0]]
        if not isinstance(text, str):
            raise ValueError(f"{given[0]} must be a string")
        special = body.get("add_special_tokens") is not False if given == ["prompt"] else bool(body.get("add_special"))
        ids = model.tokenize(text, special=special)
    tokens = [{"id": i, "piece": model.token_piece(i)} for i in ids] if body.get("with_pieces") else ids
    out = {"tokens": tokens, "count": len(ids), "max_model_len": model.info.context_length}
    if body.get("return_token_strs"):
        out["token_strs"] = [model.detokenize([i]) for i in ids]
    return out


def detokenized(model, body: dict) -> dict:
    """vLLM's and llama.cpp's /detokenize: ``tokens`` (ids below the model's vocabulary size) as text, under
    vLLM's name (``prompt``) and llama.cpp's (``content``); ValueError naming a bad field."""
    unknown = set(body) - {"model", "tokens"}
    if unknown:
        raise ValueError(f"unsupported field(s): {', '.join(sorted(unknown))}")
    ids = body.get("tokens")
    vocab = model.vocab_size
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_DETOKENIZE
        or not all(type(i) is int and 0 <= i and (vocab is None or i < vocab) for i in ids)
    ):
        below = f" below {vocab}" if vocab is not None else ""
        raise ValueError(f"tokens must be a list of at most {MAX_DETOKENIZE} token ids (integers from 0{below})")
    text = model.detokenize(ids)
    return {"prompt": text, "content": text}


@dataclass(frozen=True)
class AnyModel:
    """What a request body is checked against before its model is loaded (switching models frees the current one
    and every session's cache, which bad input must not do): no family, no context limit, images allowed, the
    model's vocabulary size where known beforehand. The model itself checks what depends on it once loaded."""

    vocab_size: int | None = None

    def request(self, messages, **fields) -> ChatRequest:
        return build_request(
            messages, family=None, context_length=None, images=True, vocab_size=self.vocab_size, **fields
        )


def create(chat_model: ChatModel, messages, *, model=None, stream=False, space: str, principal: str, **fields):
    """A ``chat.completion`` dict, or with ``stream`` an iterator of ``chat.completion.chunk`` dicts, for a
    caller in ``space``/``principal`` whose ``user`` field names one of its sessions.

    Raises ValueError for bad input before generating.
    """
    session = session_for(space, principal, fields.get("user"))
    body = {**fields, "messages": messages, "stream": stream}
    call = open_chat(chat_model, body, session=session, model_name=model, owner=(space, principal))
    return chat_events(call) if stream else chat_completion(call)


def create_completion(chat_model: ChatModel, prompt, *, model=None, stream=False, space: str, principal: str, **fields):
    """A ``text_completion`` dict, or with ``stream`` an iterator of them, for a raw ``prompt``."""
    session = session_for(space, principal, fields.get("user"))
    call = open_completion(
        chat_model, {**fields, "prompt": prompt, "stream": stream}, session=session, model_name=model
    )
    return text_events(call) if stream else text_completion(call)


def usage(stats: Stats | None, *others: Stats | None) -> dict | None:
    """OpenAI's usage object for a reply's ``stats`` (and its request's ``others`` replies': their answers
    count, their prompt is the same one), or None where the upstream of a remote model did not count the prompt;
    without ``prompt_tokens_details`` where the cache's share is not known."""
    if stats is None or stats.prompt_tokens is None:
        return None
    completion = stats.completion_tokens + sum(o.completion_tokens for o in others if o is not None)
    counted = {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": stats.prompt_tokens + completion,
    }
    if stats.cached_tokens is not None:  # a remote model's upstream count is not passed on (remote._stats)
        counted["prompt_tokens_details"] = {"cached_tokens": stats.cached_tokens}
    return counted


def _token_entry(text: str, logprob: float, raw: bytes | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode() if raw is None else raw)}


def chat_logprobs(chunks: list[Chunk]) -> dict | None:
    entries = []
    for t in (t for chunk in chunks for t in chunk.logprobs):
        raws = t.top_raw or (None,) * len(t.top)
        top = [_token_entry(s, lp, raw) for (s, lp), raw in zip(t.top, raws, strict=True)]
        entries.append({**_token_entry(t.text, t.logprob, t.raw), "top_logprobs": top})
    return {"content": entries} if entries else None


def _read(call: Call) -> list[list[Chunk]]:
    """Each reply's chunks, in order of index."""
    replies: list[list[Chunk]] = [[] for _ in range(call.n)]
    with call.stream:
        for chunk in call.stream:
            replies[chunk.index].append(chunk)
    return replies


def _usage_of(replies: list[list[Chunk]]) -> dict | None:
    return usage(*(chunks[-1].stats for chunks in replies))


def chat_completion(call: Call) -> dict:
    """Reads the whole reply (each of the ``n``) into a ``chat.completion`` dict."""
    replies = _read(call)
    return {
        **call.head,
        "object": "chat.completion",
        "choices": [_chat_choice(call, i, c) for i, c in enumerate(replies)],
        "usage": _usage_of(replies),
    }


def _chat_choice(call: Call, index: int, chunks: list[Chunk]) -> dict:
    text = "".join(c.text for c in chunks)
    reasoning = "".join(c.reasoning for c in chunks)
    finish = chunks[-1].finish_reason
    message: dict = {"role": "assistant", "content": text}
    if call.parse_tools:
        rest, calls = tool_calls.parse(text)
        calls = calls[:1] if call.one_call else calls
        if calls:
            message = {"role": "assistant", "content": rest or None, "tool_calls": [c.openai() for c in calls]}
            finish = "tool_calls"
    if reasoning:
        message["reasoning_content"] = reasoning
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": chat_logprobs(chunks)}


def chat_events(call: Call) -> Iterator[dict]:
    """``chat.completion.chunk`` dicts as the reply streams (each event one reply's, ``choices[0].index``
    naming it); closing the iterator closes the stream. Tool calls arrive whole, each in one
    ``delta.tool_calls`` entry, once its block is complete. The usage event, if asked for, comes once every reply
    has ended."""
    head = {**call.head, "object": "chat.completion.chunk"}

    def event(index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        return {**head, "choices": [choice]}

    splitters = [tool_calls.StreamingCalls() if call.parse_tools else None for _ in range(call.n)]
    sent_calls = [0] * call.n
    ended: dict[int, Stats | None] = {}
    with call.stream:
        for index in range(call.n):
            yield event(index, {"role": "assistant", "content": ""})
        for chunk in call.stream:
            index, splitter = chunk.index, splitters[chunk.index]
            text, found = (chunk.text, []) if splitter is None else splitter.push(chunk.text)
            if chunk.finish_reason is not None and splitter is not None:
                text += splitter.flush()
            delta = {}
            if chunk.reasoning:
                delta["reasoning_content"] = chunk.reasoning
            if text:
                delta["content"] = text
            if found and call.one_call:
                found = found[: max(0, 1 - sent_calls[index])]
            if found:
                delta["tool_calls"] = [{"index": sent_calls[index] + i, **c.openai()} for i, c in enumerate(found)]
                sent_calls[index] += len(found)
            if delta or chunk.logprobs:
                yield event(index, delta, logprobs=chat_logprobs([chunk]))
            if chunk.finish_reason is not None:
                yield event(index, {}, "tool_calls" if sent_calls[index] else chunk.finish_reason)
                ended[index] = chunk.stats
                counted = usage(*(ended[i] for i in sorted(ended))) if len(ended) == call.n else None
                if call.include_usage and counted is not None:
                    yield {**head, "choices": [], "usage": counted}


def text_logprobs(chunks: list[Chunk], offset: int = 0) -> dict | None:
    tokens = [t for chunk in chunks for t in chunk.logprobs]
    if not tokens:
        return None
    offsets, position = [], offset
    for t in tokens:
        offsets.append(position)
        position += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def text_completion(call: Call) -> dict:
    """Reads the whole continuation (each of the ``n``) into a ``text_completion`` dict."""
    replies = _read(call)
    choices = [
        {
            "index": index,
            "text": "".join(c.text for c in chunks),
            "logprobs": text_logprobs(chunks),
            "finish_reason": chunks[-1].finish_reason,
        }
        for index, chunks in enumerate(replies)
    ]
    return {**call.head, "object": "text_completion", "choices": choices, "usage": _usage_of(replies)}


def text_events(call: Call) -> Iterator[dict]:
    """``text_completion`` dicts as the continuations stream (``choices[0].index`` naming each one's); each
    one's last carries its finish_reason, and the usage, if asked for, comes once all have ended."""
    head = {**call.head, "object": "text_completion"}
    offsets = [0] * call.n
    ended: dict[int, Stats | None] = {}
    with call.stream:
        for chunk in call.stream:
            index = chunk.index
            if chunk.text or chunk.finish_reason is not None:
                choice = {
                    "index": index,
                    "text": chunk.text,
                    "logprobs": text_logprobs([chunk], offsets[index]),
                    "finish_reason": chunk.finish_reason,
                }
                offsets[index] += len(chunk.text)
                yield {**head, "choices": [choice]}
            if chunk.finish_reason is not None:
                ended[index] = chunk.stats
                counted = usage(*(ended[i] for i in sorted(ended))) if len(ended) == call.n else None
                if call.include_usage and counted is not None:
                    yield {**head, "choices": [], "usage": counted}
