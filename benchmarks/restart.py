"""Benchmark: a returning API session after a server restart, with and without ``--cache-dir``.

    .venv/bin/python benchmarks/restart.py        # prints warm (from disk) vs cold time to first token

First process: the embedded Gemma 3 270M with a cache folder; an API client sends a ~1,500-token conversation
of 13 exchanges (session ``user="alice"``) and gets its answer; the process exits (its sessions go to disk).
Second process: a fresh load with the same folder; alice comes back with one more short turn. Timed from the
request to the first token, warm (the session found on disk) and cold (the same prompt with no session).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.edits import conversation  # noqa: E402


def first(folder: str) -> None:
    from llm_backends import SessionKey, load_model

    model = load_model(cache_dir=folder)
    messages = conversation(13)
    request = model.request(messages, session=SessionKey("api", "bench-key", "alice"), max_new_tokens=16, temperature=0)
    chunks = list(model.stream(request))
    print(json.dumps({"answer": "".join(c.text for c in chunks), "prompt_tokens": chunks[-1].stats.prompt_tokens}))


def second(folder: str, answer: str) -> None:
    from llm_backends import SessionKey, load_model

    model = load_model(cache_dir=folder)
    messages = conversation(13) + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Go on."}]
    rows = {}
    for name, session in (("warm", SessionKey("api", "bench-key", "alice")), ("cold", None)):
        request = model.request(messages, session=session, max_new_tokens=1, temperature=0)
        started = time.perf_counter()
        last = list(model.stream(request))[-1]
        rows[name] = {
            "ttft_s": time.perf_counter() - started,
            "prompt": last.stats.prompt_tokens,
            "cached": last.stats.cached_tokens,
        }
    rows["disk"] = model.cache_info()["disk"]
    rows["hits"] = model.cache_info()["hits"]  # by tier: the warm turn's prefix should be a disk hit
    print(json.dumps(rows))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--first":
        return first(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[1] == "--second":
        return second(sys.argv[2], sys.argv[3])
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, __file__, "--first", folder], capture_output=True, text=True, check=True)
        one = json.loads(out.stdout.strip().splitlines()[-1])
        out = subprocess.run(
            [sys.executable, __file__, "--second", folder, one["answer"]], capture_output=True, text=True, check=True
        )
        two = json.loads(out.stdout.strip().splitlines()[-1])
    warm, cold = two["warm"], two["cold"]
    print("| after a restart | prompt tokens | cached | TTFT s |\n|---|---|---|---|")
    print(f"| returning session, --cache-dir | {warm['prompt']} | {warm['cached']} | {warm['ttft_s']:.3f} |")
    print(f"| same prompt, cold | {cold['prompt']} | {cold['cached']} | {cold['ttft_s']:.3f} |")
    print(f"\nwarm / cold: 1/{cold['ttft_s'] / warm['ttft_s']:.1f} (target: at most 1/5); disk: {two['disk']}")
    print(f"cache hits by tier after the restart: {two['hits']}")


if __name__ == "__main__":
    main()
