"""The interface every backend implements, and the Python door built only on it.

A backend (transformers and MLX through ``local.LocalModel``, an OpenAI-compatible server through
``remote.RemoteChatModel``) subclasses ``ChatModel`` and provides:

- ``info``: a ``ModelInfo`` (``context_length`` None when unknown) and ``family`` (None when unknown);
- ``capabilities``: what the page and API may offer for it (thinking, images);
- ``stream(request) -> ChatStream``: the reply to a ``ChatRequest``; raises ValueError before any work when
  the request cannot be served (too long, unsupported), BackendError while streaming when generation fails;
  ``stream_choices(request, n)`` gives ``n`` replies as one stream (by default ``n`` streams at once; a local
  model reads the prompt once for all of them);
- ``count_tokens(request)``: the prompt's token count, or None where the backend cannot count;
- ``cache_info()`` and ``clear_sessions(session=None)`` (every session's cache gone, on disk too), and
  ``release()`` where memory only should be let go.

Everything else here (``stream_chat``, ``create``, ``get_model_info``, ``request``) is written once on top of
those. The page and ``/v1`` use nothing else, so a new backend is one file plus one line in ``registry.py``.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass, replace

from .chunks import Chunk
from .families.base import Family
from .request import ChatRequest, SamplingParams, SessionKey, build_request


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is. Figures a backend cannot know (a remote model's size) are None."""

    name: str
    family: str | None
    backend: str
    source: str
    device: str
    quantization: str = "none"
    dtype: str | None = None
    parameters: int | None = None
    memory_footprint_bytes: int | None = None
    context_length: int | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do with a request: reason before answering (a thinking toggle), read images;
    ``base_model``: the checkpoint ships no chat template (a pretrained, not instruction-tuned, model: it
    continues text rather than answering, and is asked in a plain Question:/Answer: transcript)."""

    thinking: bool = False
    images: bool = False
    base_model: bool = False


class ChatStream:
    """An iterator of Chunk objects for one reply; the last chunk carries finish_reason and stats.

    ``prompt_tokens`` (None where the backend cannot count) and ``dropped_turns`` (oldest turns left out to
    fit the context) are known before the first chunk. ``close()`` stops the model before its next token and
    ends the stream; it is safe from any thread, also while another thread waits in ``next()``, and it is the
    one way every door stops a reply. ``cancel()`` stops it too but still delivers a last chunk with
    finish_reason "cancelled" and stats.
    """

    def __init__(
        self,
        chunks: Iterable[Chunk],
        cancel_event: threading.Event,
        *,
        prompt_tokens: int | None = None,
        dropped_turns: int = 0,
        on_close: Callable[[], None] | None = None,
    ):
        # A generator's close() runs its finally blocks (which keep a cache ledger true); wrap anything else.
        self._chunks = chunks if isinstance(chunks, Generator) else (chunk for chunk in chunks)
        self.cancel_event = cancel_event
        self._lock = threading.Lock()
        self._closed = False
        self.prompt_tokens = prompt_tokens
        self.dropped_turns = dropped_turns
        self._on_close = on_close

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> Chunk:
        with self._lock:
            if self._closed:
                raise StopIteration
            return next(self._chunks)

    def cancel(self) -> None:
        self.cancel_event.set()

    def close(self) -> None:
        # The cancel flag makes a next() running in another thread return at its next token (``on_close``
        # ends a wait that is not for a token, such as a network read); the lock then lets this thread close
        # the generator, whose finally keeps the cache ledger true.
        self.cancel_event.set()
        if self._on_close is not None:
            self._on_close()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._chunks.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NO_TOKENIZER = "this model is served by another server: its tokenizer is not here (ask that server)"
MAX_CHOICES = 16  # replies one request may ask for (OpenAI's ``n``): each holds a copy of the prompt's cache
CHOICE_AHEAD = 2  # chunks each of them may run ahead of its reader


def choice_count(n) -> int:
    """``n`` checked: how many replies a request asks for; ValueError unless an integer from 1 to MAX_CHOICES."""
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise ValueError(f"n must be an integer from 1 to {MAX_CHOICES}, not {n!r}")
    return n


def choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s sampling: seeded ``seed + index`` where a seed is set, so choice i is what a lone
    request with that seed gives."""
    return sampling if sampling.seed is None else replace(sampling, seed=(sampling.seed + index) % 2**63)


