"""The small frozen objects a chat stream yields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    """Figures for one reply. ``cached_tokens`` counts prompt tokens reused from the session cache; both are
    None where a remote upstream did not say. ``cache_tier`` says where the reused tokens were found: "memory"
    (the session's own cache), "disk" (the cache folder), "shared" (another session's prefix) or None."""

    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int
    ttft_s: float
    tokens_per_s: float
    total_s: float
    cache_tier: str | None = None

    @classmethod
    def timed(
        cls,
        *,
        prompt_tokens: int | None,
        cached_tokens: int | None,
        completion_tokens: int,
        started: float,
        first: float | None,
        last: float | None,
        end: float,
        cache_tier: str | None = None,
    ) -> Stats:
        """Stats from perf_counter stamps: request start, first and last token, end. Decode speed counts the
        tokens after the first over the time between first and last."""
        n = completion_tokens
        return cls(
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=n,
            ttft_s=(first or end) - started,
            tokens_per_s=(n - 1) / (last - first) if first and last and n > 1 and last > first else 0.0,
            total_s=end - started,
            cache_tier=cache_tier if cached_tokens else None,
        )


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token's log-probability under the model, and the likeliest tokens at its place; ``raw`` and
    ``top_raw`` are the tokens' own bytes (a token may hold part of a UTF-8 character, which ``text`` cannot)."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    raw: bytes | None = None
    top_raw: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """One step of a reply: new answer text, new reasoning text, the log-probabilities of the answer tokens
    since the last chunk (when asked for); the last chunk has finish_reason and stats. ``index``: which of a
    request's ``n`` replies it belongs to (``backend.Choices``)."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    stats: Stats | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0
