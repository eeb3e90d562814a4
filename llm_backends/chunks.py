"""The small frozen objects a chat stream yields."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Stats:
    """Figures for one reply. ``cached_tokens`` counts prompt tokens reused from the session cache."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    tokens_per_s: float
    total_s: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One step of a reply: new answer text, new reasoning text; the last chunk has finish_reason and stats."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    stats: Stats | None = None
