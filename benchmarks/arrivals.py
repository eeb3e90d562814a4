"""Benchmark: how long a newly arriving long prompt stalls the sessions already decoding.

    .venv/bin/python benchmarks/arrivals.py [--sessions 4] [--prompt-words 1200] [--shared-chunk 64]

The embedded Gemma 3 270M (default settings). ``--sessions`` sessions decode 160 tokens each (greedy); once
they all stream, one more session arrives with a ~1,500-token prompt. Prints, for the sessions already
decoding, the gaps between their tokens while the newcomer's prompt is read (p50 / p95 / max) and outside
that window, and the newcomer's time to first token. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = (
    "The history of the lighthouse begins with open fires on hilltops, later raised on towers so that ships could "
    "see them from further away. "
).split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=1200)
    parser.add_argument("--shared-chunk", type=int, help="prompt tokens per piece while others decode")
    args = parser.parse_args()
    from llm_backends import SessionKey, load_model

    model = load_model()
    if args.shared_chunk:
        model.engine.shared_chunk = args.shared_chunk
    stamps: dict[int, list[float]] = {i: [] for i in range(args.sessions)}
    started = threading.Barrier(args.sessions + 1)

    def decode(i: int) -> None:
        messages = [{"role": "user", "content": f"Question {i}: tell me about the sea and ship number {i}."}]
        request = model.request(messages, session=SessionKey("python", "", f"s{i}"), max_new_tokens=160, temperature=0)
        waited = False
        for _ in model.stream(request):
            stamps[i].append(time.perf_counter())
            if not waited:
                waited = True
                started.wait()

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(args.sessions)]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(0.5)  # steady decoding first
    words = " ".join(WORDS[i % len(WORDS)] for i in range(args.prompt_words))
    long_prompt = [{"role": "user", "content": words + "\nSum this up."}]
    request = model.request(long_prompt, max_new_tokens=4, temperature=0)
    arrived = time.perf_counter()
    chunks = list(model.stream(request))
    read = arrived + chunks[-1].stats.ttft_s
    for thread in threads:
        thread.join()
    during, outside = [], []
    for times in stamps.values():
        for before, after in zip(times, times[1:], strict=False):
            gap = (after - before) * 1000
            (during if after > arrived and before < read else outside).append(gap)
    figures = {
        "sessions": args.sessions,
        "prompt_tokens": chunks[-1].stats.prompt_tokens,
        "prefill_chunk": model.engine.prefill_chunk,
        "shared_chunk": model.engine.shared_chunk,
        "newcomer_ttft_s": round(chunks[-1].stats.ttft_s, 3),
        "gaps_while_read_ms": {
            "p50": round(statistics.median(during), 1) if during else None,
            "p95": round(percentile(during, 0.95), 1),
            "max": round(max(during), 1) if during else None,
            "count": len(during),
        },
        "gaps_otherwise_ms": {
            "p50": round(statistics.median(outside), 1),
            "p95": round(percentile(outside, 0.95), 1),
        },
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
