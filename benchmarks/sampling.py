"""Benchmark: what each sampling setting adds to a decode step.

    .venv/bin/python benchmarks/sampling.py

First the sampler alone (``sampling.Sampler.pick`` and ``said``) on a random logits row as wide as the embedded
Gemma 3's vocabulary (262,144), 500 prompt tokens behind it for the repetition penalty and DRY (the reply repeats
a 50-token stretch, DRY's worst case: every step extends a long repeat); then the embedded model's
decode speed over 200 tokens of a raw prompt with each setting (its end-of-text token banned by ``logit_bias``,
so every run writes all 200; the plain greedy run bans nothing, so the runner picks in its own pass, as it does
for every greedy request without these settings). Prints figures; asserts nothing.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The package sets OpenMP's wait policy before torch is loaded (llm_backends/__init__.py), as the app does.
# isort: off
import llm_backends  # noqa: E402, F401
import torch  # noqa: E402

# isort: on

from llm_backends.request import SamplingParams  # noqa: E402
from llm_backends.sampling import Sampler  # noqa: E402

SETTINGS = {
    "greedy": {},
    "greedy + presence/frequency": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    "greedy + repetition_penalty": {"repetition_penalty": 1.1},
    "sampled (top-k 64, top-p 0.95)": {"temperature": 1.0, "top_k": 64, "top_p": 0.95},
    "sampled + min_p 0.05": {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "min_p": 0.05},
    "top-k off, top-p 0.95": {"temperature": 1.0, "top_k": 0, "top_p": 0.95},
    "top-k off, min_p 0.05 alone": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.05},
    "temperature alone (top-k off, top-p 1)": {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    "greedy + DRY 0.8": {
        "dry_multiplier": 0.8,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": -1,
        "dry_sequence_breakers": ("\n", ":", '"', "*"),
    },
    "sampled + XTC 0.5 (top-k 64, top-p 0.95)": {
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
        "xtc_probability": 0.5,
        "xtc_threshold": 0.1,
    },
}


def pick_cost(steps: int = 300) -> None:
    from llm_backends import cpu_kernels

    cpu_kernels.ops()  # as in a process that loaded a model: the kernels' argmax and top-k pick
    torch.manual_seed(0)
    logits = torch.randn(262_144)
    print("| setting | sampler ms per step (median of 5) |\n|---|---|")
    for name, fields in {**SETTINGS, "greedy + logit_bias (2 ids)": {"logit_bias": ((1, -5.0), (2, 3.0))}}.items():
        params = SamplingParams(max_new_tokens=steps, **{"temperature": 0.0, "top_p": 1.0, **fields})
        runs = []
        for _ in range(5):
            sampler = Sampler(params, "cpu", list(range(500)))
            started = time.perf_counter()
            with torch.inference_mode():
                for i in range(steps):
                    sampler.pick(logits)
                    sampler.said(i % 50)
            runs.append((time.perf_counter() - started) / steps * 1e3)
        print(f"| {name} | {statistics.median(runs):.3f} |")


def decode_speed() -> None:
    from llm_backends import load_model

    model = load_model()
    prompt = "Once upon a time, in a small village by the sea, there lived"
    no_end = {str(model.tokenizer.eos_token_id): -100}
    print("\n| setting (embedded model, 200 tokens, end-of-text banned) | tok/s (median of 5) |\n|---|---|")
    for name, fields in {"plain greedy (nothing banned)": {}, **SETTINGS}.items():
        fields = {"temperature": 0, **fields}
        if not name.startswith("plain"):
            fields["logit_bias"] = no_end
        rates = []
        for seed in range(5):
            stream = model.stream(model.request(None, prompt=prompt, max_new_tokens=200, seed=seed, **fields))
            stats = [chunk.stats for chunk in stream if chunk.finish_reason][0]
            rates.append(stats.tokens_per_s)
        print(f"| {name} | {statistics.median(rates):.1f} ({stats.completion_tokens} tokens) |")


if __name__ == "__main__":
    pick_cost()
    decode_speed()
