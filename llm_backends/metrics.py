"""Prometheus metrics for one server (its own CollectorRegistry, so several servers in a process never mix).

Every reply the page or /v1 starts goes through ``Metrics.track``, which counts it when it ends; the cache
figures are read from the served model when Prometheus scrapes ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .backend import ChatModel, ChatStream, Choices
from .chunks import Chunk

# Where a reply's reused tokens came from (Stats.cache_tier): memory, host (RAM, for a GPU), disk or shared (another
# session's prefix). A backend that does not say (a remote server's) counts as memory.
MEMORY = "memory"


class Metrics:
    """Counters, histograms and gauges for replies; ``model()`` returns the served model or None."""

    def __init__(self, model: Callable[[], ChatModel | None]):
        self.registry = CollectorRegistry()
        self._model = model
        self.replies = Counter(
            "llm_replies",
            "Replies ended, by door and finish reason ('error' when one failed)",
            ["door", "finish"],
            registry=self.registry,
        )
        self.http_errors = Counter(
            "llm_http_errors", "Requests refused or failed at /v1, by HTTP status", ["status"], registry=self.registry
        )
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.cached_tokens = Counter(
            "llm_cached_tokens", "Prompt tokens reused from a cache, by tier", ["tier"], registry=self.registry
        )
        self.cache_hits = Counter(
            "llm_cache_hits", "Replies that reused at least one cached token, by tier", ["tier"], registry=self.registry
        )
        self.completion_tokens = Counter("llm_completion_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Time from a request to its first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.speed = Histogram(
            "llm_decode_tokens_per_second",
            "Decode speed of each reply",
            buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500),
            registry=self.registry,
        )
        self.active = Gauge("llm_active_streams", "Replies being generated now", registry=self.registry)
        self.registry.register(_CacheCollector(model))

    def track(self, stream: ChatStream, door: str) -> ChatStream:
        """The same reply (or a request's ``n`` replies, ``Choices``), counted: active while it streams, each
        reply's figures observed when it ends; a request's prompt counts once (its first reply's)."""
        replies = len(stream.streams) if isinstance(stream, Choices) else 1

        def counted() -> Iterator[Chunk]:
            self.active.inc()
            ended, unfinished = set(), "error"
            try:
                for chunk in stream:
                    if chunk.finish_reason is not None:
                        ended.add(chunk.index)
                        self.observe(chunk, prompt=chunk.index == 0)
                        self.replies.labels(door, chunk.finish_reason).inc()
                    yield chunk
            except GeneratorExit:  # closed before its last chunk: Stop, or a client that left
                unfinished = "cancelled"
                raise
            finally:
                stream.close()
                self.active.dec()
                if replies > len(ended):
                    self.replies.labels(door, unfinished).inc(replies - len(ended))

        return ChatStream(
            counted(),
            stream.cancel_event,
            prompt_tokens=stream.prompt_tokens,
            dropped_turns=stream.dropped_turns,
            on_close=stream.close,
        )

    def observe(self, chunk: Chunk, prompt: bool = True) -> None:
        """A reply's figures; its prompt's (read and reused tokens) only with ``prompt``."""
        stats = chunk.stats
        if stats is None:
            return
        if prompt and stats.prompt_tokens is not None:
            self.prompt_tokens.inc(stats.prompt_tokens)
        if prompt and stats.cached_tokens:
            tier = stats.cache_tier or MEMORY
            self.cached_tokens.labels(tier).inc(stats.cached_tokens)
            self.cache_hits.labels(tier).inc()
        self.completion_tokens.inc(stats.completion_tokens)
        if stats.completion_tokens:
            self.ttft.observe(stats.ttft_s)
        if stats.tokens_per_s:
            self.speed.observe(stats.tokens_per_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """The served model's session caches, read at scrape time."""

    def __init__(self, model: Callable[[], ChatModel | None]):
        self._model = model

    def collect(self):
        model = self._model()
        info = model.cache_info() if model is not None else {}
        held = GaugeMetricFamily("llm_cache_bytes", "Bytes held by session caches, by tier", labels=["tier"])
        sessions = GaugeMetricFamily("llm_cache_sessions", "Sessions holding a cache, by tier", labels=["tier"])
        tiers = {MEMORY: info, "host": info.get("host"), "disk": info.get("disk")}
        for tier, figures in tiers.items():
            if figures is not None:  # a tier this model has
                held.add_metric([tier], figures.get("bytes", 0))
                sessions.add_metric([tier], figures.get("sessions", 0))
        yield held
        yield sessions
        yield GaugeMetricFamily(
            "llm_cache_budget_bytes", "Byte budget of the session caches", value=info.get("budget_bytes", 0)
        )
