"""LocalModel: a model run on this machine (transformers or MLX) behind the ChatModel interface.

It owns what both local backends share: the chat template, the context rule, the stop tokens, the text
layer and the per-session caches. Only the runner that feeds tokens into the model differs.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import itertools
import json
import logging
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial

from jinja2 import TemplateError

from . import images as image_parts
from . import tools as tool_calls
from .backend import Capabilities, ChatModel, ChatStream, Choices, ModelInfo, choice_count, choice_sampling
from .batching import NO_ARRIVAL, Arrival
from .chunks import Chunk, Stats, TokenLogprob
from .constrained import Grammars
from .engine import Engine, Runner, ThinkingBudget
from .errors import BackendError
from .families.base import BASE_MODEL_STOP, BASE_MODEL_TEMPLATE, BASE_MODEL_TURN, Family
from .request import ChatRequest, SessionKey
from .session_cache import CacheEntry, SessionStore, common_prefix_len
from .special_tokens import ControlTokens
from .text_stream import ReplyText

# A prompt fits when it leaves room for min(max_new_tokens, REPLY_ROOM) new tokens; the reply is then
# capped at what is left of the context.
REPLY_ROOM = 1024
# The context assumed for a checkpoint whose config does not say (the loaders' one fallback).
FALLBACK_CONTEXT = 8192
# Stands for the answer to continue while the template renders (private-use characters: no template writes them),
# so the answer follows exactly as sent, whatever the template would trim or reshape in a finished turn.
CONTINUE_MARK = "\ue000continue\ue000"
# Cut-off answers remembered as the model's own tokens (for an exact continue_final_message): per person (so no
# one else's replies push a person's out), and in all (bytes of their tokens and text).
CUT_PER_PRINCIPAL = 16
CUT_BYTES = 64 * 2**20
log = logging.getLogger(__name__)


class CutAnswers:
    """Per session, its last answer that ended short (max tokens, Stop): a hash of the prompt it followed, the
    model's own tokens and the text they were shown as. Sessions are grouped by principal, at most
    CUT_PER_PRINCIPAL each (one person's sessions push out only their own), and the people least recently heard
    from go first when all of them pass CUT_BYTES. A clear forgets, and keeps streams running meanwhile from
    writing back what it forgot."""

    def __init__(self):
        self._by_principal: OrderedDict[str, OrderedDict[SessionKey, tuple[bytes, array, str]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, session: SessionKey | None) -> tuple[bytes, array, str] | None:
        with self._lock:
            return self._by_principal.get(session.principal, {}).get(session) if session is not None else None

    def put(self, session: SessionKey, record: tuple[bytes, array, str] | None, valid: Callable[[], bool]) -> None:
        """Keeps (``record`` given) or forgets the session's cut-off answer; keeps nothing unless ``valid()``,
        asked under this object's lock (the session was not cleared meanwhile)."""
        with self._lock:
            own = self._by_principal.get(session.principal)
            if own is not None and session in own:
                self._bytes -= _size(own.pop(session))
            if record is None or not valid():
                return
            own = self._by_principal.setdefault(session.principal, OrderedDict())
            self._by_principal.move_to_end(session.principal)
            own[session] = record
            self._bytes += _size(record)
            while len(own) > CUT_PER_PRINCIPAL:
                self._bytes -= _size(own.popitem(last=False)[1])
            while self._bytes > CUT_BYTES and self._by_principal:
                oldest = next(iter(self._by_principal.values()))
                self._bytes -= _size(oldest.popitem(last=False)[1])
                if not oldest:
                    self._by_principal.popitem(last=False)

    def forget(self, session: SessionKey | None = None) -> None:
        with self._lock:
            if session is None:
                self._by_principal.clear()
                self._bytes = 0
                return
            own = self._by_principal.get(session.principal)
            if own is not None and session in own:
                self._bytes -= _size(own.pop(session))


def _size(record: tuple[bytes, array, str]) -> int:
    return len(record[0]) + record[1].itemsize * len(record[1]) + 4 * len(record[2])


def _characters(messages: Sequence[dict], prompt: str | None = None) -> int:
    """The characters of the messages' text (images aside), and of a raw prompt."""
    total = len(prompt or "")
    for message in messages:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else ()
        total += sum(len(part) for part in parts if isinstance(part, str))
    return total


def _folding(tokenizer) -> int:
    """How many characters the tokenizer's normalizer may turn into one: 1 where it has none or only replaces one
    character by others (Gemma's " " -> "▁"), else 4 (NFC composes a letter and its marks; Hangul jamo fold 3:1)."""

    def keeps_length(spec) -> bool:
        if spec is None:
            return True
        kind = spec.get("type")
        if kind == "Sequence":
            return all(keeps_length(part) for part in spec.get("normalizers", ()))
        if kind == "Replace":
            return len((spec.get("pattern") or {}).get("String", "..")) == 1 and bool(spec.get("content"))
        return kind in ("Prepend", "Lowercase")

    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    if backend is not None and normalizer is None:
        return 1
    try:
        spec = json.loads(normalizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return 4
    return 1 if keeps_length(spec) else 4


class PromptShare:
    """How a request's ``n`` replies read its prompt once. The first reads it and, before its first token, keeps
    a snapshot of its cache with the logits that followed (``give``, in its thread: one copy); each other reply
    takes a copy of that snapshot in its own thread (the last one the snapshot itself) and starts decoding at
    once. If the first ends before it has read the prompt (closed, failed), the others end too, unread; where no
    snapshot could be made (no memory for it), they read the prompt themselves."""

    def __init__(self, others: int, new_entry: Callable[[], CacheEntry]):
        self._new_entry = new_entry
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._given = False
        self._snapshot: CacheEntry | None = None
        self._left = others

    def give(self, entry: CacheEntry, logits) -> None:
        try:
            if entry.copyable:
                snapshot = entry.copy()
                snapshot.hold_logits(logits)
                self._snapshot = snapshot
        except Exception as e:  # noqa: BLE001 (no memory for it, say: the others read the prompt themselves)
            log.warning("could not copy a prompt's cache for a request's other replies (%s)", e)
        finally:
            self._given = True
            self._ready.set()

    def end(self) -> None:
        """The first reply has ended (having read the prompt or not)."""
        self._ready.set()

    def take(self, cancel: threading.Event) -> CacheEntry:
        """Another reply's entry, once the first has read the prompt; where it never will, ``cancel`` is set."""
        while not self._ready.wait(0.02) and not cancel.is_set():
            pass
        if not self._given:
            cancel.set()
        with self._lock:  # one copy at a time, so the last can take the snapshot itself once nobody reads it
            self._left -= 1
            snapshot = self._snapshot
            if snapshot is None or cancel.is_set():
                return self._new_entry()
            if self._left == 0:
                self._snapshot = None
                return snapshot
            return snapshot.copy()


def restore_points(turns: int) -> int:
    """Restore points a session keeps so that any of its last ``turns`` exchanges can be edited, undone or
    retried from where it begins: a conversation that grows one exchange at a time leaves two per exchange
    (where the user's turn begins, and the prompt's end)."""
    return 2 * turns


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
        vocab_size: int,
        max_sessions: int = 256,
        eos_ids: Iterable[int | None] = (),
        model=None,
        disk_tier=None,
        host_tier=None,
        image_format: image_parts.ImageFormat | None = None,
    ):
        self.model = model  # the library's own model object, for inspection (hooks, memory)
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        # Per model (a cache on the class would keep every model it saw alive): few system prompts recur.
        self._operator_ids = functools.lru_cache(maxsize=64)(self._operator_ids_uncached)
        self.family = family
        self.info = info
        base = not tokenizer.chat_template
        self.image_format = image_format  # None: the model reads text only
        self.capabilities = Capabilities(
            thinking=family.can_think and not base, images=image_format is not None, base_model=base
        )
        self.chat_template = BASE_MODEL_TEMPLATE if base else tokenizer.chat_template
        # A vision model's image tokens are the processor's to write, as the template's own are the template's.
        images = () if image_format is None else (image_format.placeholder, image_format.expanded)
        self.control = ControlTokens(
            tokenizer, "".join((self.chat_template or "", *images)), extra=(*images[:1], *family.control_tokens)
        )
        self.template_stops = BASE_MODEL_STOP if base else ()  # a base model's reply ends at the next question
        stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens} | set(eos_ids)
        stop_ids.add(tokenizer.eos_token_id)
        stop_ids -= {None, tokenizer.unk_token_id}
        self.stop_ids = frozenset(stop_ids)
        self.think_ids = (
            tuple(tokenizer.convert_tokens_to_ids(t) for t in family.think_tags) if family.think_tags else None
        )
        self.cutoff_ids = ()  # forced when a thinking budget is spent: up to the end-of-thinking token
        if self.think_ids:
            cutoff = tokenizer(family.thinking_cutoff or family.think_tags[1], add_special_tokens=False)["input_ids"]
            if self.think_ids[1] in cutoff:
                self.cutoff_ids = tuple(cutoff[: cutoff.index(self.think_ids[1]) + 1])
        user_turn = BASE_MODEL_TURN if base else family.user_turn
        self.user_turn_ids = tuple(tokenizer(user_turn, add_special_tokens=False)["input_ids"]) if user_turn else ()
        # A token's text, for DRY's sequence breakers: each token is decoded once, when a reply first meets it.
        self.engine = Engine(
            runner,
            stop_ids=self.stop_ids,
            token_text=functools.lru_cache(maxsize=2**17)(lambda token: tokenizer.decode([token])),
        )
        # Continuing a cut-off answer reads the model's own tokens, not a new tokenization of its text, so a
        # continued answer is the one a larger max_tokens would have given.
        self._cut = CutAnswers()
        self.sessions = SessionStore(max_cache_bytes, max_sessions, disk_tier, host_tier)
        if disk_tier is not None:  # what is still in memory when the process ends goes to disk too
            atexit.register(self.sessions.persist)
        self.grammars = Grammars(tokenizer, vocab_size, self.stop_ids)
        # Templates that know tools (Qwen 3's) render them; for others tools.inline writes them into turns.
        self.template_has_tools = "tools" in (self.chat_template or "")
        # No token stands for more characters than its own spelling has (byte-level and SentencePiece vocabularies
        # spell each character, space or byte with at least one character), times what the tokenizer's normalizer
        # can fold into one character: fit() refuses text no context holds.
        self.longest_token = (max(map(len, tokenizer.get_vocab()), default=1) or 1) * _folding(tokenizer)

    def render(
        self, messages, *, enable_thinking: bool | None = None, tools=None, continue_final: bool = False
    ) -> list[int]:
        """The prompt's token ids: the whole conversation through the chat template, ready for the reply,
        with ``tools`` offered to the model. Each image's tokens are its pseudo ids (``images.py``). With
        ``continue_final`` the last message (an assistant's answer) is left open, its text as sent."""
        head, answer = self._render_parts(messages, enable_thinking, tools, continue_final)
        return head + self._answer_ids(answer)

    def _answer_ids(self, answer: str) -> list[int]:
        return self.control.text_ids(answer, self.family.think_tags)

    def _render_parts(self, messages, enable_thinking, tools, continue_final: bool) -> tuple[list[int], str]:
        """The ids of everything before the reply, and (``continue_final``) the answer's text that follows them.
        Control tokens count only where the template writes them: in the messages and tools they are text
        (``special_tokens.py``)."""
        kwargs = {"enable_thinking": enable_thinking} if self.family.can_think else {}
        pictures = image_parts.images_of(messages)
        answer = messages[-1]["content"] if continue_final else ""
        marked = [self._mark(m) for m in messages]
        tools, typed_tools = self.control.mark(tools)
        messages, typed = [m for m, _ in marked], typed_tools or any(found for _, found in marked)
        if continue_final:
            messages = [*messages[:-1], {**messages[-1], "content": CONTINUE_MARK}]
        messages = [self._template_message(m) for m in messages]
        if self.template_has_tools:
            if tools:
                kwargs["tools"] = list(tools)
        elif tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = tool_calls.inline(messages, list(tools or ()))
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=not continue_final,
                **kwargs,
            )
        except (TemplateError, RecursionError) as e:  # "roles must alternate", tools nested too deep: the input's
            raise ValueError(f"the model's chat template refused the conversation: {e}") from e
        if continue_final:
            if text.count(CONTINUE_MARK) != 1:
                raise ValueError(
                    "the model's chat template does not write the last answer as sent: it cannot be continued"
                )
            text, answer = _open_answer(text[: text.index(CONTINUE_MARK)], answer)
        pieces = self.control.pieces(text) if typed else [(text, False)]
        if self.image_format is not None:
            pieces = self.image_format.expand(pieces, len(pictures))
        ids = self.control.encode(pieces)
        return (self.image_format.mark(ids, pictures) if self.image_format else ids), answer

    def _mark(self, message: dict) -> tuple[dict, bool]:
        """``message`` with the control tokens' spellings in it wrapped (``ControlTokens.mark``), but for the
        reasoning tags an answer's text holds where the template reads them (Qwen 3's splits the reasoning off)."""
        content = message.get("content")
        if message["role"] != "assistant" or not self.family.think_tags or not isinstance(content, str):
            return self.control.mark(message)
        rest, found = self.control.mark({k: v for k, v in message.items() if k != "content"})
        content, in_content = self.control.mark_answer(content, self.family.think_tags)
        return {**rest, "content": content}, found or in_content

    def _template_message(self, message: dict) -> dict:
        """A message as chat templates read it: content with images as typed parts (Gemma 3's template writes
        its image placeholder for each), or for the plain base-model transcript the placeholder inline."""
        content = message["content"]
        if isinstance(content, str):
            return dict(message)
        if self.capabilities.base_model:
            text = "".join(p if isinstance(p, str) else self.image_format.placeholder for p in content)
            return {**message, "content": text}
        parts = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in content]
        return {**message, "content": parts}

    def _render(self, request: ChatRequest, messages) -> list[int]:
        if request.prompt is not None:  # as written; BOS added unless the prompt already starts with it
            bos = self.tokenizer.bos_token
            starts_with_bos = bool(bos) and request.prompt.startswith(bos)
            return list(self.tokenizer(request.prompt, add_special_tokens=not starts_with_bos)["input_ids"])
        # Tools stay in the prompt with tool_choice "none" (as vLLM does): the prefix, and so the cache, stays
        # the same across a tool round trip; "none" only means no call is parsed or forced.
        return self.render(
            messages, enable_thinking=request.thinking, tools=request.tools, continue_final=request.continue_final
        )

    def count_tokens(self, request: ChatRequest) -> int:
        return len(self._render(request, request.messages))

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        self._check_size(len(text))
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        self._check_size(_characters(request.messages, request.prompt))
        ids = self._render(request, request.messages)
        image = self.image_format.token_id if self.image_format is not None else None
        return [image if t < 0 else t for t in ids]  # an image's pseudo ids (images.token) are image tokens

    def _check_size(self, characters: int) -> None:
        """ValueError for text with more characters than the context could hold (``fit`` refuses it too)."""
        most = self.info.context_length * self.longest_token
        if characters > most:
            raise ValueError(
                f"the text is {characters} characters, more than the model's context of "
                f"{self.info.context_length} tokens could hold"
            )

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_piece(self, token: int) -> str | list[int]:
        piece = self.grammars.tokenizer.decode_bytes([token])
        try:
            return piece.decode()
        except UnicodeDecodeError:  # part of a character: its bytes, as llama.cpp gives them
            return list(piece)

    def fit(self, request: ChatRequest) -> tuple[list[int], int]:
        """The prompt's token ids and how many of the oldest turns were left out so that it fits.

        The conversation is rendered once when it fits. Otherwise, with ``request.fit_context``, the fewest
        oldest turns (a user message and what follows it) are dropped, found by bisection; the system prompt
        and the last user message always stay. Raises ValueError when it cannot fit. Text with more characters
        than the context could hold (``longest_token`` per token) is refused, or its oldest turns dropped,
        before the template and the tokenizer spend seconds on it (8 MB took ~7 s).
        """
        context = self.info.context_length
        room = min(request.sampling.max_new_tokens, REPLY_ROOM)
        most = (context - room) * self.longest_token

        def render(messages) -> list[int]:
            return self._render(request, messages)

        if not request.fit_context or request.prompt is not None:
            if _characters(request.messages, request.prompt) > most:
                raise ValueError(
                    f"the conversation is {_characters(request.messages, request.prompt)} characters, more than "
                    f"the model's context of {context} tokens holds with room for {room} new ones: drop earlier "
                    "turns or shorten it"
                )
            ids = render(request.messages)
            if len(ids) + room <= context:
                return ids, 0
            raise ValueError(
                f"the conversation is {len(ids)} tokens; with room for {room} new ones it exceeds the model's "
                f"context of {context}: drop earlier turns or ask for fewer new tokens"
            )
        head = request.messages[:1] if request.messages[0]["role"] == "system" else ()
        body = request.messages[len(head) :]
        starts = [i for i, m in enumerate(body) if m["role"] == "user" and i > 0]  # where a later turn begins

        def too_long(size: str) -> ValueError:
            what = "the system prompt and the last message are" if head else "the last message alone is"
            return ValueError(
                f"{what} {size}; with room for {room} new tokens that does not fit the model's context of "
                f"{context} tokens: shorten {'them' if head else 'it'}"
            )

        # Characters from each message to the end: one pass, however many turns (a cut is then one lookup).
        from_here = list(itertools.accumulate(map(_characters, ([m] for m in reversed(body)))))[::-1] + [0]
        head_size = _characters(head)
        if head_size + from_here[starts[-1] if starts else 0] > most:
            raise too_long(f"{head_size + from_here[starts[-1] if starts else 0]} characters")
        tried = None  # the tokens of the shortest prompt tried
        if head_size + from_here[0] <= most:
            ids = render(request.messages)
            if len(ids) + room <= context:
                return ids, 0
            tried = len(ids)
        # Drop `low..high` turns; dropping all but the last is always the shortest. Cuts that keep more characters
        # than could fit are not tried.
        fewest = next((k for k, at in enumerate(starts) if head_size + from_here[at] <= most), len(starts))
        low, high, best = fewest + 1, len(starts), None
        while low <= high:
            middle = (low + high) // 2
            candidate = render([*head, *body[starts[middle - 1] :]])
            if len(candidate) + room <= context:
                best, high = (candidate, middle), middle - 1
            else:
                low, tried = middle + 1, len(candidate)
        if best is None:
            raise too_long(f"{tried} tokens")
        return best

    def stream(self, request: ChatRequest) -> ChatStream:
        return self._open(request, 1)

    def stream_choices(self, request: ChatRequest, n: int = 1) -> ChatStream:
        """``n`` replies to ``request`` (``backend.Choices``): the prompt is rendered and read once, by the
        first, whose cache each other one then starts from as a copy (``PromptShare``)."""
        return self.stream(request) if choice_count(n) == 1 else self._open(request, n)

    def _open(self, request: ChatRequest, n: int) -> ChatStream:
        started = time.perf_counter()
        # Announced before the prompt is rendered: requests that come together then share their first passes.
        arrival = self.engine.runner.arrival()
        try:
            return self._stream(request, started, arrival, n)
        except BaseException:
            arrival.close()
            raise

    def _stream(self, request: ChatRequest, started: float, arrival: Arrival, n: int) -> ChatStream:
        prompt_ids, dropped = self.fit(request)
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        answer = request.messages[-1]["content"] if request.continue_final else ""
        if answer:  # as the template leaves it open (_open_answer)
            probe = [{"role": "user", "content": "?"}, request.messages[-1]]
            answer = self._render_parts(probe, request.thinking, None, True)[1]
        answer_at = len(prompt_ids) - len(self._answer_ids(answer))
        lead = ""  # what the answer as sent lacks of the model's own (a space at its end that a page trimmed)
        if request.continue_final and not dropped:
            prompt_ids, answer_at, lead = self._own_answer(request, prompt_ids, answer_at, answer)
        left = self.info.context_length - len(prompt_ids)
        params = replace(request.sampling, max_new_tokens=min(request.sampling.max_new_tokens, left))
        grammar = self.grammars.for_request(request.response_format, request.tools, request.tool_choice)
        # Raw text, a base model asked in its plain transcript and a continued answer are continued as written: no
        # reasoning split.
        as_written = request.prompt is not None or request.continue_final
        think_ids = None if as_written or self.capabilities.base_model else self.think_ids
        budget = request.thinking_budget is not None and request.thinking and think_ids
        if budget and not self.cutoff_ids:
            raise ValueError("this model's tokenizer cannot write its end-of-thinking tag: no thinking_budget")

        def constraint():  # each reply follows its own
            found = None
            if grammar is not None:
                found = self.grammars.constraint(grammar, think_ids[1] if think_ids and request.thinking else None)
            if budget:
                found = ThinkingBudget(request.thinking_budget, self.cutoff_ids, think_ids[1], found)
            return found

        def reply() -> ReplyText:
            return ReplyText(
                self.tokenizer,
                think_ids=think_ids,
                thinking=bool(request.thinking) and think_ids is not None,
                stop=request.stop if request.prompt is not None else request.stop + self.template_stops,
                raw=as_written,
                after=prompt_ids[answer_at:],
                before=answer + lead,
            )

        generate = partial(
            self.engine.generate,
            prompt_ids,
            logprobs=request.logprobs,
            boundaries=self.turn_boundaries(prompt_ids, request) if request.prompt is None else (),
            images=image_parts.by_key(image_parts.images_of(request.messages)),
            answer_ids=prompt_ids[answer_at:],
        )

        def one(i: int, *, session=None, arrival=NO_ARRIVAL, prompt_read=None, start=None, ended=None) -> ChatStream:
            """Reply ``i`` (``PromptShare``'s hooks: ``prompt_read`` and ``ended`` for the first, ``start`` for
            the others)."""
            cancel = threading.Event()
            chunks = self._chunks(
                partial(
                    generate,
                    params=choice_sampling(params, i),
                    cancel=cancel,
                    constraint=constraint(),
                    prompt_read=prompt_read,
                ),
                session,
                reply(),
                cancel,
                started,
                prompt_ids,
                partial(self.operator_tokens, request, prompt_ids),
                arrival,
                (answer_at, answer, lead),
                start=None if start is None else partial(start, cancel),
                ended=ended,
            )
            # A stream closed unread (its client left at once) is no longer waited for.
            return ChatStream(
                chunks, cancel, prompt_tokens=len(prompt_ids), dropped_turns=dropped, on_close=arrival.close
            )

        if n == 1:
            return one(0, session=request.session, arrival=arrival)
        share = PromptShare(n - 1, self.engine.new_entry)
        first = one(0, session=request.session, arrival=arrival, prompt_read=share.give, ended=share.end)
        return Choices([first, *(one(i, start=share.take) for i in range(1, n))])

    def _own_answer(
        self, request: ChatRequest, prompt_ids: list[int], at: int, answer: str
    ) -> tuple[list[int], int, str]:
        """The prompt, where the answer to continue begins in it, and what the reply adds before its new text.

        Where the answer is this session's last one, cut off after exactly this conversation and sent back with
        the same text (give or take spaces at its ends: a page trims them), the prompt is the one that answer
        followed and the model's own tokens, and the reply starts with the spaces the sent text lacks at its end.
        Else the answer as rendered. A new tokenization of the text may differ from the model's (a word it wrote
        in two pieces, a newline the page does not show, the template's own spacing), and would read on from a
        context the answer never had (``_remember``)."""
        kept = self._cut.get(request.session)
        if kept is None or kept[2].strip() != answer.strip():
            return prompt_ids, at, ""
        kept_end, sent_end = kept[2][len(kept[2].rstrip()) :], answer[len(answer.rstrip()) :]
        if not kept_end.startswith(sent_end):
            return prompt_ids, at, ""
        before = self.render(request.messages[:-1], enable_thinking=request.thinking, tools=request.tools)
        own = before + kept[1].tolist()
        if kept[0] != _digest(before) or len(own) + min(request.sampling.max_new_tokens, REPLY_ROOM) > (
            self.info.context_length
        ):
            return prompt_ids, at, ""
        return own, len(before), kept_end[len(sent_end) :]

    def operator_tokens(self, request: ChatRequest, prompt_ids: Sequence[int] | None = None) -> int:
        """How many of the prompt's first tokens are the operator's words (the template's head and the system
        prompt), which may be shared between people; 0 without a system prompt. With ``prompt_ids`` (the request's
        rendered prompt), 0 also where they do not begin with exactly those tokens (a tokenizer that merged the
        system prompt's last token with the first user words)."""
        messages = request.messages
        if request.prompt is not None or not messages or messages[0]["role"] != "system":
            return 0
        head = self._operator_ids(messages[0]["content"], request.thinking)
        if prompt_ids is not None and tuple(prompt_ids[: len(head)]) != head:
            return 0
        return len(head)

    def _operator_ids_uncached(self, system: str, thinking: bool | None) -> tuple[int, ...]:
        probes = [
            self.render(
                [{"role": "system", "content": system}, {"role": "user", "content": probe}], enable_thinking=thinking
            )
            for probe in ("A", "B")
        ]
        return tuple(probes[0][: common_prefix_len(*probes)])

    def turn_boundaries(self, prompt_ids: list[int], request: ChatRequest | None = None) -> list[int]:
        """Where restore points go in a prompt: where the user's turns begin (the first one excepted) and,
        with a system prompt, where the operator's words end (the part other people's sessions may share)."""
        marker = list(self.user_turn_ids)
        places = {self.operator_tokens(request)} if request is not None else set()
        if marker:
            first = marker[0]
            places |= {
                i for i, token in enumerate(prompt_ids) if token == first and prompt_ids[i : i + len(marker)] == marker
            }
        return sorted(i for i in places if i > 1)

    def _token_logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        decode, raw = self.tokenizer.decode, self.grammars.tokenizer.decode_bytes
        return TokenLogprob(
            decode([token]),
            logprob,
            tuple((decode([i]), lp) for i, lp in top),
            raw([token]),
            tuple(raw([i]) for i, _ in top),
        )

    def _chunks(
        self,
        generate,
        session: SessionKey | None,
        reply: ReplyText,
        cancel: threading.Event,
        started: float,
        prompt_ids: list[int],
        shareable,
        arrival: Arrival,
        answer: tuple[int, str, str],
        start: Callable[[], CacheEntry] | None = None,
        ended: Callable[[], None] | None = None,
    ) -> Iterator[Chunk]:
        """The reply's chunks; ``generate(entry)`` starts the decode. The session's cache is checked out only
        once the stream is read, and checked back in however the stream ends. ``answer``: where in the prompt
        the answer begins, its text and what the reply adds before its new text (a continued answer's; else the
        prompt's end, "" and ""). ``start``: where a reply that is not the first of several gets its entry
        (``PromptShare.take``); ``ended``: called when the reply ends (``PromptShare.end``)."""
        try:
            if start is not None:
                lease, entry = None, start()
            elif session is None:
                lease, entry = None, self.engine.new_entry()
            else:
                lease, entry = self.sessions.checkout(session, self.engine.new_entry, prompt_ids, shareable)
        except BaseException:
            arrival.close()
            if ended is not None:
                ended()
            raise
        arrival.bind(entry)
        tokens = None
        first = last = None
        pending: list[TokenLogprob] = []
        shown, thought, lead = [], False, answer[2]
        record = None  # the cut-off answer to remember, once the reply has ended
        try:
            run = generate(entry)
            tokens = iter(run)
            finish = None
            for token in tokens:
                last = time.perf_counter()
                first = first or last
                if token in self.stop_ids:
                    continue
                if run.top_logprobs is not None and reply.is_answer(token):
                    pending.append(self._token_logprob(token, *run.logprobs[-1]))
                text, reasoning = reply.push(token)
                if lead and text:
                    text, lead = lead + text, ""
                shown.append(text)
                thought = thought or bool(reasoning)
                if text or reasoning:
                    yield Chunk(text=text, reasoning=reasoning, logprobs=tuple(pending) if text else ())
                    if text:
                        pending = []
                if reply.stopped:
                    finish = "stop"
                    break
                if cancel.is_set():
                    finish = "cancelled"
                    break
            finish = finish or run.finish_reason
            text, reasoning = reply.flush()
            text = lead + text if text else text
            if finish in ("length", "cancelled") and run.completion_ids and not (thought or reasoning):
                at, before, _ = answer
                own = array("q", [*run.prompt_ids[at:], *run.completion_ids])
                record = (_digest(run.prompt_ids[:at]), own, "".join([before, *shown, text]))
        except (MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower():
                raise
            raise BackendError(
                f"out of memory while generating ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                "try a shorter conversation, fewer new tokens or a smaller model"
            ) from e
        finally:
            arrival.close()
            if tokens is not None:
                tokens.close()
            if ended is not None:
                ended()
            if lease is not None:
                # Before the lease ends: a clear of the session since its checkout has taken the lease, and then
                # nothing is remembered (clear_sessions forgets after the store's clear).
                self._cut.put(session, record, partial(self.sessions.holds, lease))
                self.sessions.checkin(lease, entry)
        stats = Stats.timed(
            prompt_tokens=len(run.prompt_ids),
            cached_tokens=run.cached_tokens,
            completion_tokens=len(run.completion_ids),
            started=started,
            first=first,
            last=last,
            end=time.perf_counter(),
            cache_tier=entry.found if lease is not None else None,
        )
        yield Chunk(text=text, reasoning=reasoning, finish_reason=finish, stats=stats, logprobs=tuple(pending))

    def cache_info(self) -> dict:
        return self.sessions.info()

    def release(self) -> None:
        if self.sessions.tier is not None:
            atexit.unregister(self.sessions.persist)  # written now; kept, the exit hook would hold every session
        self.sessions.release()
        self._cut.forget()

    def clear_sessions(self, session: SessionKey | None = None) -> None:
        self.sessions.clear(session)  # first: a stream that ends meanwhile then finds its lease gone (_chunks)
        self._cut.forget(session)


def _open_answer(head: str, answer: str) -> tuple[str, str]:
    """The rendered text before an answer to continue, and the answer: a space the template writes before an
    answer (the base-model transcript's "Answer: ") goes with the answer, where tokenizers put a word's space
    and where the model wrote it, and gives way to the answer's own (as the template's trim of it would)."""
    spaces = head[len(head.rstrip(" ")) :]
    if not spaces:
        return head, answer
    return head[: -len(spaces)], answer if answer[:1].isspace() else spaces + answer


def _digest(ids: Sequence[int]) -> bytes:
    return hashlib.sha256(array("q", ids).tobytes()).digest()
