"""The remote backend: a model served by another OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama,
or this project), behind the same ChatModel interface.

Source syntax: ``openai:<base-url>#<model-name>``, e.g. ``openai:http://gpu-box:8000/v1#Qwen/Qwen3-8B``.
The upstream keeps its own caches and defaults: fields a request leaves unset are not sent, and the
upstream's own usage figures are reported. A session is passed on as an opaque ``user`` so engines with
prefix caching can use it, without its name or its caller's identity.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
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
# What a broken or hostile upstream can make this process hold: a whole reply, one line of a stream, an error body.
MAX_REPLY_BYTES = 64 * 2**20
MAX_LINE_BYTES = 8 * 2**20
MAX_ERROR_BYTES = 64 * 2**10
MAX_ERROR_CHARS = 500
# How long an upstream may keep a stream alive with comments only (queued, or thinking unseen behind a proxy).
KEEP_ALIVE_LIMIT = 600.0
# A stream that sends far more events than the tokens asked for ignored the limit: it is ended there. Engines send
# a token or more per event; a proxy may cut a token into a few.
EVENTS_PER_TOKEN = 4
EXTRA_EVENTS = 16
# The session travels upstream as an HMAC under a key of this process: the upstream's logs cannot be searched
# for guessable session names.
_SESSION_KEY = secrets.token_bytes(32)
log = logging.getLogger(__name__)


class RemoteError(BackendError):
    """The upstream server failed, timed out or refused; the message is meant for the person chatting."""


def parse_target(target: str | None) -> tuple[str, str]:
    """``<base-url>#<model>`` -> (base url without a user or password, model name); ValueError when malformed."""
    base, name, _, _ = _parts(target)
    return base, name


