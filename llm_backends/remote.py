"""The remote backend: a model served by another OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama,
or this project), behind the same ChatModel interface.

Source syntax: ``openai:<base-url>#<model-name>``, e.g. ``openai:http://gpu-box:8000/v1#Qwen/Qwen3-8B``.
The upstream keeps its own caches and defaults: fields a request leaves unset are not sent, and the
upstream's own usage figures are reported. A session is passed on as an opaque ``user`` so engines with
prefix caching can use it, without its name or its caller's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing

import httpx

from . import tools
from .backend import Capabilities, ChatModel, ChatStream, ModelInfo
from .chunks import Chunk, Stats, TokenLogprob
from .errors import BackendError, ModelLoadError
from .request import ChatRequest, SessionKey

PREFIX = "openai:"
WHOLE_REPLY_TIMEOUT = 600.0


class RemoteError(BackendError):
    """The upstream server failed, timed out or refused; the message is meant for the person chatting."""


def parse_target(target: str | None) -> tuple[str, str]:
    """``<base-url>#<model>`` -> (base url, model name); ValueError when malformed."""
    base, sep, name = (target or "").partition("#")
    if not sep or not name or not base.startswith(("http://", "https://")):
        raise ValueError(f"a remote model is written openai:<http(s) base url>#<model name>, not {PREFIX}{target}")
    return base.rstrip("/"), name


def label(target: str | None) -> str:
    base, name = parse_target(target)
    return f"{name} @ {base.split('://', 1)[1].split('/', 1)[0]}"


def openai_message(message: dict) -> dict:
    """A request's message in OpenAI's shape: content with images becomes text and image_url parts."""
    if isinstance(message["content"], str):
        return message
    parts = [
        {"type": "text", "text": part}
        if isinstance(part, str)
        else {"type": "image_url", "image_url": {"url": part.data_url()}}
        for part in message["content"]
    ]
    return {**message, "content": parts}


def load(target: str | None, options) -> RemoteChatModel:
    """Connects to the upstream and checks that it serves the model; the load options do not apply."""
    return RemoteChatModel(target)


class RemoteChatModel(ChatModel):
    """Streams from an OpenAI-compatible ``/chat/completions``; API key from $OPENAI_API_KEY if set."""

    # Thinking is passed on as chat_template_kwargs.enable_thinking: servers of thinking models (vLLM, SGLang,
    # llama.cpp) honour it, others ignore it, so the page offers the toggle. Images are passed on as data: URLs;
    # an upstream whose model reads text only answers with its own error.
    capabilities = Capabilities(thinking=True, images=True)

    def __init__(self, target: str, *, timeout: float = 60.0, api_key: str | None = None, check: bool = True):
        if target.startswith(PREFIX):
            target = target[len(PREFIX) :]
        self.base_url, self.model_name = parse_target(target)
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.info = ModelInfo(
            name=self.model_name,
            family=None,
            backend="openai",
            source=PREFIX + target,
            device=self.base_url,
            quantization="upstream",
        )
        if check:
            self._check()

    def _check(self) -> None:
        try:
            response = httpx.get(f"{self.base_url}/models", headers=self._headers, timeout=self.timeout)
        except httpx.HTTPError as e:
            raise ModelLoadError(f"cannot reach {self.base_url}: {e}") from e
        if response.status_code != 200:
            raise ModelLoadError(f"{self.base_url}/models answered {response.status_code}: {response.text[:200]}")
        ids = [m.get("id") for m in response.json().get("data", [])]
        if ids and self.model_name not in ids:
            raise ModelLoadError(f"{self.base_url} does not serve {self.model_name!r}; it serves {', '.join(ids)}")

    def count_tokens(self, request: ChatRequest) -> None:
        """The upstream counts its own tokens."""
        return None

    def body(self, request: ChatRequest) -> dict:
        """The upstream request: what the caller set, nothing the upstream should default itself. ValueError for
        what OpenAI-compatible servers have no field for (a thinking budget)."""
        if request.thinking_budget is not None:
            raise ValueError("thinking_budget is not supported for a remote model (the upstream has no such field)")
        sampling = request.sampling
        fields = {
            "model": self.model_name,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "repetition_penalty": sampling.repetition_penalty,
            "seed": sampling.seed,
            "stop": list(request.stop) or None,
            "user": None if request.session is None else _opaque(request.session),
        }
        if request.prompt is not None:
            fields.update(prompt=request.prompt, logprobs=request.logprobs)
        else:
            fields.update(
                messages=[openai_message(m) for m in request.messages],
                response_format=request.response_format,
                tools=list(request.tools) if request.tools else None,
                tool_choice=_openai_tool_choice(request.tool_choice),
                logprobs=None if request.logprobs is None else True,
                top_logprobs=request.logprobs or None,
            )
        body = {k: v for k, v in fields.items() if v is not None}
        if request.thinking is not None and request.prompt is None:
            body["chat_template_kwargs"] = {"enable_thinking": request.thinking}
        if request.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    def stream(self, request: ChatRequest) -> ChatStream:
        """Upstream failures raise RemoteError while iterating; closing the stream closes the connection."""
        cancel = threading.Event()
        body = self.body(request)
        path = "/completions" if request.prompt is not None else "/chat/completions"
        connection = _Connection(self, path, body, cancel, whole=not request.stream)
        chunks = connection.streamed() if request.stream else connection.whole()
        return ChatStream(chunks, cancel, on_close=connection.close)

    def cache_info(self) -> dict:
        return {"sessions": 0, "bytes": 0, "budget_bytes": 0, "max_sessions": 0, "evictions": 0, "in_use": 0}

    def clear_sessions(self, session: SessionKey | None = None) -> None:
        """The upstream owns its caches; nothing is held here."""


