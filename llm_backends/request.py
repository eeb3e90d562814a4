"""ChatRequest: one reply's whole request, built and validated in exactly one place, defaults filled in there.

Every door (the page, /v1, ``create()``, ``stream_chat``, the seed surface) builds its request with
``build_request`` and hands it on whole; nothing downstream re-decides a default. Unset sampling fields take
the model family's recommended values; where the family is unknown (a remote model) they stay unset, and the
upstream server applies its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import documents
from . import images as image_parts
from . import tools as tool_calls
from .families.base import Family

DEFAULT_MAX_NEW_TOKENS = 512
ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # per stop string: each is matched against the reply's end at every token
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries; each is added to the logits at every step
# DRY's and XTC's secondary settings where a local model's request leaves them unset (llama.cpp's defaults).
DRY_BASE = 1.75
DRY_ALLOWED_LENGTH = 2
DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")
XTC_THRESHOLD = 0.1
MAX_DRY_BREAKERS = 32
MAX_DRY_ALLOWED_LENGTH = 64  # each step follows every earlier place of the last token back this far and more
MAX_DRY_BREAKER_CHARS = 32
SPACES = ("page", "api", "python", "seed")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (``sampling.Sampler`` says in which order). ``temperature == 0`` is greedy; ``top_k``
    None disables it; ``min_p``, ``presence_penalty``, ``frequency_penalty``, ``dry_multiplier`` and
    ``xtc_probability`` at None or 0 and an empty ``logit_bias`` ((token id, bias) pairs) change nothing.
    ``dry_penalty_last_n`` -1 (or None) means the whole context, 0 switches DRY off. A field that is None in a
    request to a remote model is left to the upstream server."""

    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: tuple[str, ...] | None = None
    xtc_probability: float | None = None
    xtc_threshold: float | None = None


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

    Either ``messages`` (a chat) or ``prompt`` (raw text, continued as it is: ``/v1/completions``). A message's
    content is a string, or (a user message with images) a tuple of strings and ``images.Image`` in order.
    ``thinking`` is None only where the model's family is unknown (the upstream decides). With
    ``fit_context`` the oldest turns are dropped until the conversation fits; without it a conversation that
    does not fit is refused. ``stream`` says whether the caller reads the reply as it comes (a remote backend
    asks its upstream for the whole reply otherwise, which also returns the upstream's exact usage).
    ``response_format`` (None, or json_object / json_schema) and a forcing ``tool_choice`` ("required" or a
    function's name) constrain the answer; ``tools`` are offered to the model ("auto") or not ("none").
    ``logprobs`` None: none; N: each answer token's log-probability and its N likeliest alternatives.
    ``thinking_budget``: at most this many tokens of reasoning, after which the model is told to answer (None:
    no limit; always None when the reply does not think).
    ``continue_final``: the last message is the assistant's unfinished answer, continued as written (vLLM's
    ``continue_final_message``): no new turn is opened, and the reply is the text that follows it.
    """

    messages: tuple[dict, ...]
    sampling: SamplingParams
    session: SessionKey | None = None
    stop: tuple[str, ...] = ()
    thinking: bool | None = None
    fit_context: bool = False
    stream: bool = True
    prompt: str | None = None
    response_format: dict | None = None
    tools: tuple[dict, ...] | None = None
    tool_choice: str | None = None
    logprobs: int | None = None
    thinking_budget: int | None = None
    continue_final: bool = False


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
    min_p=None,
    presence_penalty=None,
    frequency_penalty=None,
    logit_bias=None,
    dry_multiplier=None,
    dry_base=None,
    dry_allowed_length=None,
    dry_penalty_last_n=None,
    dry_sequence_breakers=None,
    xtc_probability=None,
    xtc_threshold=None,
    thinking=None,
    stop=None,
    fit_context: bool = False,
    stream: bool = True,
    prompt=None,
    response_format=None,
    tools=None,
    tool_choice=None,
    logprobs=None,
    thinking_budget=None,
    continue_final=None,
    images: bool = False,
    fetch_image_urls: bool = False,
    vocab_size: int | None = None,
    owner: tuple[str, str] | None = None,
) -> ChatRequest:
    """The validated request; raises ValueError naming the first bad field, before anything is touched.

    None means "unset" for every field: ``family``'s recommended sampling (for the resolved thinking mode)
    fills it, and ``max_new_tokens`` defaults to DEFAULT_MAX_NEW_TOKENS. ``top_k=0`` switches top-k off.
    Pass ``messages=None`` and a ``prompt`` string for a raw completion. Image parts are accepted only with
    ``images`` (the model reads them); http(s) image URLs are fetched only with ``fetch_image_urls``.
    ``logit_bias`` names token ids below ``vocab_size`` (where the model's is known). ``owner`` (a door's space
    and the principal behind the request; by default the session's) is whom attached PDFs are kept read for.
    """
    if session is not None and not isinstance(session, SessionKey):
        raise ValueError(f"session must be a SessionKey, not {type(session).__name__}")
    continue_final = _flag("continue_final_message", continue_final) or False
    if continue_final and prompt is not None:
        raise ValueError("continue_final_message needs messages; a raw prompt is always continued as written")
    if continue_final and (
        check_response_format(response_format) is not None or tool_choice not in (None, "auto", "none")
    ):
        raise ValueError("continue_final_message cannot be combined with response_format or a forced tool_choice")
    if prompt is not None:
        if messages is not None:
            raise ValueError("send either messages or a prompt, not both")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        clean = ()
    else:
        if owner is None and session is not None:
            owner = (session.space, session.principal)
        clean = check_messages(messages, fetch_image_urls=fetch_image_urls, continue_final=continue_final, owner=owner)
        if not images and any(not isinstance(m["content"], str) for m in clean):
            raise ValueError(
                "the loaded model reads text only: send text, or load a vision model (Gemma 3 4B and larger)"
            )
    thinking = _flag("enable_thinking", thinking)
    if prompt is not None:
        thinking = False  # raw text is continued as it is: no template, no reasoning split
    if family is not None:
        thinking = family.can_think and thinking is not False
    defaults = family.sampling_defaults(thinking=bool(thinking)) if family is not None else None

    def default(value, name):
        return getattr(defaults, name) if value is None and defaults is not None else value

    def local(value, fallback):  # a setting no family recommends: fixed where the model runs here
        return fallback if value is None and family is not None else value

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
        min_p=_optional(_number, "min_p", min_p, 0.0, 1.0),
        presence_penalty=_optional(_number, "presence_penalty", presence_penalty, -2.0, 2.0),
        frequency_penalty=_optional(_number, "frequency_penalty", frequency_penalty, -2.0, 2.0),
        logit_bias=check_logit_bias(logit_bias, vocab_size),
        dry_multiplier=_optional(_number, "dry_multiplier", dry_multiplier, 0.0, 100.0),
        dry_base=_optional(_number, "dry_base", local(dry_base, DRY_BASE), 1.0, 10.0),
        dry_allowed_length=_optional(
            _integer, "dry_allowed_length", local(dry_allowed_length, DRY_ALLOWED_LENGTH), 1, MAX_DRY_ALLOWED_LENGTH
        ),
        # Past the context it means the whole context, as llama.cpp reads it.
        dry_penalty_last_n=_optional(_integer, "dry_penalty_last_n", local(dry_penalty_last_n, -1), -1, 2**31),
        dry_sequence_breakers=check_breakers(local(dry_sequence_breakers, DRY_SEQUENCE_BREAKERS)),
        xtc_probability=_optional(_number, "xtc_probability", xtc_probability, 0.0, 1.0),
        xtc_threshold=_optional(_number, "xtc_threshold", local(xtc_threshold, XTC_THRESHOLD), 0.0, 1.0),
    )
    budget = _optional(_integer, "thinking_budget", thinking_budget, 1, limit)
    if budget is not None and family is not None and not family.can_think:
        raise ValueError(f"thinking_budget needs a model that thinks; {family.name} models do not")
    checked_tools = tool_calls.check_tools(tools)
    if checked_tools and prompt is not None:
        raise ValueError("tools need messages, not a raw prompt")
    return ChatRequest(
        messages=clean,
        sampling=sampling,
        session=session,
        stop=check_stop(stop),
        thinking=thinking,
        fit_context=_flag("fit_context", fit_context) or False,
        stream=_flag("stream", stream) is not False,
        prompt=prompt,
        response_format=check_response_format(response_format),
        tools=checked_tools,
        tool_choice=tool_calls.check_tool_choice(tool_choice, checked_tools),
        logprobs=_optional(_integer, "top_logprobs", logprobs, 0, MAX_TOP_LOGPROBS),
        thinking_budget=budget if thinking is not False and not continue_final else None,
        continue_final=continue_final,
    )


def check_breakers(breakers) -> tuple[str, ...] | None:
    """DRY's sequence breakers: a non-empty list of non-empty strings (a token holding one, or part of one spread
    over tokens, ends a repeated sequence)."""
    if breakers is None:
        return None
    if isinstance(breakers, str) or not isinstance(breakers, Sequence) or not breakers:
        raise ValueError("dry_sequence_breakers must be a non-empty list of strings")
    if len(breakers) > MAX_DRY_BREAKERS:
        raise ValueError(f"dry_sequence_breakers holds {len(breakers)} strings; at most {MAX_DRY_BREAKERS}")
    for breaker in breakers:
        if not isinstance(breaker, str) or not 1 <= len(breaker) <= MAX_DRY_BREAKER_CHARS:
            raise ValueError(
                f"each of dry_sequence_breakers must be a string of 1 to {MAX_DRY_BREAKER_CHARS} characters, "
                f"not {breaker!r}"
            )
    return tuple(breakers)


def check_logit_bias(logit_bias, vocab_size: int | None = None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` ({token id: bias}; the ids may be strings, as JSON keys are) as sorted (id, bias)
    pairs, zeros left out; ValueError for anything else, or an id at or past ``vocab_size``."""
    if logit_bias is None:
        return ()
    if not isinstance(logit_bias, Mapping):
        raise ValueError("logit_bias must be an object mapping token ids to biases between -100 and 100")
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias holds {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
    pairs = {}
    for key, value in logit_bias.items():
        token = key
        if isinstance(key, str) and re.fullmatch(r"[0-9]{1,10}", key):
            token = int(key)
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), not {key!r}")
        if vocab_size is not None and token >= vocab_size:
            raise ValueError(f"logit_bias names token {token}; this model's ids are below {vocab_size}")
        if token in pairs:
            raise ValueError(f"logit_bias names token {token} twice")
        bias = _number(f"logit_bias[{token}]", value, -100.0, 100.0)
        pairs[token] = bias
    return tuple(sorted((token, bias) for token, bias in pairs.items() if bias))


def check_response_format(response_format) -> dict | None:
    """None for free text; {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format.json_schema must be an object with a 'schema' object")
        return {"type": "json_schema", "json_schema": {"name": spec.get("name"), "schema": spec["schema"]}}
    raise ValueError("response_format.type must be text, json_object or json_schema")


def check_messages(
    messages, *, fetch_image_urls: bool = False, continue_final: bool = False, owner: tuple | None = None
) -> tuple[dict, ...]:
    """The messages reduced to what templates read (role, content; an assistant's tool_calls, a tool result's
    tool_call_id); raises ValueError on any malformed one. The last message is the user's (or a tool's result),
    or with ``continue_final`` an assistant's text answer to continue.

    Content may be OpenAI's list of parts: text parts are joined into one string; a user message's image parts
    (``image_url`` with a data: URL, or ``image`` with a PIL image or encoded bytes; a PIL image alone also
    counts) make its content a tuple of strings and ``images.Image``. At most ``images.MAX_IMAGES`` in all. A
    user message's ``file`` parts (a text file or a PDF, ``documents.read``, kept read for ``owner`` alone) become
    text; at most ``documents.MAX_FILES`` in all.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ValueError("messages is empty: send at least one user message")
    sent = sum(_image_parts(m.get("content")) for m in messages if isinstance(m, Mapping))
    if sent > image_parts.MAX_IMAGES:  # counted before any is read: each may be large once decoded
        raise ValueError(f"the conversation holds {sent} images; at most {image_parts.MAX_IMAGES} are allowed")
    files = sum(_parts_of_kind(m.get("content"), ("file",)) for m in messages if isinstance(m, Mapping))
    if files > documents.MAX_FILES:
        raise ValueError(f"the conversation holds {files} files; at most {documents.MAX_FILES} are allowed")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if isinstance(content, (list, tuple)):
            content = _parts(content, f"messages[{i}].content", role == "user", fetch_image_urls, owner)
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            clean.append({"role": role, "content": content or "", "tool_calls": _check_calls(calls, i)})
            if content is not None and not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string or null, not {type(content).__name__}")
            continue
        if not isinstance(content, (str, tuple)):
            raise ValueError(f"messages[{i}].content must be a string, not {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; only the first message may be one")
        if role == "user" and isinstance(content, str) and not content.strip():
            raise ValueError(f"messages[{i}] is an empty user message")
        entry = {"role": role, "content": content}
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise ValueError(f"messages[{i}] is a tool result without a tool_call_id string")
            entry["tool_call_id"] = message["tool_call_id"]
        clean.append(entry)
    if continue_final:
        last = clean[-1]
        if last["role"] != "assistant" or "tool_calls" in last or not isinstance(last["content"], str):
            raise ValueError("continue_final_message needs the last message to be the assistant's text answer")
        if not any(m["role"] == "user" for m in clean[:-1]):
            raise ValueError("continue_final_message needs a user message before the answer to continue")
    elif clean[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"the last message must be from the user (or a tool's result), not {clean[-1]['role']!r}")
    return tuple(clean)


