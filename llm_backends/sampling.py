"""Picking each next token from one position's logits: OpenAI's settings, in transformers' (and llama.cpp's) order.

In order: ``logit_bias`` is added; the repetition penalty (transformers' ``repetition_penalty``) scales the
logits of every token in the prompt and the reply; the presence and frequency penalties (OpenAI's) lower a
token's logit by ``presence_penalty`` once it is in the reply and by ``frequency_penalty`` each time it is
there; DRY lowers each token that would extend a repeat of an earlier passage (below). Then the argmax
(temperature 0), or temperature, top-k, top-p and min-p (a token stays if its probability is at least ``min_p``
times the likeliest's), XTC (below) and a draw. A ``Sampler`` is built once per reply, so a step does no work
it could do once.

DRY ("don't repeat yourself", as llama.cpp and text-generation-webui have it): where the context's last tokens
also stand earlier, followed there by token x, and that repeat is at least ``dry_allowed_length`` tokens long,
x's logit loses ``dry_multiplier * dry_base ** (length - dry_allowed_length)``. A token whose text holds one of
``dry_sequence_breakers`` (a newline, a colon, ...) ends every repeat, so a template's turn markers and the
lines of a list are not repeats. The context is the prompt and the reply, its last ``dry_penalty_last_n``
tokens (-1: all). XTC ("exclude top choices"): at each step, with probability ``xtc_probability``, every token at
least ``xtc_threshold`` likely except the least likely of them is cut, when two or more are.

Top-p and min-p without top-k look at the likeliest few hundred tokens first, more only where those do not decide
the cut, and sort the whole vocabulary only for a nearly flat one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import cpu_kernels
from .request import SamplingParams


class Sampler:
    """One reply's token picking: ``pick(logits)`` at each step, ``said(token)`` for each token the reply
    writes. ``prompt_ids`` are what the repetition penalty sees before the reply; ``answer_ids`` the tokens of an
    answer the reply continues, which count as the reply's own for the presence and frequency penalties (so a
    continued answer picks as the whole answer would have). ``token_text`` gives a token's text (DRY's
    sequence breakers are read from it)."""

    def __init__(
        self,
        params: SamplingParams,
        device: torch.device | str,
        prompt_ids: Sequence[int] = (),
        answer_ids: Sequence[int] = (),
        token_text: Callable[[int], str] | None = None,
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
        self.dry = None
        if params.dry_multiplier and params.dry_penalty_last_n != 0:
            self.dry = Repeats(params, prompt_ids, token_text or (lambda token: ""))
        # XTC cuts nothing above a threshold of one half (at most one choice is that likely), and is off for greedy.
        # Its chance has a generator of its own (seeded from the reply's seed), so turning it on changes a seeded
        # reply's draws only where it cuts.
        self.xtc = None
        if params.xtc_probability and params.temperature != 0 and params.xtc_threshold <= 0.5:
            self.xtc = torch.Generator(device=device)
            if params.seed is None:
                self.xtc.seed()
            else:
                self.xtc.manual_seed(params.seed ^ XTC_SEED)

    @property
    def plain_greedy(self) -> bool:
        """Whether the pick is the argmax of the logits themselves (a runner may pick it in its shared pass)."""
        return (
            self.params.temperature == 0
            and self.seen is None
            and self.bias is None
            and not self.counted
            and self.dry is None
        )

    def said(self, token: int) -> None:
        """The reply wrote ``token``."""
        if self.dry is not None:
            self.dry.add(token)
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
        if self.dry is not None:
            found = self.dry.penalties()
            if found is not None:
                tokens, amounts = found
                logits = logits.index_add(
                    0,
                    torch.from_numpy(tokens).to(logits.device),
                    torch.from_numpy(-amounts).to(device=logits.device, dtype=logits.dtype),
                )
        if params.temperature == 0:
            return cpu_kernels.argmax(logits)
        ids, weights = self.candidates(logits)
        if self.xtc is not None:
            chance = torch.rand((), generator=self.xtc, dtype=torch.float64, device=weights.device)
            if float(chance) < params.xtc_probability:
                weights = _exclude_top_choices(weights, params.xtc_threshold, params.temperature)
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


XTC_SEED = 0x5854_4300  # XTC's generator: the reply's seed, xored with this


def _exclude_top_choices(weights: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    """XTC: of the choices still kept (weight above 0) whose probability before the temperature (llama.cpp takes
    it there) is at least ``threshold`` of the kept ones', all but the least likely are cut, when two or more
    are (a new tensor). ``weights`` are softmax(logits / temperature), so their power ``temperature`` gives back
    the untempered probabilities' proportions."""
    kept = weights > 0
    share = weights.double().pow(temperature)
    top = kept & (share >= threshold * share.sum())
    if int(top.sum()) < 2:
        return weights
    kept = int(torch.argmin(weights.masked_fill(~top, float("inf"))))
    return weights.masked_fill(top & (torch.arange(weights.numel(), device=weights.device) != kept), 0.0)


