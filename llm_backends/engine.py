"""Token ids in, token ids out: prefill what the session cache lacks, then decode one token at a time.

The engine knows nothing of text, chat templates or which library runs the model: a ``Runner`` (transformers
in ``transformers_backend.py``, mlx-lm in ``mlx_backend.py``) feeds tokens into a cache entry and returns
logits. Negative ids stand for image tokens (``images.py``): a prefill piece never splits an image, and the
runner is handed the images their pseudo ids name. It runs in the caller's thread as a plain generator, so
closing the generator, or setting the cancel event it was given, stops it before its next forward pass: no
thread is left generating.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch

from . import images as image_tokens
from .batching import Arrival
from .request import SamplingParams
from .sampling import Sampler
from .session_cache import CacheEntry

# Prompt tokens read per piece while other replies decode: on the 2-core machine of docs/benchmarks.md a piece
# of 64 takes ~60 ms, so their tokens keep coming at a few per second of the new prompt (benchmarks/arrivals.py).
# Where the runner can (the C++ decode step), such a piece shares the others' next step instead of alternating.
SHARED_CHUNK = 64


class Runner(Protocol):
    """What the engine needs from the library that runs the model."""

    def new_entry(self) -> CacheEntry:
        """An empty cache entry for this model."""

    def forward(
        self, entry: CacheEntry, tokens: Sequence[int], *, logits: bool = True, images: Mapping | None = None
    ) -> torch.Tensor | None:
        """Feeds ``tokens`` after what ``entry`` holds; returns the last position's logits (1-D, on CPU or the
        model's device), or None with ``logits=False`` (the output head is skipped). ``images`` maps the keys
        of the images whose (whole) pseudo-id runs are in ``tokens`` to ``images.Image``. On failure the entry
        is reset, since its cache state is unknown."""

    def decode(self, entry: CacheEntry, token: int, *, greedy: bool = False) -> tuple[torch.Tensor, int | None]:
        """One decode step (may share a forward pass with other sessions' steps): the logits and, with ``greedy``,
        where the runner picked it in the shared pass, their argmax (torch.argmax's answer); else None."""

    def decoding(self) -> AbstractContextManager:
        """Held by a reply from its first to its last decode step (so a batcher knows whom to wait for)."""

    def others_decoding(self) -> bool:
        """Whether other replies are decoding now (a prefill then goes in small pieces between their steps)."""

    def arrival(self) -> Arrival:
        """Announces a new reply, from its request on (``batching.Arrival``): ``bind`` it to the reply's cache
        entry, ``close`` it when the reply ends; a batcher waits a moment for the reply's first step."""


class Engine:
    """Prefill and the decode loop over one runner's cache entries. ``token_text`` (a token id's text) is what
    the sampler reads DRY's sequence breakers from; the engine itself knows no text."""

    def __init__(
        self,
        runner: Runner,
        *,
        stop_ids: frozenset[int],
        prefill_chunk: int = 512,
        shared_chunk: int = SHARED_CHUNK,
        token_text: Callable[[int], str] | None = None,
    ):
        self.runner = runner
        self.stop_ids = stop_ids
        self.token_text = token_text
        self.prefill_chunk = prefill_chunk
        self.shared_chunk = shared_chunk

    def new_entry(self) -> CacheEntry:
        return self.runner.new_entry()

    def prefill(
        self,
        entry: CacheEntry,
        tokens: Sequence[int],
        cancel: threading.Event | None = None,
        boundaries: Sequence[int] = (),
        images: Mapping | None = None,
    ) -> torch.Tensor | None:
        """Feeds the uncached prompt tokens in pieces of at most ``prefill_chunk`` (``shared_chunk`` while other
        replies decode, whose steps go between the pieces; longer where that would split an image, which is read
        in one piece) that also end at each of ``boundaries`` (offsets into ``tokens`` where a turn begins),
        saving a restore point at each boundary and at the prompt's end. Returns the last logits, or None if
        ``cancel`` was set between two pieces."""
        logits = None
        extra = {"images": images} if images else {}
        stops = sorted({b for b in boundaries if 0 < b < len(tokens)} | {len(tokens)})
        start = 0
        for stop in stops:
            while start < stop:
                if cancel is not None and cancel.is_set():
                    return None
                piece = self.shared_chunk if self.runner.others_decoding() else self.prefill_chunk
                end = image_tokens.cut_after(tokens, min(start + piece, stop))
                logits = self.runner.forward(entry, tokens[start:end], logits=end == len(tokens), **extra)
                start = end
            if stop < len(tokens):
                entry.save_checkpoint(None)
        entry.save_checkpoint(logits)
        return logits

    def generate(
        self,
        prompt_ids: Sequence[int],
        entry: CacheEntry,
        params: SamplingParams,
        cancel: threading.Event | None = None,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        boundaries: Sequence[int] = (),
        images: Mapping | None = None,
        answer_ids: Sequence[int] = (),
        prompt_read: Callable[[CacheEntry, torch.Tensor], None] | None = None,
    ) -> DecodeRun:
        """A reply's decode; ``boundaries`` are positions in the prompt where turns begin (restore points),
        ``images`` what the prompt's image tokens name (key -> ``images.Image``), ``answer_ids`` the end of the
        prompt that is an answer the reply continues (``sampling.Sampler``); ``prompt_read(entry, logits)`` is called
        once the entry holds the whole prompt, before the first token is picked."""
        cancel = cancel or threading.Event()
        return DecodeRun(
            self,
            list(prompt_ids),
            entry,
            params,
            cancel,
            constraint,
            logprobs,
            tuple(boundaries),
            images,
            answer_ids,
            prompt_read,
        )


class Constraint(Protocol):
    """Restricts which tokens may come next (constrained decoding)."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with forbidden tokens at -inf (a new tensor; the input is kept)."""

    def advance(self, token: int) -> None:
        """Follows the token that was chosen."""


class ThinkingBudget:
    """A Constraint that lets reasoning run for at most ``budget`` tokens, then makes the model write
    ``cutoff`` (token ids ending with ``end_id``, the end-of-thinking token) one forced token at a time, so the
    cache and its ledger hold exactly what was written. ``inner`` (a grammar waiting for the end of thinking)
    sees every token and applies after it."""

    def __init__(self, budget: int, cutoff: Sequence[int], end_id: int, inner: Constraint | None = None):
        self.left = budget
        self.cutoff = tuple(cutoff)
        self.end_id = end_id
        self.inner = inner
        self.forced: int | None = None  # index into cutoff while writing it
        self.done = False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.done or self.forced is None:
            return logits if self.inner is None else self.inner.mask(logits)
        only = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        only[self.cutoff[self.forced]] = 0.0
        return only

    def advance(self, token: int) -> None:
        if not self.done:
            if token == self.end_id:  # written by the model or forced: the reasoning is over
                self.done = True
            elif self.forced is not None:
                self.forced += 1
            else:
                self.left -= 1
                if self.left <= 0:
                    self.forced = 0
        if self.inner is not None:
            self.inner.advance(token)


class DecodeRun:
    """One reply's decode. Iterating yields token ids (the stop token included, last); afterwards
    ``finish_reason`` is "stop", "length" or "cancelled", ``cached_tokens`` the prompt tokens reused.
    With ``logprobs`` N, ``logprobs[i]`` is (log-probability of token i, its N likeliest (id, log-prob)), from
    the model's own distribution (before sampling settings and constraints)."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        entry: CacheEntry,
        params: SamplingParams,
        cancel: threading.Event,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        boundaries: tuple[int, ...] = (),
        images: Mapping | None = None,
        answer_ids: Sequence[int] = (),
        prompt_read: Callable[[CacheEntry, torch.Tensor], None] | None = None,
    ):
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if params.temperature is None or params.top_p is None:
            raise ValueError("a local model needs concrete sampling values (build the request with its family)")
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.entry = entry
        self.params = params
        self.cancel = cancel
        self.constraint = constraint
        self.top_logprobs = logprobs
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.boundaries = boundaries
        self.images = images
        self.answer_ids = tuple(answer_ids)
        self.prompt_read = prompt_read
        self.cached_tokens = 0
        self.completion_ids: list[int] = []
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[int]:
        engine, params = self.engine, self.params
        self.cached_tokens, logits = self.entry.rewind_for(self.prompt_ids)
        while logits is None and image_tokens.cut_before(self.prompt_ids, self.cached_tokens) < self.cached_tokens:
            # The cache ends inside an image: it is read again whole (its tokens attend to each other).
            self.cached_tokens = self.entry.rewind_to(image_tokens.cut_before(self.prompt_ids, self.cached_tokens))
        if logits is None:
            cached = self.cached_tokens
            boundaries = [b - cached for b in self.boundaries if b > cached]
            logits = engine.prefill(self.entry, self.prompt_ids[cached:], self.cancel, boundaries, self.images)
        if logits is None:
            self.finish_reason = "cancelled"
            return
        if self.prompt_read is not None:
            self.prompt_read(self.entry, logits)
        sampler = Sampler(params, logits.device, self.prompt_ids, self.answer_ids, engine.token_text)
        best = None
        # The plain greedy pick is the argmax of the logits themselves: the runner may pick it in its shared pass.
        greedy = sampler.plain_greedy and self.constraint is None
        with engine.runner.decoding():
            while True:
                with torch.inference_mode():
                    scores = logits if self.constraint is None else self.constraint.mask(logits)
                    token = best if best is not None else sampler.pick(scores)
                    if self.top_logprobs is not None:
                        self.logprobs.append(_logprobs(logits, token, self.top_logprobs))
                if self.constraint is not None:
                    self.constraint.advance(token)
                self.completion_ids.append(token)
                if token in engine.stop_ids:
                    self.finish_reason = "stop"
                elif len(self.completion_ids) >= params.max_new_tokens:
                    self.finish_reason = "length"
                yield token
                if self.finish_reason:
                    return
                if self.cancel.is_set():
                    self.finish_reason = "cancelled"
                    return
                sampler.said(token)
                logits, best = engine.runner.decode(self.entry, token, greedy=greedy)


def _logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    scores = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(scores, top) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return float(scores[token]), pairs
