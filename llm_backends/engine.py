"""Token ids in, token ids out: prefill what the session cache lacks, then decode one token at a time.

The engine knows nothing of text or chat templates. It runs in the caller's thread as a plain generator,
so closing the generator is the cancellation: no thread is left generating.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .session_cache import CacheEntry


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k`` None or 0 disables it."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Picks the next token id from one position's logits (1-D)."""
    logits = logits.float()
    if params.repetition_penalty not in (None, 1.0) and seen_ids is not None and seen_ids.numel():
        scores = logits.gather(0, seen_ids)
        penalty = params.repetition_penalty
        logits = logits.scatter(0, seen_ids, torch.where(scores < 0, scores * penalty, scores / penalty))
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        candidates, candidate_ids = torch.topk(logits, min(params.top_k, logits.numel()))
    else:
        candidates, candidate_ids = torch.sort(logits, descending=True)
    if params.top_p < 1.0:
        probs = torch.softmax(candidates, dim=-1)
        # Keep the smallest head whose mass reaches top_p (the first token is always kept).
        outside = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        candidates = candidates.masked_fill(outside, float("-inf"))
    choice = torch.multinomial(torch.softmax(candidates, dim=-1), 1, generator=generator)
    return int(candidate_ids[choice])


class Engine:
    """Runs one causal LM over session cache entries."""

    def __init__(self, model, *, stop_ids: frozenset[int], prefill_chunk: int = 512, max_checkpoints: int = 4):
        self.model = model
        self.stop_ids = stop_ids
        self.prefill_chunk = prefill_chunk
        self.max_checkpoints = max_checkpoints
        self.device = next(model.parameters()).device

    def new_entry(self) -> CacheEntry:
        config = self.model.config
        return CacheEntry(make_cache=lambda: DynamicCache(config=config), max_checkpoints=self.max_checkpoints)

    @torch.inference_mode()
    def forward(self, entry: CacheEntry, tokens: Sequence[int]) -> torch.Tensor:
        """Feeds ``tokens`` after what the cache holds; returns the last position's logits.

        The ledger grows only once the model has run; a failure mid-forward leaves the cache in an unknown
        state, so the entry is reset rather than trusted.
        """
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        try:
            out = self.model(input_ids=input_ids, past_key_values=entry.cache, use_cache=True, logits_to_keep=1)
        except BaseException:
            entry.reset()
            raise
        entry.ids.extend(tokens)
        return out.logits[0, -1]

    def prefill(self, entry: CacheEntry, tokens: Sequence[int]) -> torch.Tensor:
        """Feeds the uncached prompt tokens in chunks and saves a restore point at the prompt's end."""
        for start in range(0, len(tokens), self.prefill_chunk):
            logits = self.forward(entry, tokens[start : start + self.prefill_chunk])
        entry.save_checkpoint(logits)
        return logits

    def generate(self, prompt_ids: Sequence[int], entry: CacheEntry, params: SamplingParams) -> DecodeRun:
        return DecodeRun(self, list(prompt_ids), entry, params)


class DecodeRun:
    """One reply's decode. Iterating yields token ids (the stop token included, last); afterwards
    ``finish_reason`` is "stop" or "length", ``cached_tokens`` the prompt tokens reused from the entry."""

    def __init__(self, engine: Engine, prompt_ids: list[int], entry: CacheEntry, params: SamplingParams):
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.entry = entry
        self.params = params
        self.cached_tokens = 0
        self.completion_ids: list[int] = []
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[int]:
        engine, params = self.engine, self.params
        self.cached_tokens, logits = self.entry.rewind_for(self.prompt_ids)
        if logits is None:
            logits = engine.prefill(self.entry, self.prompt_ids[self.cached_tokens :])
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(params.seed)
        seen = None
        if params.repetition_penalty not in (None, 1.0):
            seen = torch.tensor(self.prompt_ids, dtype=torch.long, device=logits.device)
        while True:
            with torch.inference_mode():
                token = sample_next(logits, params, seen, generator)
            self.completion_ids.append(token)
            if token in engine.stop_ids:
                self.finish_reason = "stop"
            elif len(self.completion_ids) >= params.max_new_tokens:
                self.finish_reason = "length"
            yield token
            if self.finish_reason:
                return
            if seen is not None:
                seen = torch.cat([seen, torch.tensor([token], device=seen.device)])
            logits = engine.forward(self.entry, [token])
