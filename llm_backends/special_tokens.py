"""Special tokens are control only where the chat template writes them.

A tokenizer reads a special token's spelling anywhere in a text as that token, so a message (or a file's text)
holding ``<end_of_turn>`` or ``<|im_end|>`` would end its turn and could start one in another role. Here the
caller's words are text: the conversation is rendered a second time with every special token's spelling in it
replaced by as many placeholder characters, the special tokens left in that render are the template's own, and
the prompt is tokenized in pieces between them with special tokens split into ordinary ones.

The pieces are cut where the tokenizer itself cuts a text (at added tokens), so a prompt whose messages hold no
special token is tokenized as a whole, as before.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

# Stands for one character of a special token's spelling in the second render (a private-use character, not
# the continue mark's, and not whitespace, which templates trim).
NEUTRAL = "\ue001"


def _trie_pattern(words: list[str]) -> str:
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


def _lined_up(text: str, neutral_text: str) -> bool:
    """Whether the two renders differ only where the neutral one has placeholders."""
    if len(text) != len(neutral_text):
        return False
    at = 0
    for run in re.finditer(f"{NEUTRAL}+", neutral_text):
        if text[at : run.start()] != neutral_text[at : run.start()]:
            return False
        at = run.end()
    return text[at:] == neutral_text[at:]


class SpecialTokens:
    """A tokenizer's special tokens, and prompts tokenized with only the template's read as such."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = [t for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special and t.content]
        self.pattern = re.compile(_trie_pattern(sorted({t.content for t in added}))) if added else None
        # A special token that strips the whitespace beside it takes it from the neighbouring text, as the
        # tokenizer does when it reads the whole text.
        self._strips = {t.content: (t.lstrip, t.rstrip) for t in added if t.lstrip or t.rstrip}
        self._warned = False

    def neutral(self, value):
        """``value`` (messages, tools: dicts, lists and strings) with each special token's spelling in its
        strings replaced by placeholders of the same length, and whether any was."""
        found = False

        def walk(item):
            nonlocal found
            if isinstance(item, str):
                if self.pattern is None or self.pattern.search(item) is None:
                    return item
                found = True
                return self.pattern.sub(lambda m: NEUTRAL * len(m.group()), item)
            if isinstance(item, dict):
                return {walk(k): walk(v) for k, v in item.items()}
            if isinstance(item, list | tuple):
                return [walk(v) for v in item]
            return item

        return walk(value), found

    def template_spans(self, text: str, neutral_text: str) -> list[tuple[int, int]] | None:
        """Where the special tokens the template wrote are in ``text``, given the same prompt rendered from the
        neutral messages; None when the template changed the messages' text on the way (then the two renders
        cannot be lined up)."""
        if _lined_up(text, neutral_text):
            return [m.span() for m in self.pattern.finditer(neutral_text)]
        if not self._warned:
            self._warned = True
            log.warning(
                "the chat template changes the messages' text, so special tokens typed in a message cannot be told "
                "from the template's: they are read as special tokens"
            )
        return None

    def encode(self, text: str, spans: list[tuple[int, int]] | None) -> list[int]:
        """``text``'s token ids: special tokens at ``spans`` as themselves, every other spelling of one as
        ordinary text. ``spans`` None: the text as the tokenizer reads it, every special token as itself."""
        tokenizer = self.tokenizer
        if spans is None:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        pieces, specials, at = [], [], 0
        for start, end in spans:
            pieces.append(text[at:start])
            specials.append(text[start:end])
            at = end
        pieces.append(text[at:])
        for n, special in enumerate(specials):
            lstrip, rstrip = self._strips.get(special, (False, False))
            if lstrip:
                pieces[n] = pieces[n].rstrip()
            if rstrip:
                pieces[n + 1] = pieces[n + 1].lstrip()
        kept = [piece for piece in pieces if piece]
        read = iter(tokenizer(kept, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if kept else ()
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if piece:
                ids += next(read)
            if n < len(specials):
                ids.append(tokenizer.convert_tokens_to_ids(specials[n]))
        return ids

    def text_ids(self, text: str) -> list[int]:
        """The ids of text that is all the caller's (a continued answer): special tokens' spellings as text."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