def _parts(target: str | None) -> tuple[str, str, httpx.BasicAuth | None, str | None]:
    """The base url, the model name, the HTTP Basic credentials the url carried (``http://user:pass@host``), and
    the name of the environment variable holding its API key (``https://$GROQ_API_KEY@host``: a user that is a
    ``$`` and a variable's name, no password). Credentials are sent and never shown: the url is shown in the
    model list, its info and its errors."""
    base, sep, name = (target or "").partition("#")
    if not sep or not name or not base.startswith(("http://", "https://")):
        shown = (target or "").partition("#")[2] or "a malformed address"
        raise ValueError(f"a remote model is written openai:<http(s) base url>#<model name>, not {shown!r}")
    try:
        url = httpx.URL(base)
    except (httpx.InvalidURL, ValueError) as e:
        raise ValueError(f"the remote model {name!r} has a malformed base url") from e
    auth, key_name = None, None
    if url.username.startswith("$") and not url.password:
        key_name = url.username[1:]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_name):
            raise ValueError(f"the remote model {name!r} names its key's variable as ${key_name}, not a variable name")
    elif url.username or url.password:
        auth = httpx.BasicAuth(url.username, url.password)
    return str(url.copy_with(username=None, password=None)).rstrip("/"), name, auth, key_name


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
    """Streams from an OpenAI-compatible ``/chat/completions``; its API key from the variable its url names
    (``https://$NAME@host/v1``), else from $OPENAI_API_KEY if set."""

    # Thinking is passed on as chat_template_kwargs.enable_thinking: servers of thinking models (vLLM, SGLang,
    # llama.cpp) honour it, others ignore it, so the page offers the toggle. Images are passed on as data: URLs;
    # an upstream whose model reads text only answers with its own error.
    capabilities = Capabilities(thinking=True, images=True)

    def __init__(self, target: str, *, timeout: float = 60.0, api_key: str | None = None, check: bool = True):
        if target.startswith(PREFIX):
            target = target[len(PREFIX) :]
        self.base_url, self.model_name, self._auth, key_name = _parts(target)
        self.timeout = timeout
        if api_key is None and key_name is not None:  # this upstream's own key, not the one for every upstream
            api_key = os.environ.get(key_name)
            if not api_key:
                raise ModelLoadError(f"the API key for {self.model_name!r} is read from ${key_name}, which is not set")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.info = ModelInfo(
            name=self.model_name,
            family=None,
            backend="openai",
            source=f"{PREFIX}{self.base_url}#{self.model_name}",
            device=self.base_url,
            quantization="upstream",
        )
        if check:
            self._check()

    def _check(self) -> None:
        try:
            response = httpx.get(
                f"{self.base_url}/models", headers=self._headers, auth=self._auth, timeout=self.timeout
            )
        except httpx.HTTPError as e:
            raise ModelLoadError(f"cannot reach {self.base_url}: {e}") from e
        if response.status_code != 200:
            raise ModelLoadError(f"{self.base_url}/models answered {response.status_code}{_error_text(response)}")
        try:
            listed = response.json().get("data", [])
            ids = [m.get("id") for m in listed]
        except (ValueError, AttributeError, TypeError) as e:
            raise ModelLoadError(f"{self.base_url}/models did not answer with an OpenAI model list") from e
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
            "min_p": sampling.min_p,
            "repetition_penalty": sampling.repetition_penalty,
            "presence_penalty": sampling.presence_penalty,
            "frequency_penalty": sampling.frequency_penalty,
            # JSON object keys are strings; OpenAI's own schema takes whole numbers as biases.
            "logit_bias": {str(t): int(b) if b.is_integer() else b for t, b in sampling.logit_bias} or None,
            # llama.cpp's fields (its server and koboldcpp read them; text-generation-webui takes the breakers as one
            # string and refuses a list); only when set.
            "dry_multiplier": sampling.dry_multiplier,
            "dry_base": sampling.dry_base,
            "dry_allowed_length": sampling.dry_allowed_length,
            "dry_penalty_last_n": sampling.dry_penalty_last_n,
            "xtc_probability": sampling.xtc_probability,
            "xtc_threshold": sampling.xtc_threshold,
            "dry_sequence_breakers": None
            if sampling.dry_sequence_breakers is None
            else list(sampling.dry_sequence_breakers),
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
        if request.continue_final:  # vLLM's and SGLang's fields; a server without them refuses the request
            body.update(continue_final_message=True, add_generation_prompt=False)
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
        self._auth = model._auth
        asked = body.get("max_tokens")
        self._max_events = asked * EVENTS_PER_TOKEN + EXTRA_EVENTS if asked else None
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
        return self._client.stream("POST", url, json=body, headers=headers, auth=self._auth)

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
            reply = json.loads(_read(response, MAX_REPLY_BYTES, self.base_url))
        if reply is None:  # closed while waiting
            yield Chunk(finish_reason="cancelled", stats=_stats(None, 0, started, None, None, time.perf_counter()))
            return
        yield self._reply_chunk(reply, started)

    def _reply_chunk(self, reply, started: float) -> Chunk:
        """A whole reply (``choices[0].message`` or ``.text``) as one chunk; RemoteError for an error or a reply
        of another shape."""
        _raise_for_error(self.base_url, _object(reply, self.base_url))
        choices = _field(reply, "choices", list, self.base_url) or [{}]
        choice = _object(choices[0], self.base_url)
        message = _field(choice, "message", dict, self.base_url) or {}
        text = _text(message, "content", self.base_url) or _text(choice, "text", self.base_url)
        calls = _field(message, "tool_calls", list, self.base_url) or []
        text += "".join(_call_text(_object(c, self.base_url)) for c in calls)
        reasoning = _text(message, "reasoning_content", self.base_url) or _text(message, "reasoning", self.base_url)
        end = time.perf_counter()
        return Chunk(
            text=text,
            reasoning=reasoning,
            finish_reason=_text(choice, "finish_reason", self.base_url) or "stop",
            stats=_stats(_field(reply, "usage", dict, self.base_url), 0, started, end, end, end),
            logprobs=_logprobs(choice.get("logprobs")),
        )

    def streamed(self) -> Iterator[Chunk]:
        started = time.perf_counter()
        first = last = None
        finish, usage, deltas, pieces = None, None, 0, 0  # pieces: text, reasoning and tool-call pieces
        calls: dict[int, dict] = {}  # tool calls arrive in pieces: name first, arguments in fragments
        with closing(self._client), self._errors(), self._open() as response:
            self._answered(response)
            heard = time.monotonic()  # comments and empty lines (keep-alives) do not count as an answer
            lines = _lines(response, self.base_url)
            while True:
                try:
                    line = next(lines, None)
                except httpx.TimeoutException:
                    if finish is None:
                        raise
                    break  # finished, but neither [DONE] nor the end of the connection came: the reply is whole
                if line is None or self._cancel.is_set():
                    break
                if line.startswith("{") and not first and finish is None:  # a whole reply: it did not stream
                    parts, size = [line], len(line)
                    for more in lines:
                        parts.append(more)
                        size += len(more) + 1
                        if size > MAX_REPLY_BYTES:
                            raise RemoteError(f"{self.base_url} sent a reply larger than {MAX_REPLY_BYTES >> 20} MiB")
                    yield self._reply_chunk(json.loads("\n".join(parts)), started)
                    return
                if not line.startswith("data:"):
                    if time.monotonic() - heard > max(self.timeout, KEEP_ALIVE_LIMIT):
                        if finish is not None:
                            break
                        raise httpx.ReadTimeout("only keep-alives")
                    continue
                heard = time.monotonic()
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = _object(json.loads(data), self.base_url)
                _raise_for_error(self.base_url, event)
                usage = _field(event, "usage", dict, self.base_url) or usage
                for choice in _field(event, "choices", list, self.base_url) or []:
                    choice = _object(choice, self.base_url)
                    delta = _field(choice, "delta", dict, self.base_url) or {}
                    text = _text(delta, "content", self.base_url) or _text(choice, "text", self.base_url)
                    reasoning = _text(delta, "reasoning_content", self.base_url) or _text(
                        delta, "reasoning", self.base_url
                    )
                    for piece in _field(delta, "tool_calls", list, self.base_url) or []:
                        _add_call_piece(calls, _object(piece, self.base_url), self.base_url)
                        pieces += 1
                    finish = _text(choice, "finish_reason", self.base_url) or finish
                    if text or reasoning:
                        last = time.perf_counter()
                        first = first or last
                        deltas += 1
                        pieces += 1
                        yield Chunk(text=text, reasoning=reasoning, logprobs=_logprobs(choice.get("logprobs")))
                if self._max_events is not None and pieces >= self._max_events and finish is None:
                    finish = "length"  # the upstream went past the tokens asked for
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
        raise RemoteError(f"{base_url} answered {response.status_code}{_error_text(response)}")


