"""Constrained decoding with llguidance: a reply that must match a JSON schema, or be one forced tool call.

Chosen by measurement (benchmarks/constrained.py, embedded Gemma 3's 262k-token vocabulary, 2-core CPU):
llguidance adds 0.17 ms per token (p95 0.36) and compiles a schema in 7 ms; xgrammar 1.04 ms per token;
outlines-core 0.29 ms median but 24 ms at p95 (it lists allowed tokens in Python when most are allowed).
llguidance reads its tokenizer view once per model (3.4 s for Gemma's vocabulary), on the first constrained
request, not at load.
"""

from __future__ import annotations

import json
import threading

import torch

from . import tools as tool_calls

_BITS = torch.arange(32, dtype=torch.int32)
# JSON written the way json.dumps (and chat templates' tojson) write it: no free whitespace, so a reply is
# compact, a weak model cannot fill its budget with blanks, and a tool call re-renders token for token.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Compiles grammars for one model's tokenizer; the tokenizer view is built on first use and kept."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._tokenizer = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size)
            return self._tokenizer

    def for_request(self, response_format: dict | None, tools: tuple | None, tool_choice: str | None) -> str | None:
        """The llguidance grammar a reply must follow, or None; ValueError if it cannot be compiled."""
        import llguidance

        if tool_choice not in (None, "auto", "none"):
            schema = tool_calls.call_schema(tools, tool_choice)
            grammar = llguidance.grammar_from("lark", self._call_lark(schema))
        elif response_format is not None and response_format.get("type") == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_STYLE)
        elif response_format is not None and response_format.get("type") == "json_schema":
            schema = response_format["json_schema"]["schema"]
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_STYLE)
            except ValueError as e:
                raise ValueError(f"response_format.json_schema.schema cannot be compiled: {e}") from e
        else:
            return None
        failed, messages = self._validate(grammar)
        if failed:
            raise ValueError(f"the schema cannot be enforced: {'; '.join(messages)}")
        return grammar

    def _call_lark(self, schema: dict) -> str:
        # The call is written exactly as the prompt asks for it (tools.call_text's shape).
        return (
            f"start: {json.dumps(tool_calls.OPEN + chr(10))} call {json.dumps(chr(10) + tool_calls.CLOSE)}\n"
            f"call: %json {json.dumps({**schema, 'x-guidance': JSON_STYLE})}\n"
        )

    def _validate(self, grammar: str) -> tuple[bool, list[str]]:
        """(whether it failed, the error or warnings)."""
        import llguidance

        return llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)

    def constraint(self, grammar: str, wait_for: int | None) -> Constraint:
        import llguidance

        return Constraint(llguidance.LLMatcher(self.tokenizer, grammar), self.vocab_size, self.stop_ids, wait_for)


class Constraint:
    """Masks each step's logits to what the grammar allows and follows the tokens chosen. With ``wait_for``
    (the end-of-thinking token) it starts only after that token: reasoning stays free, except that it may not
    end the reply (an answer that must follow a schema has to come). Once the grammar is complete only the
    model's stop tokens remain."""

    def __init__(self, matcher, vocab_size: int, stop_ids: frozenset[int], wait_for: int | None):
        import llguidance.torch

        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bitmask = torch.full(llguidance.torch.get_bitmask_shape(1, vocab_size), -1, dtype=torch.int32)
        self._stops = frozenset(i for i in stop_ids if i < vocab_size)
        self._stop_ids = torch.tensor(sorted(self._stops), dtype=torch.long)
        self._waiting = wait_for
        self._fill = llguidance.torch.fill_next_token_bitmask

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (1-D, on any device) with every token the grammar forbids at -inf; the input is kept."""
        stops = self._stop_ids.to(logits.device)
        if self._waiting is not None:
            return logits.float().index_fill(0, stops, float("-inf"))
        if self._matcher.is_stopped():
            masked = torch.full_like(logits, float("-inf"), dtype=torch.float32)
            masked[stops] = logits[stops].float()
            return masked
        self._fill(self._matcher, self._bitmask, 0)
        # Unpacked eagerly (llguidance's own kernel is torch.compile'd: a compiler and a pause on first use).
        allowed = ((self._bitmask[0].unsqueeze(1) >> _BITS) & 1).flatten()[: logits.shape[0]].bool()
        masked = logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))
        if self._matcher.is_accepting():
            masked[stops] = logits[stops].float()
        return masked

    def advance(self, token: int) -> None:
        if self._waiting is not None:
            if token == self._waiting:
                self._waiting = None
            return
        if token in self._stops:
            return
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding went off its grammar: {self._matcher.get_error()}")
