"""Picking each next token from one position's logits: OpenAI's settings, in transformers' (and llama.cpp's) order.

In order: ``logit_bias`` is added; the repetition penalty (transformers' ``repetition_penalty``) scales the
logits of every token in the prompt and the reply; the presence and frequency penalties (OpenAI's) lower a
token's logit by ``presence_penalty`` once it is in the reply and by ``frequency_penalty`` each time it is
there. Then the argmax (temperature 0), or temperature, top-k, top-p and min-p (a token stays if its
probability is at least ``min_p`` times the likeliest's) and a draw. A ``Sampler`` is built once per reply, so
a step does no work it could do once. Top-p and min-p without top-k look at the likeliest few hundred tokens
first, more only where those do not decide the cut, and sort the whole vocabulary only for a nearly flat one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import cpu_kernels
from .request import SamplingParams


class Sampler:
    """One reply's token picking: ``pick(logits)`` at each step, ``said(token)`` for each token the reply
    writes. ``prompt_ids`` are what the repetition penalty sees before the reply; ``answer_ids`` the tokens of an
    answer the reply continues, which count as the reply's own for the presence and frequency penalties (so a
    continued answer picks as the whole answer would have)."""

    def __init__(
        self,
        params: SamplingParams,
        device: torch.device | str,
        prompt_ids: Sequence[int] = (),
        answer_ids: Sequence[int] = (),
    ):
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self.bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )
        # The distinct tokens of the prompt and the reply (the repetition penalty), grown by new ones only. Image
        # tokens (negative pseudo ids) are no vocabulary entries: only text is penalised.
        self.seen = None
        self._seen: set[int] = set()
        if params.repetition_penalty not in (None, 1.0):
            self._seen = {t for t in prompt_ids if t >= 0}
            self.seen = torch.tensor(sorted(self._seen), dtype=torch.long, device=device)
        self.counted = bool(params.presence_penalty or params.frequency_penalty)
        # What the presence and frequency penalties take off each token's logit, kept up to date one token at a
        # time; vocabulary-wide, made at the first pick (when the logits' width is known).
        self.penalties: torch.Tensor | None = None
        self._present: set[int] = set()
        self._pending = [t for t in answer_ids if t >= 0] if self.counted else []

    @property
    def plain_greedy(self) -> bool:
        """Whether the pick is the argmax of the logits themselves (a runner may pick it in its shared pass)."""
        return self.params.temperature == 0 and self.seen is None and self.bias is None and not self.counted

    def said(self, token: int) -> None:
        """The reply wrote ``token``."""
        if self.seen is not None and token not in self._seen:
            self._seen.add(token)
            self.seen = torch.cat([self.seen, torch.tensor([token], device=self.seen.device)])
        if self.counted:
            if self.penalties is None:
                self._pending.append(token)
            else:
                self._count(token)

    def _count(self, token: int) -> None:
        step = self.params.frequency_penalty or 0.0
        if token not in self._present:
            self._present.add(token)
            step += self.params.presence_penalty or 0.0
        with torch.inference_mode():  # the tensor was made in the decode loop's inference mode
            self.penalties[token] += step

    def pick(self, logits: torch.Tensor) -> int:
        """The next token id from one position's logits (1-D; left as they are)."""
        params = self.params
        logits = logits.float()
        if self.bias is not None:
            logits = logits.index_add(0, *self.bias)
        if self.seen is not None and self.seen.numel():
            scores = logits.gather(0, self.seen)
            penalty = params.repetition_penalty
            logits = logits.scatter(0, self.seen, torch.where(scores < 0, scores * penalty, scores / penalty))
        if self.counted:
            if self.penalties is None:
                self.penalties = torch.zeros_like(logits)
                for token in self._pending:
                    self._count(token)
                self._pending = []
            logits = logits - self.penalties
        if params.temperature == 0:
            return cpu_kernels.argmax(logits)
        ids, weights = self.candidates(logits)
        index = self._draw(weights)
        return index if ids is None else int(ids[index])

    def candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What a draw chooses from after temperature, top-k, top-p and min-p: token ids (None: the whole
        vocabulary, in id order) and their weights (probabilities, 0 for a token cut)."""
        params = self.params
        if params.top_k:
            # The temperature divides the k kept only: a positive divisor keeps the logits' order.
            values, ids = cpu_kernels.topk(logits, min(params.top_k, logits.numel()))
            probs = torch.softmax(values / params.temperature, dim=-1)
        elif params.top_p < 1.0 or params.min_p:
            ids, probs = _head(logits / params.temperature, params.top_p, params.min_p or 0.0)
        else:
            return None, torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            # Keep the smallest head whose mass reaches top_p (the first token is always kept).
            probs = probs.masked_fill((torch.cumsum(probs, dim=-1) - probs) > params.top_p, 0.0)
        if params.min_p:
            # Relative to the likeliest token (first, and kept by top-p): top-p's cut does not move this one.
            probs = probs.masked_fill(probs < params.min_p * probs[0], 0.0)
        return ids, probs

    def _draw(self, weights: torch.Tensor) -> int:
        """An index drawn with probability proportional to ``weights`` (1-D, non-negative, not all zero): one
        uniform number against their running sum (torch.multinomial takes ~5 ms over a 262k vocabulary on a CPU;
        this, ~0.5 ms)."""
        running = torch.cumsum(weights, dim=-1, dtype=torch.float64)
        point = torch.rand((), generator=self.generator, dtype=torch.float64, device=weights.device) * running[-1]
        # The first index whose running sum passes the point: never one of weight 0.
        return min(int(torch.searchsorted(running, point, right=True)), weights.numel() - 1)


HEADS = (256, 2048, 16384)  # tokens looked at for top-p or min-p without top-k, until they decide the cut


def _head(logits: torch.Tensor, top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The likeliest tokens, enough of them that top-p or min-p cuts every other one, as (ids, probabilities
    over the whole vocabulary), likeliest first: a full sort (~16 ms for 262k tokens on a CPU, more than a
    decode step) only where 16,384 tokens do not decide it (a nearly flat distribution)."""
    total = torch.logsumexp(logits, dim=-1)
    for size in HEADS:
        if size >= logits.numel():
            break
        values, ids = torch.topk(logits, size)
        probs = torch.exp(values - total)
        # Every token past the head comes after all of its mass, and is no likelier than its last.
        if (top_p < 1.0 and probs.sum() > top_p) or (min_p and probs[-1] < min_p * probs[0]):
            return ids, probs
    values, ids = torch.sort(logits, descending=True)
    return ids, torch.exp(values - total)