def _error_text(response) -> str:
    """ ": <the upstream's error message>" where it sent one in OpenAI's shape (cut short), else nothing: a page
    or a traceback it sent instead may hold its internals, so that goes to this server's log only."""
    if response.is_stream_consumed:  # read whole already (a plain request)
        raw = response.content[:MAX_ERROR_BYTES]
    else:
        raw = bytearray()
        for piece in response.iter_bytes():
            raw += piece
            if len(raw) > MAX_ERROR_BYTES:
                break
        raw = bytes(raw[:MAX_ERROR_BYTES])
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    if not isinstance(message, str):
        log.warning("upstream error %s: %r", response.status_code, raw[:MAX_ERROR_CHARS])
        return ""
    return ": " + _shortened(message)


def _shortened(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"


def _raise_for_error(base_url: str, reply: dict) -> None:
    """An error sent in a reply's body (vLLM, and this project's server, end a failed stream with one)."""
    error = reply.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        shown = _shortened(message) if isinstance(message, str) else "no message"
        raise RemoteError(f"{base_url} failed while answering: {shown}")


def _malformed(base_url: str) -> RemoteError:
    return RemoteError(f"{base_url} sent a reply that is not in OpenAI's shape")


def _object(value, base_url: str) -> dict:
    if not isinstance(value, dict):
        raise _malformed(base_url)
    return value


def _field(value: dict, name: str, kind: type, base_url: str):
    """``value[name]``, None where absent or null; RemoteError where it is not a ``kind``."""
    found = value.get(name)
    if found is not None and not isinstance(found, kind):
        raise _malformed(base_url)
    return found


def _text(value: dict, name: str, base_url: str) -> str:
    return _field(value, name, str, base_url) or ""


def _add_call_piece(calls: dict[int, dict], piece: dict, base_url: str) -> None:
    """A streamed tool call's piece into ``calls``: by its ``index``, or, from servers that send none, a new call
    whenever the piece brings an id other than the last call's."""
    index, given = piece.get("index"), piece.get("id") or None  # "" is no id
    function = _field(piece, "function", dict, base_url) or {}
    if not isinstance(index, int):
        last = max(calls, default=None)
        named = bool(_text(function, "name", base_url)) and last is not None and bool(calls[last]["name"])
        fresh = (given is not None and (last is None or calls[last].get("id") != given)) or (given is None and named)
        index = (0 if last is None else last + 1) if fresh else (0 if last is None else last)
    call = calls.setdefault(index, {"name": "", "arguments": "", "id": given})
    call["name"] += _text(function, "name", base_url)
    call["arguments"] += _text(function, "arguments", base_url)


def _read(response, limit: int, base_url: str) -> bytes:
    body = bytearray()
    for piece in response.iter_bytes():
        body += piece
        if len(body) > limit:
            raise RemoteError(f"{base_url} sent a reply larger than {limit >> 20} MiB")
    return bytes(body)


def _lines(response, base_url: str) -> Iterator[str]:
    """The stream's lines, none longer than MAX_LINE_BYTES (httpx's own would hold a line of any size)."""
    pending = bytearray()
    for piece in response.iter_bytes():
        pending += piece
        while (cut := pending.find(b"\n")) >= 0:
            line = bytes(pending[:cut]).rstrip(b"\r")
            del pending[: cut + 1]
            yield line.decode("utf-8", errors="replace")
        if len(pending) > MAX_LINE_BYTES:
            raise RemoteError(f"{base_url} sent a line longer than {MAX_LINE_BYTES >> 20} MiB")
    if pending:
        yield bytes(pending).decode("utf-8", errors="replace")


def _call_text(call: dict) -> str:
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    name, arguments = function.get("name"), function.get("arguments")
    return tools.call_text(name if isinstance(name, str) else "", arguments if isinstance(arguments, str) else "{}")


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
            raise RemoteError(f"{self.base_url} sent a reply that is not valid JSON") from error
        return False


def _stats(usage: dict | None, deltas: int, started: float, first, last, end: float) -> Stats:
    """The upstream's own figures; where it sent none (some servers omit usage when streaming), the prompt's
    size is unknown (None) and the completion is counted in deltas. Its ``cached_tokens`` is not passed on: an
    upstream's prefix cache is shared by everyone who uses it (vLLM's and SGLang's are), so the count would tell
    one person what another person's prompts begin with."""
    usage = usage or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", deltas)
    return Stats.timed(
        prompt_tokens=prompt if isinstance(prompt, int) else None,
        cached_tokens=None,
        completion_tokens=completion if isinstance(completion, int) else deltas,
        started=started,
        first=first,
        last=last,
        end=end,
    )


def _opaque(session: SessionKey) -> str:
    return hmac.new(_SESSION_KEY, repr(session).encode(), "sha256").hexdigest()[:24]
