"""Checks on what callers send, before anything is touched. Every failure is a ValueError naming the field."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .engine import SamplingParams

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16


def check_messages(messages) -> list[dict]:
    """Returns the messages reduced to role and content; raises ValueError on any malformed one."""
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
    return clean


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


def check_sampling(
    *, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, context_length: int
) -> SamplingParams:
    """Validated sampling parameters; ``top_k`` 0 or None disables top-k."""
    return SamplingParams(
        max_new_tokens=_integer("max_new_tokens", max_new_tokens, 1, context_length),
        temperature=_number("temperature", temperature, 0.0, 5.0),
        top_p=_number("top_p", top_p, 0.0, 1.0, low_open=True),
        top_k=None if top_k is None else (_integer("top_k", top_k, 0, 1_000_000) or None),
        repetition_penalty=None
        if repetition_penalty is None
        else _number("repetition_penalty", repetition_penalty, 0.0, 10.0, low_open=True),
        seed=None if seed is None else _integer("seed", seed, 0, 2**63 - 1),
    )


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


def check_flag(name: str, value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be true, false or None, not {value!r}")
    return value
