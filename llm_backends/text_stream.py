"""Token ids -> text, in one place: UTF-8 safe incremental decoding, reasoning routing, stop strings."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


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

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Adds one id; returns the text that is now complete (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text still held back, without a trailing incomplete character."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :].rstrip(REPLACEMENT)


class StopStrings:
    """Holds back text that might be the start of a stop string; reports when one is complete."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Returns the text safe to emit; after a hit, the text before the stop string and nothing later."""
        if not self._stops:
            return text
        if self.hit:
            return ""
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            self._held = ""
            return buf[:cut]
        # The longest end of buf that begins a stop string (held back: the next text may complete it).
        keep = max(
            (k for s in self._stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0
        )
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.hit else held


class ReplyText:
    """Routes generated ids to reasoning or answer text and decodes each; the layer between ids and chunks.

    With thinking on, everything up to the closing tag is reasoning, whether or not the model wrote the
    opening tag (some checkpoints put it in the prompt). Leading newlines of each part are dropped in a chat
    (``raw=False``); a raw continuation keeps every character.
    """

    def __init__(
        self,
        tokenizer,
        *,
        think_ids: tuple[int, int] | None,
        thinking: bool,
        stop: Sequence[str],
        raw: bool = False,
    ):
        self._answer = IncrementalDecoder(tokenizer)
        self._reasoning = IncrementalDecoder(tokenizer)
        self._think_ids = think_ids
        self._in_reasoning = bool(think_ids) and thinking
        self._stop = StopStrings(stop)
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
