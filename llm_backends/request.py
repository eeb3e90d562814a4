"""ChatRequest: one reply's whole request, built and validated in exactly one place, defaults filled in there.

Every door (the page, /v1, ``create()``, ``stream_chat``, the seed surface) builds its request with
``build_request`` and hands it on whole; nothing downstream re-decides a default. Unset sampling fields take
the model family's recommended values; where the family is unknown (a remote model) they stay unset, and the
upstream server applies its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .families.base import Family

DEFAULT_MAX_NEW_TOKENS = 512
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
SPACES = ("page", "api", "python", "seed")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k`` None disables it. A field that is None
    in a request to a remote model is left to the upstream server."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class SessionKey:
    """Names one session's cache. ``space`` is the door the request came through and ``principal`` who is
    behind it (a login, an API key's fingerprint, or "" for the one local user). Each door builds keys only in
    its own space, so no request field can name another door's or another person's cache."""

    space: str
    principal: str
    name: str

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"session space must be one of {', '.join(SPACES)}, not {self.space!r}")
        for field_name in ("principal", "name"):
            if not isinstance(getattr(self, field_name), str):
                raise ValueError(f"session {field_name} must be a string")


@dataclass(frozen=True)
class ChatRequest:
    """Everything one reply needs. Built only by ``build_request``.

    ``thinking`` is None only where the model's family is unknown (the upstream decides). With
    ``fit_context`` the oldest turns are dropped until the conversation fits; without it a conversation that
    does not fit is refused. ``stream`` says whether the caller reads the reply as it comes (a remote backend
    asks its upstream for the whole reply otherwise, which also returns the upstream's exact usage).
    ``response_format``, ``tools`` and ``logprobs`` are carried for the backends that will honour them; until
    then a request that sets them is refused rather than silently answered without them.
    """

    messages: tuple[dict, ...]
    sampling: SamplingParams
    session: SessionKey | None = None
    stop: tuple[str, ...] = ()
    thinking: bool | None = None
    fit_context: bool = False
    stream: bool = True
    response_format: dict | None = None
    tools: tuple[dict, ...] | None = None
    logprobs: int | None = None


def build_request(
    messages,
    *,
    family: Family | None,
    context_length: int | None,
    session: SessionKey | None = None,
    max_new_tokens=None,
    temperature=None,
    top_p=None,
    top_k=None,
    repetition_penalty=None,
    seed=None,
    thinking=None,
    stop=None,
    fit_context: bool = False,
    stream: bool = True,
    response_format=None,
    tools=None,
    logprobs=None,
) -> ChatRequest:
    """The validated request; raises ValueError naming the first bad field, before anything is touched.

    None means "unset" for every field: ``family``'s recommended sampling (for the resolved thinking mode)
    fills it, and ``max_new_tokens`` defaults to DEFAULT_MAX_NEW_TOKENS. ``top_k=0`` switches top-k off.
    """
    if session is not None and not isinstance(session, SessionKey):
        raise ValueError(f"session must be a SessionKey, not {type(session).__name__}")
    clean = check_messages(messages)
    thinking = _flag("enable_thinking", thinking)
    if family is not None:
        thinking = family.can_think and thinking is not False
    defaults = family.sampling_defaults(thinking=bool(thinking)) if family is not None else None

    def default(value, name):
        return getattr(defaults, name) if value is None and defaults is not None else value

    limit = context_length or 10**7
    sampling = SamplingParams(
        max_new_tokens=_integer(
            "max_new_tokens", DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens, 1, limit
        ),
        temperature=_optional(_number, "temperature", default(temperature, "temperature"), 0.0, 5.0),
        top_p=_optional(_number, "top_p", default(top_p, "top_p"), 0.0, 1.0, low_open=True),
        top_k=_optional(_integer, "top_k", default(top_k, "top_k"), 0, 1_000_000) or None,
        repetition_penalty=_optional(
            _number, "repetition_penalty", default(repetition_penalty, "repetition_penalty"), 0.0, 10.0, low_open=True
        ),
        seed=_optional(_integer, "seed", seed, 0, 2**63 - 1),
    )
    if response_format is not None and response_format != {"type": "text"}:
        raise ValueError("response_format other than {'type': 'text'} is not supported yet")
    if tools:
        raise ValueError("tools (function calling) are not supported yet")
    if logprobs is not None and logprobs is not False:
        raise ValueError("logprobs are not supported yet")
    return ChatRequest(
        messages=clean,
        sampling=sampling,
        session=session,
        stop=check_stop(stop),
        thinking=thinking,
        fit_context=_flag("fit_context", fit_context) or False,
        stream=_flag("stream", stream) is not False,
    )


def check_messages(messages) -> tuple[dict, ...]:
    """The messages reduced to role and content; raises ValueError on any malformed one."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ValueError("messages is empty: send at least one user message")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, not {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; only the first message may be one")
        if role == "user" and not content.strip():
            raise ValueError(f"messages[{i}] is an empty user message")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "user":
        raise ValueError(f"the last message must be from the user, not {clean[-1]['role']!r}")
    return tuple(clean)


def check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    return tuple(s for s in stop if s)


def _number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value}")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], not {value}")
    return float(value)


def _integer(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _optional(check, name: str, value, *bounds, **options):
    return None if value is None else check(name, value, *bounds, **options)


def _flag(name: str, value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be true, false or None, not {value!r}")
    return value