def choice_request(request: ChatRequest, index: int) -> ChatRequest:
    """The request as choice ``index`` (> 0) of several runs it: in no session (the first choice's is the
    request's), seeded as ``choice_sampling`` says."""
    return replace(request, session=None, sampling=choice_sampling(request.sampling, index))


class _AllOf(threading.Event):
    """A cancel event that also sets each of ``events`` (every reply's): whoever holds it cancels them all."""

    def __init__(self, events: list[threading.Event]):
        super().__init__()
        self._events = events

    def set(self) -> None:
        super().set()
        for event in self._events:
            event.set()


class Choices(ChatStream):
    """A request's ``n`` replies as one stream of chunks, each with its reply's ``index``; each reply's last
    chunk carries its finish_reason and stats. The replies run at once, a thread reading each (so a local model
    decodes them in one batch), each at most ``CHOICE_AHEAD`` chunks ahead of the reader (a reader that stops
    stops the model, as with one reply). Closing it closes them all; a reply that fails ends them all with its
    error; ``cancel()`` cancels each, which still delivers its last chunk."""

    def __init__(self, streams: list[ChatStream]):
        self.streams = streams
        self._closing = threading.Event()
        super().__init__(
            self._merged(),
            _AllOf([s.cancel_event for s in streams]),
            prompt_tokens=streams[0].prompt_tokens,
            dropped_turns=streams[0].dropped_turns,
            on_close=self._close_all,
        )

    def _merged(self) -> Iterator[Chunk]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        rooms = [threading.Semaphore(CHOICE_AHEAD) for _ in self.streams]

        def read(index: int, stream: ChatStream) -> None:
            try:
                for chunk in stream:
                    while not rooms[index].acquire(timeout=0.05):
                        if self._closing.is_set():
                            return
                    events.put((replace(chunk, index=index), None))
            except BaseException as e:  # noqa: BLE001 (handed to the reader, which raises it)
                events.put((None, e))
            finally:
                events.put((None, None))

        running = len(self.streams)
        for i, stream in enumerate(self.streams):
            threading.Thread(target=read, args=(i, stream), name=f"choice-{i}", daemon=True).start()
        try:
            while running:
                chunk, error = events.get()
                if error is not None:
                    raise error
                if chunk is None:
                    running -= 1
                    continue
                yield chunk
                rooms[chunk.index].release()
        finally:
            self._close_all()

    def _close_all(self) -> None:
        self._closing.set()
        self.cancel_event.set()  # every reply stops at its next token before any is waited for
        for stream in self.streams:
            stream.close()


