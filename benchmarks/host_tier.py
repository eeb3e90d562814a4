"""Benchmark: a session evicted from GPU memory coming back from host RAM, against reading it again.

    python benchmarks/host_tier.py [--model PATH | --shape qwen3-8b] [--turns 13] [--device cuda]

One model, loaded twice in turn: with a host tier (``host_cache_bytes``) and without one. In each, session
"alice" sends a conversation of ``--turns`` exchanges (``benchmarks/edits.py``'s, ~115 tokens each) and gets
its answer; a second session then pushes alice out of device memory (one session fits there), and alice comes
back with one more short turn. Timed from the request to the first token: back from host RAM, read again from
nothing (no host tier), and, for scale, the same turn with alice still in memory; and the whole of the second
session's reply, which ends by pushing alice out (with a host tier, copying her states out of device memory).
Prints figures; asserts nothing.
On a CPU the tier is asked for explicitly and its copies stay in RAM: there the figures show the path's cost, not
a GPU's transfer over PCIe. ``--shape`` builds a real-shaped model with random weights (``benchmarks/gpu.py``'s
shapes, with the tests' chat templates) where the embedded one cannot go (a device machine): whether host RAM beats
reading again depends on the bytes a token's states take against the arithmetic that makes them.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.edits import conversation  # noqa: E402
from benchmarks.gpu import SHAPES, build  # noqa: E402


def shaped(name: str, folder: Path, device: str) -> str:
    """``name``'s published shape with random weights and a chat template, saved to ``folder``."""
    from transformers import AutoTokenizer

    from llm_backends.families.gemma3 import GEMMA3_TEMPLATE
    from tiny_models import QWEN3_TEMPLATE

    build(name, folder, device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = GEMMA3_TEMPLATE if SHAPES[name]["kind"] == "gemma3" else QWEN3_TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


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
    evict_s = None
    if evict:  # bob's reply ends with alice's eviction (and with a host tier, her copy out of device memory)
        started = time.perf_counter()
        list(
            model.stream(
                model.request([{"role": "user", "content": "Hello."}], session=bob, max_new_tokens=4, temperature=0)
            )
        )
        evict_s = time.perf_counter() - started
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Go on."}]
    request = model.request(messages, session=alice, max_new_tokens=1, temperature=0)
    started = time.perf_counter()
    last = list(model.stream(request))[-1]
    row = {
        "ttft_s": time.perf_counter() - started,
        "evict_s": evict_s,
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
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a real-shaped model with random weights instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--turns", type=int, default=13)
    args = parser.parse_args()
    if args.shape:
        work = tempfile.mkdtemp(prefix="host-tier-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        args.model = shaped(args.shape, Path(work) / args.shape, args.device)
    try:
        rows = {
            "from host RAM": returning(args.model, args.device, 2**32, args.turns, evict=True),
            "read again (no host tier)": returning(args.model, args.device, 0, args.turns, evict=True),
            "still in memory": returning(args.model, args.device, 0, args.turns, evict=False),
        }
    finally:
        if args.shape:
            shutil.rmtree(work, ignore_errors=True)
    print(f"device: {args.device}; model: {args.shape or args.model or 'embedded'}\n")
    print(
        "| returning session | prompt tokens | cached | tier | TTFT s | evicting reply s |\n|---|---|---|---|---|---|"
    )
    for name, row in rows.items():
        evict = "–" if row["evict_s"] is None else f"{row['evict_s']:.3f}"
        print(f"| {name} | {row['prompt']} | {row['cached']} | {row['tier']} | {row['ttft_s']:.3f} | {evict} |")
    host, again = rows["from host RAM"]["ttft_s"], rows["read again (no host tier)"]["ttft_s"]
    print(f"\nhost RAM / read again: 1/{again / host:.1f}; host tier: {rows['from host RAM']['host']}")


if __name__ == "__main__":
    main()
