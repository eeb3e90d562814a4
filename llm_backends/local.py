"""LocalModel: a model run on this machine (transformers or MLX) behind the ChatModel interface.

It owns what both local backends share: the chat template, the context rule, the stop tokens, the text
layer and the per-session caches. Only the runner that feeds tokens into the model differs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

from .backend import Capabilities, ChatModel, ChatStream, ModelInfo
from .chunks import Chunk, Stats
from .engine import Engine, Runner
from .errors import BackendError
from .families.base import Family
from .request import ChatRequest, SessionKey
from .session_cache import SessionStore
from .text_stream import ReplyText

# A prompt fits when it leaves room for min(max_new_tokens, REPLY_ROOM) new tokens; the reply is then
# capped at what is left of the context.
REPLY_ROOM = 1024


class LocalModel(ChatModel):
    """A tokenizer, a family, an engine over a runner, and per-session caches. Built by the loaders."""

    def __init__(
        self,
        tokenizer,
        family: Family,
        info: ModelInfo,
        runner: Runner,
        *,
        max_cache_bytes: int,
        max_sessions: int = 256,
        eos_ids: Iterable[int | None] = (),
        model=None,
    ):
        self.model = model  # the library's own model object, for inspection (hooks, memory)
        self.tokenizer = tokenizer
        self.family = family
        self.info = info
        self.capabilities = Capabilities(thinking=family.can_think)
        self.chat_template = tokenizer.chat_template or family.fallback_chat_template
        stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens} | set(eos_ids)
        stop_ids.add(tokenizer.eos_token_id)
        stop_ids -= {None, tokenizer.unk_token_id}
        self.stop_ids = frozenset(stop_ids)
        self.think_ids = (
            tuple(tokenizer.convert_tokens_to_ids(t) for t in family.think_tags) if family.think_tags else None
        )
        self.engine = Engine(runner, stop_ids=self.stop_ids)
        self.sessions = SessionStore(max_cache_bytes, max_sessions)

    def render(self, messages, *, enable_thinking: bool | None = None) -> list[int]:
        """The prompt's token ids: the whole conversation through the chat template, ready for the reply."""
        kwargs = {"enable_thinking": enable_thinking} if self.family.can_think else {}
        text = self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.chat_template, tokenize=False, add_generation_prompt=True, **kwargs
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, request: ChatRequest) -> int:
        return len(self.render(request.messages, enable_thinking=request.thinking))

    def fit(self, request: ChatRequest) -> tuple[list[int], int]:
        """The prompt's token ids and how many of the oldest turns were left out so that it fits.

        The conversation is rendered once when it fits. Otherwise, with ``request.fit_context``, the fewest
        oldest turns (a user message and what follows it) are dropped, found by bisection; the system prompt
        and the last user message always stay. Raises ValueError when it cannot fit.
        """
        context = self.info.context_length
        room = min(request.sampling.max_new_tokens, REPLY_ROOM)

        def render(messages) -> list[int]:
            return self.render(messages, enable_thinking=request.thinking)

        ids = render(request.messages)
        if len(ids) + room <= context:
            return ids, 0
        if not request.fit_context:
            raise ValueError(
                f"the conversation is {len(ids)} tokens; with room for {room} new ones it exceeds the model's "
                f"context of {context}: drop earlier turns or ask for fewer new tokens"
            )
        head = request.messages[:1] if request.messages[0]["role"] == "system" else ()
        body = request.messages[len(head) :]
        starts = [i for i, m in enumerate(body) if m["role"] == "user" and i > 0]  # where a later turn begins
        low, high, best = 1, len(starts), None  # drop `low..high` turns; dropping all but the last always shortest
        while low <= high:
            middle = (low + high) // 2
            candidate = render(head + body[starts[middle - 1] :])
            if len(candidate) + room <= context:
                best, high = (candidate, middle), middle - 1
            else:
                low = middle + 1
        if best is None:
            raise ValueError(
                f"the last message alone does not fit the model's context of {context} tokens with room for "
                f"{room} new ones: shorten it"
            )
        return best

    def stream(self, request: ChatRequest) -> ChatStream:
        started = time.perf_counter()
        prompt_ids, dropped = self.fit(request)
        left = self.info.context_length - len(prompt_ids)
        params = replace(request.sampling, max_new_tokens=min(request.sampling.max_new_tokens, left))
        reply = ReplyText(self.tokenizer, think_ids=self.think_ids, thinking=bool(request.thinking), stop=request.stop)
        cancel = threading.Event()
        chunks = self._chunks(cancel, prompt_ids, request.session, params, reply, started)
        return ChatStream(chunks, cancel, prompt_tokens=len(prompt_ids), dropped_turns=dropped)

    def _chunks(
        self, cancel: threading.Event, prompt_ids, session: SessionKey | None, params, reply: ReplyText, started
    ) -> Iterator[Chunk]:
        if session is None:
            lease, entry = None, self.engine.new_entry()
        else:
            lease, entry = self.sessions.checkout(session, self.engine.new_entry)
        run = self.engine.generate(prompt_ids, entry, params, cancel)
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
        except (MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower():
                raise
            raise BackendError(
                f"out of memory while generating ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                "try a shorter conversation, fewer new tokens or a smaller model"
            ) from e
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
        return self.sessions.info()

    def clear_sessions(self, session: SessionKey | None = None) -> None:
        self.sessions.clear(session)
