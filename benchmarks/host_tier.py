"""Benchmark: a session evicted from GPU memory coming back from host RAM, against reading it again.

    python benchmarks/host_tier.py [--model PATH] [--turns 13] [--device cuda]

One model, loaded twice in turn: with a host tier (``host_cache_bytes``) and without one. In each, session
"alice" sends a conversation of ``--turns`` exchanges (``benchmarks/edits.py``'s, ~115 tokens each) and gets
its answer; a second session then pushes alice out of device memory (one session fits there), and alice comes
back with one more short turn. Timed from the request to the first token: back from host RAM, read again from
nothing (no host tier), and, for scale, the same turn with alice still in memory. Prints figures; asserts nothing.
On a CPU the tier is asked for explicitly and its copies stay in RAM: there the figures show the path's cost, not
a GPU's transfer over PCIe.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.edits import conversation  # noqa: E402


def returning(source, device, host_bytes: int, turns: int, evict: bool) -> dict:
    """Time to first token of alice's next turn after another session took her place (``evict``) or not."""
    from llm_backends import SessionKey, load_model

    model = load_model(source, device=device, max_cache_bytes=2**34, host_cache_bytes=host_bytes)
    model.sessions.max_sessions = 1
    alice, bob = SessionKey("api", "key", "alice"), SessionKey("api", "key", "bob")
    messages = conversation(turns)
    answer = "".join(
        c.text for c in model.stream(model.request(messages, session=alice, max_new_tokens=16, temperature=0))
    )
    if evict:
        list(
            model.stream(
                model.request([{"role": "user", "content": "Hello."}], session=bob, max_new_tokens=4, temperature=0)
            )
        )
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Go on."}]
    request = model.request(messages, session=alice, max_new_tokens=1, temperature=0)
    started = time.perf_counter()
    last = list(model.stream(request))[-1]
    row = {
        "ttft_s": time.perf_counter() - started,
        "prompt": last.stats.prompt_tokens,
        "cached": last.stats.cached_tokens,
        "tier": last.stats.cache_tier,
        "host": model.cache_info()["host"],
    }
    model.release()
    del model
    gc.collect()
    return row


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint folder or .gguf file (default: the embedded model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--turns", type=int, default=13)
    args = parser.parse_args()
    rows = {
        "from host RAM": returning(args.model, args.device, 2**32, args.turns, evict=True),
        "read again (no host tier)": returning(args.model, args.device, 0, args.turns, evict=True),
        "still in memory": returning(args.model, args.device, 0, args.turns, evict=False),
    }
    print(f"device: {args.device}\n")
    print("| returning session | prompt tokens | cached | tier | TTFT s |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['prompt']} | {row['cached']} | {row['tier']} | {row['ttft_s']:.3f} |")
    host, again = rows["from host RAM"]["ttft_s"], rows["read again (no host tier)"]["ttft_s"]
    print(f"\nhost RAM / read again: 1/{again / host:.1f}; host tier: {rows['from host RAM']['host']}")


if __name__ == "__main__":
    main()
