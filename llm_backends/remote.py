"""A model served by another OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, or this project).

Source syntax: ``openai:<base-url>#<model-name>``, e.g. ``openai:http://gpu-box:8000/v1#Qwen/Qwen3-8B``.
It offers the same stream_chat / create / get_model_info / cache_info / clear_cache surface as ChatModel;
the upstream keeps its own caches (``user`` is passed on so engines with prefix caching can use it).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import httpx

from .chat_model import ChatStream, ModelInfo, OpenAISurface
from .chunks import Chunk, Stats
from .errors import ModelLoadError
from .families.base import Family, SamplingDefaults
from .validation import check_flag, check_messages, check_sampling, check_stop

PREFIX = "openai:"
REMOTE_FAMILY = Family(
    name="remote",
    model_types=(),
    stop_tokens=(),
    sampling=SamplingDefaults(temperature=0.7, top_p=0.95),
    think_tags=("<think>", "</think>"),
)


class RemoteError(RuntimeError):
    """The upstream server failed, timed out or refused; the message is meant for the person chatting."""


def parse_source(source: str) -> tuple[str, str]:
    """``openai:<base-url>#<model>`` -> (base url, model name); ValueError when malformed."""
    rest = source[len(PREFIX) :]
    base, sep, name = rest.partition("#")
    if not sep or not name or not base.startswith(("http://", "https://")):
        raise ValueError(f"a remote model is written openai:<http(s) base url>#<model name>, not {source!r}")
    return base.rstrip("/"), name


class RemoteChatModel(OpenAISurface):
    """Streams from an OpenAI-compatible ``/chat/completions``; API key from $OPENAI_API_KEY if set."""

    def __init__(self, source: str, *, timeout: float = 60.0, api_key: str | None = None, check: bool = True):
        self.base_url, self.model_name = parse_source(source)
        self.family = REMOTE_FAMILY
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.info = ModelInfo(
            name=self.model_name,
            family="remote",
            backend="openai",
            quantization="remote",
            device=self.base_url,
            dtype="remote",
            parameters=0,
            memory_footprint_bytes=0,
            context_length=0,
            source=source,
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

    def stream_chat(
        self,
        messages,
        *,
        session_id=None,
        max_new_tokens=512,
        temperature=0.7,
        top_p=0.95,
        top_k=None,
        repetition_penalty=None,
        seed=None,
        enable_thinking=None,
        stop=None,
    ) -> ChatStream:
        """Same contract as ChatModel.stream_chat; upstream failures raise RemoteError while iterating."""
        messages = check_messages(messages)
        params = check_sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            context_length=10**7,
        )
        body = {
            "model": self.model_name,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        extras = {
            "top_k": params.top_k,
            "repetition_penalty": params.repetition_penalty,
            "seed": params.seed,
            "stop": list(check_stop(stop)) or None,
            "user": session_id,
        }
        body.update({k: v for k, v in extras.items() if v is not None})
        thinking = check_flag("enable_thinking", enable_thinking)
        if thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": thinking}
        cancel = threading.Event()
        return ChatStream(self._chunks(body, cancel), cancel)

    def _chunks(self, body: dict, cancel: threading.Event) -> Iterator[Chunk]:
        started = time.perf_counter()
        first = last = None
        finish, usage, completion = None, {}, 0
        try:
            with httpx.stream(
                "POST", f"{self.base_url}/chat/completions", json=body, headers=self._headers, timeout=self.timeout
            ) as response:
                if response.status_code != 200:
                    raise RemoteError(
                        f"{self.base_url} answered {response.status_code}: {_error_message(response.read())}"
                    )
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
                            completion += 1
                            yield Chunk(text=text, reasoning=reasoning)
                    if cancel.is_set():
                        finish = "cancelled"
                        break
        except httpx.TimeoutException as e:
            raise RemoteError(f"{self.base_url} did not answer within {self.timeout:.0f} s") from e
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach {self.base_url}: {e}") from e
        stats = Stats.timed(
            prompt_tokens=usage.get("prompt_tokens", 0),
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0,
            completion_tokens=usage.get("completion_tokens", completion),
            started=started,
            first=first,
            last=last,
            end=time.perf_counter(),
        )
        yield Chunk(finish_reason=finish or "stop", stats=stats)

    def cache_info(self) -> dict:
        return {"sessions": 0, "bytes": 0, "budget_bytes": 0, "max_sessions": 0, "evictions": 0, "in_use": 0}

    def clear_cache(self, session_id: str | None = None) -> None:
        """The upstream owns its caches; nothing is held here."""


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:300].decode(errors="replace")
