"""Control tokens are control only where the chat template writes them.

A tokenizer reads a special token's spelling anywhere in a text as that token, so a message (or a file's text)
holding ``<end_of_turn>`` or ``<|im_end|>`` would end its turn and could start one in another role. Here the
caller's words are text: before the template renders, every control token's spelling in the messages and tools
is wrapped in two private-use markers; after it, each wrapped spelling is tokenized as plain text, and the rest of
the prompt, the template's own control tokens included, as before. A marker the template separated from its
partner (a template may split a message's text, as Qwen 3's does at ``</think>``) is dropped, and the text on its
two sides is tokenized apart, so it cannot join into a control token.

The control tokens are the tokenizer's special tokens, the added tokens the template's text holds (Qwen 3's
``<think>``, ``<tool_call>``; not Gemma's HTML tags or runs of newlines, which are words), and what the caller
names (a vision model's image tokens). transformers 5.24's ``apply_chat_template(sanitize_control_tokens=True)``
takes the same approach; it tokenizes as it renders, where the prompt here is cut, expanded for images and
continued between the two.

A conversation that holds no control token's spelling is tokenized as a whole, exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The markers (transformers' own): private-use characters a caller's text may hold too, which are then wrapped
# themselves and read back as the characters they are.
START, END = "\U000f0000", "\U000f0001"


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, longest first, as a trie: one character compare per branch, where an
    alternation of thousands of words (Gemma 3 has ~6,250 special tokens) costs seconds on a long text."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def walk(node: dict) -> str:
        branches = [re.escape(char) + walk(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return walk(trie)


class ControlTokens:
    """A tokenizer's control tokens under one chat template: ``mark`` the caller's strings before rendering,
    ``encode`` the rendered prompt after."""

    def __init__(self, tokenizer, chat_template: str | None, extra: Iterable[str] = ()):
        self.tokenizer = tokenizer
        template = chat_template or ""
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        written = {t.content for t in added if t.content in template and not t.content.isspace()}
        self.tokens = frozenset({t.content for t in added if t.special} | written | set(extra)) - {""}
        spelled = _trie_pattern(self.tokens | {START, END})
        self._spelled = {frozenset(): re.compile(spelled)}
        # A wrapped spelling, or a lone marker (its partner split off by the template).
        self._wrapped = re.compile(f"{START}({spelled}){END}|[{START}{END}]")
        self._newline = self._plain("\n")
        self._newline_ids = list(tokenizer("\n", add_special_tokens=False)["input_ids"])

    def mark(self, value, spare: Iterable[str] = ()) -> tuple[object, bool]:
        """``value`` (messages, tools: dicts, lists, strings, anything else as it is) with every control token's
        spelling in its strings wrapped in markers, dicts' keys too, except the ``spare`` tokens'; and whether any
        string held one."""
        spare = frozenset(spare) & self.tokens
        pattern = self._spelled.get(spare)
        if pattern is None:
            pattern = self._spelled[spare] = re.compile(_trie_pattern((self.tokens - spare) | {START, END}))
        found = False

        def wrap(text: str) -> str:
            nonlocal found
            if pattern.search(text) is None:
                return text
            found = True
            return pattern.sub(lambda m: START + m.group() + END, text)

        def walk(item):
            if isinstance(item, str):
                return wrap(item)
            if isinstance(item, dict):
                return {walk(k): walk(v) for k, v in item.items()}
            if isinstance(item, list | tuple):
                return [walk(v) for v in item]
            return item

        return walk(value), found

    def mark_answer(self, text: str, tags: tuple[str, str], unfinished: bool = False) -> tuple[str, bool]:
        """An answer's text marked, but for the reasoning tags (``tags``: opening, closing) a template reads out of
        it to split the reasoning off, as Qwen 3's does: every closing tag, and the opening ones before the first
        closing tag (where there is one, or the answer is ``unfinished``: its reasoning may still be going on).
        Wrapped, those would be split from their markers by the template's string operations (and the markers
        would stop its strip of the newlines beside them)."""
        opening, closing = tags
        if closing not in text and not unfinished:
            return self.mark(text)
        first, *rest = text.split(closing)
        parts = [self.mark(first, spare=(opening,)), *(self.mark(part) for part in rest)]
        return closing.join(part for part, _ in parts), any(found for _, found in parts)

    def pieces(self, text: str) -> list[tuple[str, bool]]:
        """A rendered prompt as (text, typed) pieces in order: ``typed`` ones are a wrapped spelling (the caller's,
        read as text), the others the template's text around them; lone markers are left out."""
        out, at = [], 0
        for m in self._wrapped.finditer(text):
            out.append((text[at : m.start()], False))
            if m.group(1) is not None:
                out.append((m.group(1), True))
            at = m.end()
        out.append((text[at:], False))
        return [(piece, typed) for piece, typed in out if piece]

    def encode(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """The pieces' token ids: the template's text as the tokenizer reads it (control tokens as themselves), the
        caller's spellings as plain text. ValueError where plain text would make the control token itself."""
        tokenizer = self.tokenizer
        if len(pieces) == 1 and not pieces[0][1]:
            return list(tokenizer(pieces[0][0], add_special_tokens=False)["input_ids"])
        # A piece after the first is read after a newline whose ids are then taken off, so a tokenizer that adds a
        # space at a text's start (SentencePiece) does not add one mid-prompt.
        template = [("\n" if n else "") + piece for n, (piece, typed) in enumerate(pieces) if not typed]
        read = iter(tokenizer(template, add_special_tokens=False)["input_ids"] if template else ())
        ids: list[int] = []
        for n, (piece, typed) in enumerate(pieces):
            if typed:
                piece_ids = self._plain(piece)
                if tokenizer.added_tokens_encoder.get(piece) in piece_ids:
                    raise ValueError(f"{piece!r} cannot be read as text: this tokenizer makes the token from it")
                ids += piece_ids
                continue
            piece_ids = list(next(read))
            if n:
                newline = self._newline_ids
                piece_ids = piece_ids[len(newline) :] if piece_ids[: len(newline)] == newline else None
                if piece_ids is None:
                    piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
            ids += piece_ids
        return ids

    def text_ids(self, text: str, reasoning: tuple[str, str] | None = None) -> list[int]:
        """The ids of text that is all the caller's (an answer to continue; ``reasoning``: the reasoning tags it may
        open with, read as ``mark_answer`` reads them): control tokens' spellings as text."""
        if not text:
            return []
        marked, found = self.mark_answer(text, reasoning, unfinished=True) if reasoning else self.mark(text)
        return self.encode(self.pieces(marked) if found else [(text, False)])

    def _plain(self, text: str) -> list[int]:
        """``text``'s ids matching no added token, special or not: the tokenizer's normalizer, pre-tokenizer and
        model, which share no state between threads (a ``split_special_tokens`` call sets a flag on the tokenizer
        that every other call reads). Read after a newline, whose ids are then taken off, so a tokenizer that adds
        a space at the start of a text does not add one mid-prompt."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "model"):
            return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

        def read(text: str) -> list[int]:
            if backend.normalizer is not None:
                text = backend.normalizer.normalize_str(text)
            splits = [text]
            if backend.pre_tokenizer is not None:
                splits = [split for split, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
            return [token.id for split in splits for token in backend.model.tokenize(split)]

        if text == "\n":
            return read(text)
        ids = read("\n" + text)
        return ids[len(self._newline) :] if ids[: len(self._newline)] == self._newline else read(text)
