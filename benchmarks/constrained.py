"""Benchmark: per-token cost of constrained decoding (JSON schema) with xgrammar, llguidance and outlines-core.

    .venv/bin/python benchmarks/constrained.py      # prints compile time and per-token mask cost per library

On the embedded Gemma 3 270M's tokenizer (262k tokens), walks the tokens of a fixed valid JSON answer: per token
the library computes the allowed-token mask, it is applied to a logits row, and the token is accepted. That is
the work constrained decoding adds to each decode step. Then the engine itself (llguidance, the library it
uses): the embedded model's decode speed with and without a schema. Prints figures; asserts nothing.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city", "country", "population", "landmarks"],
    "additionalProperties": False,
}
ANSWER = {"city": "Paris", "country": "France", "population": 2102650, "landmarks": ["Eiffel Tower", "Louvre"]}


def xgrammar_run(tokenizer, vocab_size, ids):
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - started
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    steps = []
    for token in ids:
        logits = torch.randn(vocab_size)
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask[0])
        ok = matcher.accept_token(token)
        steps.append(time.perf_counter() - started)
        assert ok and logits[token] > float("-inf")
    return setup, compile_s, steps


def llguidance_run(tokenizer, vocab_size, ids):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    started = time.perf_counter()
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher = llguidance.LLMatcher(lltokenizer, grammar)
    compile_s = time.perf_counter() - started
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    steps = []
    for token in ids:
        logits = torch.randn(1, vocab_size)
        started = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        ok = matcher.consume_token(token)
        steps.append(time.perf_counter() - started)
        assert ok and logits[0, token] > float("-inf"), matcher.get_error()
    return setup, compile_s, steps


def outlines_run(tokenizer, vocab_size, ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    started = time.perf_counter()
    eos = tokenizer.eos_token_id
    vocab: dict[str, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id != eos:  # outlines matches decoded text, not the tokenizer's own spelling (▁, <0x..>)
            vocab.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(token_id)
    vocabulary = Vocabulary(eos, vocab)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    guide = Guide(index)
    compile_s = time.perf_counter() - started
    steps = []
    for token in ids:
        logits = torch.randn(vocab_size)
        started = time.perf_counter()
        allowed = torch.tensor(guide.get_tokens(), dtype=torch.long)
        mask = torch.full_like(logits, float("-inf"))
        mask[allowed] = 0
        logits += mask
        guide.advance(token)
        steps.append(time.perf_counter() - started)
    return setup, compile_s, steps


def main() -> None:
    from transformers import AutoConfig, AutoTokenizer

    from llm_backends.default_model import default_checkpoint

    folder = default_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = AutoConfig.from_pretrained(folder).get_text_config().vocab_size
    text = json.dumps(ANSWER)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    print(f"tokenizer: {folder.name}, vocab {vocab_size}; answer: {len(ids)} tokens, {len(text)} characters")
    print("| library | tokenizer setup s | schema compile s | per token ms (median) | per token ms (p95) |")
    print("|---|---|---|---|---|")
    for name, run in (("xgrammar", xgrammar_run), ("llguidance", llguidance_run), ("outlines-core", outlines_run)):
        try:
            setup, compile_s, steps = run(tokenizer, vocab_size, ids)
        except Exception as e:  # a library that cannot run here is reported, not fatal
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
            continue
        steps_ms = sorted(s * 1000 for s in steps)
        p95 = steps_ms[int(0.95 * (len(steps_ms) - 1))]
        print(f"| {name} | {setup:.2f} | {compile_s:.3f} | {statistics.median(steps_ms):.3f} | {p95:.3f} |")
    engine()


def engine() -> None:
    from llm_backends import load_model

    model = load_model()
    ask = [{"role": "user", "content": "Describe a city as JSON."}]
    free_schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    runs = {
        "free text": {},
        "json_schema": {
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": free_schema}}
        },
    }
    model.create(ask, max_tokens=4, **runs["json_schema"])  # builds llguidance's view of the tokenizer once
    print()
    print("| embedded model, 64 tokens, temperature 0 | decode tok/s (median of 3) | ms per token |")
    print("|---|---|---|")
    for name, fields in runs.items():
        speeds = []
        for _ in range(3):
            stream = model.stream(model.request(ask, max_new_tokens=64, temperature=0, **fields))
            speeds.append(list(stream)[-1].stats.tokens_per_s)
        speed = statistics.median(speeds)
        print(f"| {name} | {speed:.1f} | {1000 / speed:.1f} |")


if __name__ == "__main__":
    main()