# DRY's penalty grows no further once dry_base ** (length - allowed length) passes this (it stays finite: a
# token it lowers may still be the only one a grammar allows), and a step looks at the most recent places of the
# last token only (a long loop of a few tokens puts thousands of them in the context).
DRY_MAX_GROWTH = 1e6
DRY_MAX_PLACES = 4096


def _max_excess(base: float) -> int:
    """How far past the allowed length a repeat's length still raises DRY's penalty."""
    return 0 if base <= 1.0 else math.ceil(math.log(DRY_MAX_GROWTH) / math.log(base))


class Repeats:
    """DRY's view of the context (the prompt, then each token the reply writes): which next tokens would extend a
    repeat of an earlier passage, and by how much to lower each. A token holding a sequence breaker, or part of
    one whose text runs on into the next tokens (a name spelled in several tokens), ends repeats."""

    def __init__(self, params: SamplingParams, context: Sequence[int], token_text: Callable[[int], str]):
        self.multiplier = params.dry_multiplier
        self.base = params.dry_base
        self.allowed = params.dry_allowed_length
        self.excess = _max_excess(self.base)
        last_n = params.dry_penalty_last_n
        self.window = last_n if last_n and last_n > 0 else None
        self.breakers = tuple(params.dry_sequence_breakers or ())
        self._text = token_text
        self._reach = max(map(len, self.breakers), default=1) - 1  # characters a breaker reaches back
        self._tail = ""  # the context's last characters, up to _reach of them, and the position each came from
        self._owners: list[int] = []
        self.tokens = np.zeros(max(64, 2 * len(context)), dtype=np.int64)
        self.breaks = np.zeros(self.tokens.size, dtype=bool)
        self.size = 0
        for token in context:
            self.add(token)

    def add(self, token: int) -> None:
        if self.size == self.tokens.size:
            self.tokens = np.concatenate([self.tokens, np.zeros_like(self.tokens)])
            self.breaks = np.concatenate([self.breaks, np.zeros_like(self.breaks)])
        at = self.size
        self.tokens[at] = token
        self.size += 1
        if token < 0:  # an image token (a pseudo id) is no text: it ends repeats, and breakers do not span it
            self.breaks[at], self._tail, self._owners = True, "", []
            return
        text = self._text(token)
        window, owners = self._tail + text, self._owners + [at] * len(text)
        for breaker in self.breakers:
            found = window.find(breaker)
            while found != -1:
                if found + len(breaker) > len(self._tail):  # it reaches into this token
                    self.breaks[owners[found : found + len(breaker)]] = True
                found = window.find(breaker, found + 1)
        if self._reach:
            self._tail, self._owners = window[-self._reach :], owners[-self._reach :]

    def penalties(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The tokens to lower and by how much (float32), or None where no repeat is long enough."""
        start = 0 if self.window is None else max(0, self.size - self.window)
        tokens, breaks = self.tokens[start : self.size], self.breaks[start : self.size]
        if tokens.size < 2 or breaks[-1]:
            return None
        # Each earlier place of the last token, followed there by a token that is no breaker, starts a repeat one
        # long; it grows while the tokens before both places agree and are no breakers.
        places = np.flatnonzero(tokens[:-1] == tokens[-1])[-DRY_MAX_PLACES:]
        places = places[~breaks[places + 1]]
        length = np.ones(places.size, dtype=np.int64)
        growing = np.ones(places.size, dtype=bool)
        end = tokens.size - 1
        for back in range(1, self.allowed + self.excess):
            earlier = places - back
            growing &= earlier >= 0
            if not growing.any():
                break
            at = earlier[growing]
            same = (tokens[at] == tokens[end - back]) & ~breaks[at]
            growing[growing] = same
            length += growing
        long = length >= self.allowed
        if not long.any():
            return None
        following, length = tokens[places[long] + 1], length[long]
        order = np.lexsort((-length, following))  # per following token, its longest repeat first
        following, length = following[order], length[order]
        first = np.ones(following.size, dtype=bool)
        first[1:] = following[1:] != following[:-1]
        excess = np.minimum(length[first] - self.allowed, self.excess)
        return following[first], (self.multiplier * self.base**excess).astype(np.float32)


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