class ChatModel(ABC):
    """A loaded model behind one interface, whatever runs it. Built by ``load_model``."""

    info: ModelInfo
    family: Family | None = None
    capabilities: Capabilities = Capabilities()
    vocab_size: int | None = None  # the token ids a request may name (logit_bias); None where unknown

    @abstractmethod
    def stream(self, request: ChatRequest) -> ChatStream:
        """Streams the reply to ``request``; ValueError before any work if it cannot be served."""

    def stream_choices(self, request: ChatRequest, n: int = 1) -> ChatStream:
        """``n`` replies to ``request`` (``Choices``; the stream itself for one): the first in the request's
        session, the others in none and seeded ``seed + i`` (``choice_request``). ValueError before any work if
        one cannot be served."""
        if choice_count(n) == 1:
            return self.stream(request)
        streams: list[ChatStream] = []
        try:
            for i in range(n):
                streams.append(self.stream(request if i == 0 else choice_request(request, i)))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return Choices(streams)

    @abstractmethod
    def count_tokens(self, request: ChatRequest) -> int | None:
        """The prompt's length in tokens as this model would read it, or None where it cannot tell."""

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """``text``'s token ids as written (``special``: with those the tokenizer adds, such as BOS); ValueError
        where this model's tokenizer is not here (a remote model's is its upstream's)."""
        raise ValueError(NO_TOKENIZER)

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """The token ids the model reads for ``request`` (its chat template rendered; an image as its image
        tokens); ValueError as ``tokenize``."""
        raise ValueError(NO_TOKENIZER)

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids (below ``vocab_size``); ValueError as ``tokenize``."""
        raise ValueError(NO_TOKENIZER)

    def token_piece(self, token: int) -> str | list[int]:
        """One token's text, or its bytes where they are part of a character (llama.cpp's ``with_pieces``);
        ValueError as ``tokenize``."""
        raise ValueError(NO_TOKENIZER)

    @abstractmethod
    def cache_info(self) -> dict:
        """Sessions held, their bytes, the byte budget, the session limit, evictions so far, streams running."""

    @abstractmethod
    def clear_sessions(self, session: SessionKey | None = None) -> None:
        """Drops one session's cache, or every session's."""

    def release(self) -> None:
        """Lets go of what the sessions hold in memory (the server switches to another model). Backends without
        a disk tier drop them; one with a disk tier writes them there first, so they resume later."""
        self.clear_sessions()

    def clear_cache(self, session: SessionKey | str | None = None) -> None:
        """Drops one session's cache (a string names a Python caller's own, as ``stream_chat``'s
        ``session_id`` does), or every session's."""
        self.clear_sessions(SessionKey("python", "", session) if isinstance(session, str) else session)

    def request(self, messages, **fields) -> ChatRequest:
        """A ChatRequest for this model: its family's defaults and context length fill what ``fields`` leave
        unset. Raises ValueError naming the first bad field."""
        return build_request(
            messages,
            family=self.family,
            context_length=self.info.context_length,
            images=self.capabilities.images,
            vocab_size=self.vocab_size,
            **fields,
        )

    def stream_chat(
        self,
        messages,
        *,
        session_id=None,
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
        enable_thinking=None,
        thinking_budget=None,
        stop=None,
        continue_final_message=None,
    ) -> ChatStream:
        """Streams the model's reply to ``messages`` (the last one from the user) as Chunk objects; with
        ``continue_final_message`` the last message is an assistant's answer, and the reply is what follows it.

        Unset sampling fields take the family's recommended values. Raises ValueError for bad input before
        any work starts and before the session is touched. With ``session_id`` (a Python caller's own name)
        the session's cache is reused for the longest common token prefix. ``thinking_budget`` caps the
        reasoning in tokens, after which the model is told to answer. The ``dry_*`` and ``xtc_*`` settings are
        llama.cpp's (``sampling.py`` says what they do).
        """
        if session_id is not None and not isinstance(session_id, str):
            raise ValueError(f"session_id must be a string, not {type(session_id).__name__}")
        request = self.request(
            messages,
            session=None if session_id is None else SessionKey("python", "", session_id),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            min_p=min_p,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
            dry_multiplier=dry_multiplier,
            dry_base=dry_base,
            dry_allowed_length=dry_allowed_length,
            dry_penalty_last_n=dry_penalty_last_n,
            dry_sequence_breakers=dry_sequence_breakers,
            xtc_probability=xtc_probability,
            xtc_threshold=xtc_threshold,
            thinking=enable_thinking,
            thinking_budget=thinking_budget,
            stop=stop,
            continue_final=continue_final_message,
        )
        return self.stream(request)

    def create(self, messages, *, model=None, stream=False, **fields):
        """An OpenAI ``chat.completion`` dict, or with ``stream=True`` an iterator of ``chat.completion.chunk``
        dicts. Takes the OpenAI request fields (``temperature``, ``max_tokens``, ``user``, ...); ``user``
        names a session among this Python caller's own. Raises ValueError for bad input before generating."""
        from . import openai_api

        return openai_api.create(self, messages, model=model, stream=stream, space="python", principal="", **fields)

    def create_completion(self, prompt: str, *, model=None, stream=False, **fields):
        """An OpenAI ``text_completion`` dict for a raw ``prompt`` (continued as written, no chat template), or
        with ``stream=True`` an iterator of them. Takes ``max_tokens``, ``stop``, ``logprobs`` (an int), the
        sampling fields and ``user``. Raises ValueError for bad input before generating."""
        from . import openai_api

        return openai_api.create_completion(
            self, prompt, model=model, stream=stream, space="python", principal="", **fields
        )

    def get_model_info(self) -> dict:
        return asdict(self.info)
