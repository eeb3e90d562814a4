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
import threading
import time
from collections.abc import Iterator

import httpx

from .backend import Capabilities, ChatModel, ChatStream, ModelInfo
from .chunks import Chunk, Stats
from .errors import BackendError, ModelLoadError
from .request import ChatRequest, SessionKey

PREFIX = "openai:"


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


def load(target: str | None, options) -> RemoteChatModel:
    """Connects to the upstream and checks that it serves the model; the load options do not apply."""
    return RemoteChatModel(target)


class RemoteChatModel(ChatModel):
    """Streams from an OpenAI-compatible ``/chat/completions``; API key from $OPENAI_API_KEY if set."""

    # Thinking is passed on as chat_template_kwargs.enable_thinking: servers of thinking models (vLLM, SGLang,
    # llama.cpp) honour it, others ignore it, so the page offers the toggle.
    capabilities = Capabilities(thinking=True)

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
        """The upstream request: what the caller set, nothing the upstream should default itself."""
        sampling = request.sampling
        fields = {
            "model": self.model_name,
            "messages": list(request.messages),
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "repetition_penalty": sampling.repetition_penalty,
            "seed": sampling.seed,
            "stop": list(request.stop) or None,
            "user": None if request.session is None else _opaque(request.session),
        }
        body = {k: v for k, v in fields.items() if v is not None}
        if request.thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": request.thinking}
        if request.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    def stream(self, request: ChatRequest) -> ChatStream:
        """Upstream failures raise RemoteError while iterating."""
        cancel = threading.Event()
        body = self.body(request)
        chunks = self._streamed(body, cancel) if request.stream else self._whole(body)
        return ChatStream(chunks, cancel)

    def _post(self, body: dict):
        return httpx.stream(
            "POST", f"{self.base_url}/chat/completions", json=body, headers=self._headers, timeout=self.timeout
        )

    def _whole(self, body: dict) -> Iterator[Chunk]:
        started = time.perf_counter()
        with self._errors(), self._post(body) as response:
            self._raise_for_status(response)
            reply = json.loads(response.read())
        choice = (reply.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        end = time.perf_counter()
        yield Chunk(
            text=message.get("content") or "",
            reasoning=message.get("reasoning_content") or message.get("reasoning") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            stats=_stats(reply.get("usage"), 0, started, end, end, end),
        )

    def _streamed(self, body: dict, cancel: threading.Event) -> Iterator[Chunk]:
        started = time.perf_counter()
        first = last = None
        finish, usage, deltas = None, None, 0
        with self._errors(), self._post(body) as response:
            self._raise_for_status(response)
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
                    text = delta.get("content") or ""
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    finish = choice.get("finish_reason") or finish
                    if text or reasoning:
                        last = time.perf_counter()
                        first = first or last
                        deltas += 1
                        yield Chunk(text=text, reasoning=reasoning)
                if cancel.is_set():
                    finish = "cancelled"
                    break
        stats = _stats(usage, deltas, started, first, last, time.perf_counter())
        yield Chunk(finish_reason=finish or "stop", stats=stats)

    def _raise_for_status(self, response) -> None:
        if response.status_code != 200:
            raise RemoteError(f"{self.base_url} answered {response.status_code}: {_error_message(response.read())}")

    def _errors(self):
        return _HTTPErrors(self.base_url, self.timeout)

    def cache_info(self) -> dict:
        return {"sessions": 0, "bytes": 0, "budget_bytes": 0, "max_sessions": 0, "evictions": 0, "in_use": 0}

    def clear_sessions(self, session: SessionKey | None = None) -> None:
        """The upstream owns its caches; nothing is held here."""


class _HTTPErrors:
    """Turns httpx failures into RemoteError messages a person can act on."""

    def __init__(self, base_url: str, timeout: float):
        self.base_url, self.timeout = base_url, timeout

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
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
