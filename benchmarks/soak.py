"""Reliability soak: longer versions of tests/test_hardening.py, printing figures for docs/reliability.md.

    .venv/bin/python benchmarks/soak.py [--cycles 1000] [--sessions 1000] [--parallel 32]

Uses a tiny random Qwen 3 built on the spot (the figures are about the serving machinery, not the model).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llm_backends import load_model  # noqa: E402
from tiny_models import build_qwen3  # noqa: E402

GREEDY = {"temperature": 0, "max_new_tokens": 12, "enable_thinking": False}


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def parallel(model, n: int) -> dict:
    prompts = [f"Question {i}: tell me about {i * 7} and the sea." for i in range(n)]

    def ask(i, session):
        return "".join(
            c.text for c in model.stream_chat([{"role": "user", "content": prompts[i]}], session_id=session, **GREEDY)
        )

    reference = [ask(i, None) for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda i: ask(i, f"p{i}"), range(n)))
    return {
        "sessions": n,
        "mismatches": sum(a != b for a, b in zip(answers, reference, strict=True)),
        "seconds": round(time.perf_counter() - started, 2),
    }


def eviction(folder: str, n: int, budget: int) -> dict:
    model = load_model(folder, max_cache_bytes=budget)
    peak = 0
    for i in range(n):
        list(
            model.stream_chat(
                [{"role": "user", "content": f"Session {i} says hello to the sea."}], session_id=f"e{i}", **GREEDY
            )
        )
        peak = max(peak, model.cache_info()["bytes"])
    info = model.cache_info()
    messages = [{"role": "user", "content": "Session 0 says hello to the sea."}]
    again = "".join(c.text for c in model.stream_chat(messages, session_id="e0", **GREEDY))
    fresh = "".join(c.text for c in model.stream_chat(messages, **GREEDY))
    return {
        "sessions": n,
        "budget_bytes": budget,
        "peak_bytes": peak,
        "held": info["sessions"],
        "evictions": info["evictions"],
        "evicted_session_exact": again == fresh,
    }


def start_stop(model, cycles: int) -> dict:
    process = psutil.Process()
    messages = [{"role": "user", "content": "Tell me a long story about the sea."}]

    def cycle(i):
        stream = model.stream_chat(messages, session_id=f"c{i % 8}", max_new_tokens=500, temperature=0.8)
        for _ in itertools.islice(stream, 2):  # a couple of chunks (a sampled stop token may end it sooner)
            pass
        stream.close()

    for i in range(20):
        cycle(i)
    gc.collect()
    threads, rss = threading.active_count(), process.memory_info().rss
    started = time.perf_counter()
    for i in range(cycles):
        cycle(i)
    gc.collect()
    after = list(model.stream_chat(messages, session_id="c0", temperature=0, max_new_tokens=8))
    return {
        "cycles": cycles,
        "seconds": round(time.perf_counter() - started, 1),
        "thread_growth": threading.active_count() - threads,
        "rss_growth_mib": mib(process.memory_info().rss - rss),
        "next_request_ok": after[-1].finish_reason == "length",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(build_qwen3(Path(tmp) / "qwen3"))
        model = load_model(folder, max_cache_bytes=2**28)
        results = {
            "parallel": parallel(model, args.parallel),
            "eviction": eviction(folder, args.sessions, budget=400_000),
            "start_stop": start_stop(model, args.cycles),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