class _Connection:
    """One upstream request, read whole or as server-sent events. ``close()`` (from any thread) ends it."""

    def __init__(self, model: RemoteChatModel, path: str, body: dict, cancel: threading.Event, *, whole: bool):
        self.base_url, self.timeout = model.base_url, model.timeout
        self._request = (f"{model.base_url}{path}", body, model._headers)
        # A whole reply may take minutes to arrive: its read timeout is generous, and closing still ends it.
        self._timeout = httpx.Timeout(model.timeout)
        if whole:
            self._timeout = httpx.Timeout(model.timeout, read=max(model.timeout, WHOLE_REPLY_TIMEOUT))
        self._cancel = cancel
        self._client = httpx.Client(timeout=self._timeout)
        self._socket = None

    def close(self) -> None:
        """Ends the request from any thread. Once the upstream has answered, shutting the socket down wakes a
        read blocked in another thread at once; before that (a whole reply still being composed) the request
        ends when the upstream answers or times out."""
        self._cancel.set()
        sock = self._socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def _open(self):
        url, body, headers = self._request
        if self._cancel.is_set():
            raise httpx.ReadError("closed before the request was sent")
        return self._client.stream("POST", url, json=body, headers=headers)

    def _answered(self, response) -> None:
        _raise_for_status(self.base_url, response)
        stream = response.extensions.get("network_stream")
        self._socket = stream.get_extra_info("socket") if stream is not None else None
        if self._cancel.is_set():
            self.close()

    def whole(self) -> Iterator[Chunk]:
        started = time.perf_counter()
        reply = None
        with closing(self._client), self._errors(), self._open() as response:
            self._answered(response)
            reply = json.loads(response.read())
        if reply is None:  # closed while waiting
            yield Chunk(finish_reason="cancelled", stats=_stats(None, 0, started, None, None, time.perf_counter()))
            return
        choice = (reply.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text = message.get("content") or choice.get("text") or ""
        text += "".join(_call_text(c) for c in message.get("tool_calls") or [])
        end = time.perf_counter()
        yield Chunk(
            text=text,
            reasoning=message.get("reasoning_content") or message.get("reasoning") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            stats=_stats(reply.get("usage"), 0, started, end, end, end),
            logprobs=_logprobs(choice.get("logprobs")),
        )

    def streamed(self) -> Iterator[Chunk]:
        started = time.perf_counter()
        first = last = None
        finish, usage, deltas = None, None, 0
        calls: dict[int, dict] = {}  # tool calls arrive in pieces: name first, arguments in fragments
        with closing(self._client), self._errors(), self._open() as response:
            self._answered(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or choice.get("text") or ""
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    for piece in delta.get("tool_calls") or []:
                        call = calls.setdefault(piece.get("index", 0), {"name": "", "arguments": ""})
                        function = piece.get("function") or {}
                        call["name"] += function.get("name") or ""
                        call["arguments"] += function.get("arguments") or ""
                    finish = choice.get("finish_reason") or finish
                    if text or reasoning:
                        last = time.perf_counter()
                        first = first or last
                        deltas += 1
                        yield Chunk(text=text, reasoning=reasoning, logprobs=_logprobs(choice.get("logprobs")))
                if self._cancel.is_set():
                    break
        if self._cancel.is_set():
            finish = "cancelled"
        text = "".join(tools.call_text(c["name"], c["arguments"] or "{}") for _, c in sorted(calls.items()))
        stats = _stats(usage, deltas, started, first, last, time.perf_counter())
        yield Chunk(text=text, finish_reason=finish or "stop", stats=stats)

    def _errors(self):
        return _HTTPErrors(self.base_url, self.timeout, self._cancel)


def _raise_for_status(base_url: str, response) -> None:
    if response.status_code != 200:
        raise RemoteError(f"{base_url} answered {response.status_code}: {_error_message(response.read())}")


def _call_text(call: dict) -> str:
    function = call.get("function") or {}
    return tools.call_text(function.get("name", ""), function.get("arguments") or "{}")


def _openai_tool_choice(choice: str | None):
    if choice in (None, "auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _logprobs(data) -> tuple[TokenLogprob, ...]:
    """Upstream logprobs (chat's ``content`` list, or completions' parallel lists) as TokenLogprob entries."""
    if not isinstance(data, dict):
        return ()
    if isinstance(data.get("content"), list):
        return tuple(
            TokenLogprob(
                e.get("token", ""),
                float(e.get("logprob", 0.0)),
                tuple((t.get("token", ""), float(t.get("logprob", 0.0))) for t in e.get("top_logprobs") or []),
            )
            for e in data["content"]
        )
    tokens, values = data.get("tokens") or [], data.get("token_logprobs") or []
    tops = data.get("top_logprobs") or [None] * len(tokens)
    return tuple(
        TokenLogprob(t, float(v or 0.0), tuple((top or {}).items()))
        for t, v, top in zip(tokens, values, tops, strict=False)
    )


class _HTTPErrors:
    """Turns httpx failures into RemoteError messages a person can act on; after a close, the failure that
    closing the connection causes is the expected end, not an error."""

    def __init__(self, base_url: str, timeout: float, cancel: threading.Event):
        self.base_url, self.timeout, self.cancel = base_url, timeout, cancel

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None and self.cancel.is_set() and not isinstance(error, GeneratorExit):
            return True
        if isinstance(error, httpx.TimeoutException):
            raise RemoteError(f"{self.base_url} did not answer within {self.timeout:.0f} s") from error
        if isinstance(error, httpx.HTTPError):
            raise RemoteError(f"cannot reach {self.base_url}: {error}") from error
        if isinstance(error, ValueError):
            raise RemoteError(f"{self.base_url} sent a reply that is not valid JSON: {error}") from error
        return False


def _stats(usage: dict | None, deltas: int, started: float, first, last, end: float) -> Stats:
    """The upstream's own figures; where it sent none (some servers omit usage when streaming), the prompt's
    size is unknown (None) and the completion is counted in deltas."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return Stats.timed(
        prompt_tokens=usage.get("prompt_tokens"),
        cached_tokens=details.get("cached_tokens") or (0 if "prompt_tokens" in usage else None),
        completion_tokens=usage.get("completion_tokens", deltas),
        started=started,
        first=first,
        last=last,
        end=end,
    )


def _opaque(session: SessionKey) -> str:
    return hashlib.sha256(repr(session).encode()).hexdigest()[:24]


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:300].decode(errors="replace")
