"""Benchmark: OpenAI's ``n`` on the embedded model: n replies to one prompt, against n lone requests one after
another and n lone requests at once (each reading the prompt itself).

    .venv/bin/python benchmarks/choices.py [--n 4] [--prompt-tokens 1000] [--tokens 64]

A raw prompt of about ``--prompt-tokens`` tokens (no session, so nothing is cached between runs), each reply
sampled (temperature 0.8, its own seed) with its end-of-text token banned, so every reply writes all ``--tokens``.
Prints the wall time of each way, the time to the first token, and how many prompt tokens were read (a reply's
``prompt_tokens - cached_tokens``). Asserts nothing, except that the n replies equal the lone ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llm_backends  # noqa: E402 (sets OpenMP's wait policy before torch loads, as the app does)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = llm_backends.load_model(max_cache_bytes=2 * 2**30)
    sentence = "The baker of the old castle rose before dawn to light the ovens and knead the dough. "
    prompt = sentence * max(1, args.prompt_tokens // 18)
    end = model.tokenizer.eos_token_id
    fields = {"temperature": 0.8, "max_tokens": args.tokens, "logit_bias": {str(end): -100}, "seed": 1}
    model.create_completion("warm up", max_tokens=4)

    def lone(i: int) -> tuple[str, float]:
        started, first, text = time.perf_counter(), None, ""
        for event in model.create_completion(prompt, stream=True, **{**fields, "seed": 1 + i}):
            first = first or time.perf_counter()
            text += event["choices"][0]["text"]
        return text, first - started

    def together() -> tuple[list[str], float, float, int]:
        started, first = time.perf_counter(), None
        stream = model.stream_choices(model.request(None, prompt=prompt, **_sampling(fields)), args.n)
        texts, read = [""] * args.n, 0
        with stream:
            for chunk in stream:
                first = first or time.perf_counter()
                texts[chunk.index] += chunk.text
                if chunk.stats is not None:
                    read += chunk.stats.prompt_tokens - chunk.stats.cached_tokens
        return texts, first - started, time.perf_counter() - started, read

    prompt_tokens = len(model.tokenizer(prompt)["input_ids"])
    print(f"embedded Gemma 3 270M, prompt {prompt_tokens} tokens, n={args.n}, {args.tokens} tokens per reply")
    texts, ttft, wall, read = together()
    print(f"n={args.n} in one request:   {wall:6.2f} s, first token {ttft:5.2f} s, prompt tokens read {read}")
    started = time.perf_counter()
    serial = [lone(i) for i in range(args.n)]
    wall = time.perf_counter() - started
    print(
        f"{args.n} lone, one by one:   {wall:6.2f} s, first token {serial[0][1]:5.2f} s, "
        f"prompt tokens read {prompt_tokens * args.n}"
    )
    started = time.perf_counter()
    with ThreadPoolExecutor(args.n) as pool:
        parallel = list(pool.map(lone, range(args.n)))
    wall = time.perf_counter() - started
    print(
        f"{args.n} lone, all at once:  {wall:6.2f} s, first token {max(p[1] for p in parallel):5.2f} s (last), "
        f"prompt tokens read {prompt_tokens * args.n}"
    )
    assert texts == [s[0] for s in serial], "the n replies differ from their lone runs"
    print("the n replies equal their lone runs")


def _sampling(fields: dict) -> dict:
    """The completion fields as ``build_request`` takes them."""
    return {
        "temperature": fields["temperature"],
        "max_new_tokens": fields["max_tokens"],
        "logit_bias": fields["logit_bias"],
        "seed": fields["seed"],
    }


if __name__ == "__main__":
    main()