def _image_parts(content) -> int:
    if not isinstance(content, (list, tuple)):
        return 0
    pictures = sum(isinstance(part, image_parts.PILImage.Image) for part in content)
    return _parts_of_kind(content, ("image_url", "image")) + pictures


def _parts_of_kind(content, kinds: tuple[str, ...]) -> int:
    if not isinstance(content, (list, tuple)):
        return 0
    return sum(isinstance(part, Mapping) and part.get("type") in kinds for part in content)


def _parts(parts, where: str, user: bool, fetch_urls: bool, owner: tuple | None = None) -> str | tuple:
    """A list of content parts as one string (text only) or a tuple of strings and images, in order. A file part
    becomes its text (``documents.read``), set apart from the text around it by a blank line."""
    out: list = []
    document = False  # whether the last text joined was a file's
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("text", "file"):
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{here} is a text part without a text string")
            if kind == "file" and not user:
                raise ValueError(f"{here}: only user messages may hold files")
            text = part["text"] if kind == "text" else documents.read(part.get("file"), here, owner)
            if out and isinstance(out[-1], str):
                before = out[-1]
                ends = len(before) - len(before.rstrip("\n"))  # newlines it ends with: made up to a blank line
                apart = (document or kind == "file") and before and text
                out[-1] += ("\n" * max(0, 2 - ends) if apart else "") + text
            else:
                out.append(text)
            document = kind == "file" or (document and not text)  # an empty part between keeps a file's mark
            continue
        document = False
        if kind in ("image_url", "image") or isinstance(part, image_parts.PILImage.Image):
            if not user:
                raise ValueError(f"{here}: only user messages may hold images")
            if kind == "image_url":
                value = part.get("image_url")
                value = value.get("url") if isinstance(value, Mapping) else value
            else:
                value = part.get("image") if kind == "image" else part
            out.append(image_parts.read(value, here, fetch_urls=fetch_urls))
            continue
        raise ValueError(
            f"{where} must be a string or a list of text, image_url and file parts; {here} is a "
            f"{kind or type(part).__name__!r}"
        )
    if not any(isinstance(part, image_parts.Image) for part in out):
        return "".join(out)
    return tuple(out)


def _check_calls(calls, index: int) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"messages[{index}].tool_calls must be a non-empty list")
    clean = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"messages[{index}].tool_calls: each needs function.name and function.arguments")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise ValueError(f"messages[{index}].tool_calls: function.arguments must be a JSON string")
        clean.append(
            {
                "id": str(call.get("id", "")),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return clean


def check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ValueError(f"stop strings may be at most {MAX_STOP_CHARS} characters long")
    return tuple(s for s in stop if s)


def _number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows any)
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number in [{low}, {high}]")
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
