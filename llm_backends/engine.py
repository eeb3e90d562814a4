"""Token ids in, token ids out: prefill what the session cache lacks, then decode one token at a time.

The engine knows nothing of text or chat templates. It runs in the caller's thread as a plain generator,
so closing the generator is the cancellation: no thread is left generating.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .session_cache import CacheEntry

ROW_ATTENTION = "llm_chat_rows"


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

    batcher: DecodeBatcher | None = None

    def __init__(
        self,
        model,
        *,
        stop_ids: frozenset[int],
        prefill_chunk: int = 512,
        max_checkpoints: int = 4,
        max_batch: int = 16,
    ):
        self.model = model
        self.stop_ids = stop_ids
        self.prefill_chunk = prefill_chunk
        self.max_checkpoints = max_checkpoints
        self.device = next(model.parameters()).device
        # One forward at a time: concurrent prefills and decode batches would only fight over the cores.
        self.compute = threading.Lock()
        self.batcher = DecodeBatcher(self, max_batch) if max_batch > 1 and _use_row_attention(model) else None

    def decode(self, entry: CacheEntry, token: int) -> torch.Tensor:
        """One decode step for one session; concurrent sessions' steps run as one batch."""
        if self.batcher is None:
            return self.forward(entry, [token])
        return self.batcher.step(entry, token)

    @torch.inference_mode()
    def forward_rows(self, entries: Sequence[CacheEntry], tokens: Sequence[int]) -> torch.Tensor:
        """One token for each of several sessions in one forward pass; returns their logits, one row each.

        Every row keeps its own cache and position: the linear layers see a batch, attention runs per row
        over that row's cache. If the pass fails, every entry in it is reset (its cache state is unknown).
        """
        input_ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(e.ids)] for e in entries], dtype=torch.long, device=self.device)
        masks = dict.fromkeys(set(getattr(self.model.config.get_text_config(), "layer_types", None) or ()), None)
        masks.setdefault("full_attention", None)
        try:
            with self.compute, _attention_backends(self.device):
                out = self.model(
                    input_ids=input_ids,
                    position_ids=positions,
                    attention_mask=masks,
                    past_key_values=RowCaches([e.cache for e in entries]),
                    use_cache=True,
                    logits_to_keep=1,
                )
        except BaseException:
            for entry in entries:
                entry.reset()
            raise
        for entry, token in zip(entries, tokens, strict=True):
            entry.ids.append(token)
        return out.logits[:, -1]

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
            with self.compute, _attention_backends(self.device):
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
        if engine.batcher is not None:
            engine.batcher.join()
        try:
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
                logits = engine.decode(self.entry, token)
        finally:
            if engine.batcher is not None:
                engine.batcher.leave()


class RowStates:
    """One layer's keys and values for each row of a batched decode step (rows differ in length)."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values


class RowCaches:
    """Stands in for a transformers Cache in a batched decode step: row i's new key/value go into session
    i's own cache, and the attention sees each row's full states (``RowStates``), not a padded batch."""

    def __init__(self, caches: list):
        self.caches = caches

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = [], []
        for i, cache in enumerate(self.caches):
            k, v = cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx)
            keys.append(k)
            values.append(v)
        states = RowStates(keys, values)
        return states, states


def _row_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, except that a batched decode step (``RowStates``) attends row by row over each row's cache.

    A decode row attends to everything its cache returns: full layers hold the whole history and sliding
    layers return exactly the last window, so no mask is needed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, RowStates):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = [
        sdpa_attention_forward(module, query[i : i + 1], k, v, None, **kwargs)[0]
        for i, (k, v) in enumerate(zip(key.keys, key.values, strict=True))
    ]
    return torch.cat(rows, dim=0), None


def _use_row_attention(model) -> bool:
    """Switches an sdpa model to the row-aware attention (registered once); False where it cannot."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", ROW_ATTENTION):
        return False
    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
    model.set_attn_implementation(ROW_ATTENTION)
    return True


def _attention_backends(device: torch.device):
    """On CUDA, sdpa's math kernel only. The flash / memory-efficient kernels sum in an order that depends on
    the query and key lengths, so a prompt read in two parts (reuse) and in one (fresh) drifted apart and
    changed greedy answers of the tiny test models on an H100; the math kernel kept them equal there (fp32
    and bf16). cuDNN's kernel also plans anew for every key length, which halved decode speed."""
    from contextlib import nullcontext

    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@dataclass(eq=False)
class _Step:
    entry: CacheEntry
    token: int
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class DecodeBatcher:
    """Runs concurrent sessions' decode steps as one forward pass, without a thread of its own.

    A session asking for a step joins the pending list. If no step is running, it leads: it waits a moment
    (at most ``gather_s``) for the other decoding sessions to ask too, takes up to ``max_batch`` pending
    steps, runs them, hands each its logits, and passes the lead to the oldest step still pending. So the
    work happens in the callers' threads and one session alone never waits.
    """

    def __init__(self, engine: Engine, max_batch: int, gather_s: float = 0.01):
        self.engine = engine
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._lock = threading.Condition()
        self._pending: list[_Step] = []
        self._running = False
        self._decoding = 0  # sessions between their first and last decode step
        self.batches = 0
        self.rows = 0

    def join(self) -> None:
        with self._lock:
            self._decoding += 1

    def leave(self) -> None:
        with self._lock:
            self._decoding -= 1
            self._lock.notify_all()

    def step(self, entry: CacheEntry, token: int) -> torch.Tensor:
        step = _Step(entry, token)
        with self._lock:
            self._pending.append(step)
            self._lock.notify_all()
            if self._running:
                lead = False
            else:
                self._running = lead = True
        if not lead:
            step.done.wait()
            if not step.lead:
                return self._result(step)
        try:
            while step.logits is None and step.error is None:
                self._run(self._take())
        finally:  # whatever happens, the lead passes on: a lost lead would stall every session
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.done.set()
                else:
                    self._running = False
        return self._result(step)

    def _take(self) -> list[_Step]:
        deadline = time.monotonic() + self.gather_s
        with self._lock:
            while len(self._pending) < min(self._decoding, self.max_batch):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            return batch

    def _run(self, batch: list[_Step]) -> None:
        try:
            logits = self.engine.forward_rows([s.entry for s in batch], [s.token for s in batch])
        except BaseException as e:
            for s in batch:
                s.error = e
        else:
            for i, s in enumerate(batch):
                s.logits = logits[i]
        self.batches += 1
        self.rows += len(batch)
        for s in batch:
            s.lead = False
            s.done.set()

    @staticmethod
    def _result(step: _Step) -> torch.Tensor:
        if step.error is not None:
            raise step.error
        return step.logits
