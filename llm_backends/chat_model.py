"""ChatModel: messages in, a stream of chunks out, with each session's KV cache reused exactly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

from . import openai_api
from .chunks import Chunk, Stats
from .engine import Engine
from .families.base import Family
from .session_cache import SessionStore
from .text_stream import ReplyText
from .validation import check_flag, check_messages, check_sampling, check_stop


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    backend: str
    quantization: str
    device: str
    dtype: str
    parameters: int
    memory_footprint_bytes: int
    context_length: int
    source: str


class ChatStream:
    """An iterator of Chunk objects for one reply.

    ``close()`` (or dropping the iterator) stops the model before its next token and yields nothing more;
    ``cancel()`` stops it too but still delivers a last chunk with finish_reason "cancelled" and stats.
    """

    def __init__(self, chunks: Iterator[Chunk], cancel_event: threading.Event):
        self._chunks = chunks
        self._cancel = cancel_event

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self._chunks.close()


class OpenAISurface:
    """What every chat model offers on top of ``stream_chat``: OpenAI-shaped ``create`` and its info dict."""

    info: ModelInfo

    def create(self, messages, temperature=0.7, max_tokens=512, top_p=1.0, model=None, stream=False, **kwargs):
        """An OpenAI chat.completion dict, or with ``stream=True`` an iterator of chat.completion.chunk dicts."""
        return openai_api.create(
            self,
            messages,
            temperature=temperature,
            max_tokens=max_tokens,
            top_p=top_p,
            model=model,
            stream=stream,
            **kwargs,
        )

    def get_model_info(self) -> dict:
        return asdict(self.info)


class ChatModel(OpenAISurface):
    """A loaded model with its tokenizer, family and per-session caches. Built by ``load_model``."""

    def __init__(
        self,
        model,
        tokenizer,
        family: Family,
        info: ModelInfo,
        *,
        max_cache_bytes: int,
        max_sessions: int = 256,
        make_engine: Callable[[frozenset[int]], Engine] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.info = info
        self.chat_template = tokenizer.chat_template or family.fallback_chat_template
        stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens}
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop_ids |= set(eos if isinstance(eos, list) else [eos])
        stop_ids.add(tokenizer.eos_token_id)
        stop_ids -= {None, tokenizer.unk_token_id}
        self.stop_ids = frozenset(stop_ids)
        self.think_ids = (
            tuple(tokenizer.convert_tokens_to_ids(t) for t in family.think_tags) if family.think_tags else None
        )
        self.engine = make_engine(self.stop_ids) if make_engine else Engine(model, stop_ids=self.stop_ids)
        self.sessions = SessionStore(max_cache_bytes, max_sessions)

    def render(self, messages: list[dict], *, enable_thinking: bool | None = None) -> list[int]:
        """The prompt's token ids: the whole conversation through the chat template, ready for the reply."""
        kwargs = {"enable_thinking": enable_thinking} if self.family.can_think else {}
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True, **kwargs
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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
        """Streams the model's reply to ``messages`` (the last one from the user) as Chunk objects.

        Raises ValueError for bad input before any work starts and before the session is touched.
        With ``session_id`` the session's cache is reused for the longest common token prefix.
        """
        messages = check_messages(messages)
        context = self.info.context_length
        params = check_sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            context_length=context,
        )
        stops = check_stop(stop)
        thinking = check_flag("enable_thinking", enable_thinking)
        thinking = self.family.can_think and thinking is not False
        if session_id is not None and not isinstance(session_id, str):
            raise ValueError(f"session_id must be a string, not {type(session_id).__name__}")
        started = time.perf_counter()
        prompt_ids = self.render(messages, enable_thinking=thinking)
        if len(prompt_ids) >= context:
            raise ValueError(
                f"the conversation is {len(prompt_ids)} tokens, beyond the model's context of {context}: "
                "drop earlier turns"
            )
        params = replace(params, max_new_tokens=min(params.max_new_tokens, context - len(prompt_ids)))
        reply = ReplyText(self.tokenizer, think_ids=self.think_ids, thinking=thinking, stop=stops)
        cancel = threading.Event()
        return ChatStream(self._chunks(cancel, prompt_ids, session_id, params, reply, started), cancel)

    def _chunks(
        self, cancel: threading.Event, prompt_ids, session_id, params, reply: ReplyText, started: float
    ) -> Iterator[Chunk]:
        if session_id is None:
            lease, entry = None, self.engine.new_entry()
        else:
            lease, entry = self.sessions.checkout(session_id, self.engine.new_entry)
        run = self.engine.generate(prompt_ids, entry, params)
        tokens = iter(run)
        first = last = None
        try:
            finish = None
            for token in tokens:
                last = time.perf_counter()
                first = first or last
                if token in self.stop_ids:
                    continue
                text, reasoning = reply.push(token)
                if text or reasoning:
                    yield Chunk(text=text, reasoning=reasoning)
                if reply.stopped:
                    finish = "stop"
                    break
                if cancel.is_set():
                    finish = "cancelled"
                    break
            finish = finish or run.finish_reason
        finally:
            tokens.close()
            if lease is not None:
                self.sessions.checkin(lease, entry)
        text, reasoning = reply.flush()
        stats = Stats.timed(
            prompt_tokens=len(prompt_ids),
            cached_tokens=run.cached_tokens,
            completion_tokens=len(run.completion_ids),
            started=started,
            first=first,
            last=last,
            end=time.perf_counter(),
        )
        yield Chunk(text=text, reasoning=reasoning, finish_reason=finish, stats=stats)

    def cache_info(self) -> dict:
        """Sessions held, their bytes, the byte budget, the session limit, evictions so far, streams running."""
        return self.sessions.info()

    def clear_cache(self, session_id: str | None = None) -> None:
        """Drops one session's cache, or every session's."""
        self.sessions.clear(session_id)
