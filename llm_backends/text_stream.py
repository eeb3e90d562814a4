"""Token ids -> text, in one place: UTF-8 safe incremental decoding, reasoning routing, stop strings."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
CONTEXT = 6  # ids of shown text a continued decode starts after (a character spans at most 4 byte tokens)


class IncrementalDecoder:
    """Decodes a growing list of token ids into text deltas, never emitting half a multi-byte character.

    Decoding a short window of the most recent ids (with one already-emitted token as context) keeps each
    step O(1) and preserves the spaces that some tokenizers attach to the token that follows.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._held = 0  # characters at the end of the read ids' text not shown yet (see follow)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def follow(self, ids: Sequence[int]) -> None:
        """Decodes what comes after ``ids``, shown already but for an unfinished character at their end (as
        ``flush`` leaves it): a space the tokenizer writes with the next token's context, or the rest of that
        character, comes out with the first new text."""
        context = [i for i in ids if i >= 0][-CONTEXT:]
        text = self._decode(context)
        self._ids, self._prefix_offset, self._read_offset = context, 0, len(context)
        self._held = len(text) - len(text.rstrip(REPLACEMENT))

    def push(self, token_id: int) -> str:
        """Adds one id; returns the text that is now complete (possibly empty)."""
        self._ids.append(token_id)
        shown = len(self._decode(self._ids[self._prefix_offset : self._read_offset])) - self._held
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > shown and not full.endswith(REPLACEMENT):
            self._prefix_offset, self._read_offset, self._held = self._read_offset, len(self._ids), 0
            return full[shown:]
        return ""

    def flush(self) -> str:
        """The text still held back, without a trailing incomplete character."""
        shown = len(self._decode(self._ids[self._prefix_offset : self._read_offset])) - self._held
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        self._held = 0
        return full[shown:].rstrip(REPLACEMENT)


class StopStrings:
    """Holds back text that might be the start of a stop string; reports when one is complete. ``before``: the
    text shown already (a continued answer's), where a stop string may begin and the new text finish it."""

    def __init__(self, stops: Sequence[str], before: str = ""):
        self._stops = [s for s in stops if s]
        self._window = max(map(len, self._stops), default=1) - 1  # shown characters a stop string may begin in
        self._shown = before[max(0, len(before) - self._window) :] if self._window else ""
        self._held = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Returns the text safe to emit; after a hit, the text before the stop string and nothing later."""
        if not self._stops:
            return text
        if self.hit:
            return ""
        shown = len(self._shown)
        buf = self._shown + self._held + text
        # A stop string found must end in what was not shown yet.
        found = (buf.find(s, max(0, shown - len(s) + 1)) for s in self._stops)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            self._held = ""
            return buf[shown:cut] if cut > shown else ""
        # The longest end of buf that begins a stop string (held back: the next text may complete it).
        keep = max(
            (k for s in self._stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0
        )
        keep = min(keep, len(buf) - shown)  # what was shown stays shown
        emitted = buf[shown : len(buf) - keep]
        self._held = buf[len(buf) - keep :] if keep else ""
        shown_now = self._shown + emitted
        self._shown = shown_now[max(0, len(shown_now) - self._window) :] if self._window else ""
        return emitted

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.hit else held


class ReplyText:
    """Routes generated ids to reasoning or answer text and decodes each; the layer between ids and chunks.

    With thinking on, everything up to the closing tag is reasoning, whether or not the model wrote the
    opening tag (some checkpoints put it in the prompt). Leading newlines of each part are dropped in a chat
    (``raw=False``); a raw continuation keeps every character. ``after`` and ``before``: the ids and the text
    of the answer being continued, already shown.
    """

    def __init__(
        self,
        tokenizer,
        *,
        think_ids: tuple[int, int] | None,
        thinking: bool,
        stop: Sequence[str],
        raw: bool = False,
        after: Sequence[int] = (),
        before: str = "",
    ):
        self._answer = IncrementalDecoder(tokenizer)
        if after:  # continuing an answer whose tokens are these
            self._answer.follow(after)
        self._reasoning = IncrementalDecoder(tokenizer)
        self._think_ids = think_ids
        self._in_reasoning = bool(think_ids) and thinking
        self._stop = StopStrings(stop, before)
        self._started = {"answer": raw, "reasoning": raw}

    def is_answer(self, token_id: int) -> bool:
        """Whether ``token_id``, pushed next, is part of the answer (not reasoning, not a think tag)."""
        return not self._in_reasoning and (self._think_ids is None or token_id not in self._think_ids)

    @property
    def stopped(self) -> bool:
        """True once a stop string has been seen in the answer."""
        return self._stop.hit

    def _lstrip_start(self, part: str, text: str) -> str:
        if not self._started[part]:
            text = text.lstrip("\n")
            self._started[part] = bool(text)
        return text

    def push(self, token_id: int) -> tuple[str, str]:
        """Returns (answer_delta, reasoning_delta) for one generated id."""
        if self._think_ids is not None and token_id in self._think_ids:
            opening = token_id == self._think_ids[0]
            tail = "" if opening else self._reasoning.flush()
            self._in_reasoning = opening
            return "", self._lstrip_start("reasoning", tail)
        if self._in_reasoning:
            return "", self._lstrip_start("reasoning", self._reasoning.push(token_id))
        return self._stop.push(self._lstrip_start("answer", self._answer.push(token_id))), ""

    def flush(self) -> tuple[str, str]:
        answer = self._stop.push(self._lstrip_start("answer", self._answer.flush()))
        answer += self._stop.flush()
        return answer, self._lstrip_start("reasoning", self._reasoning.flush())
