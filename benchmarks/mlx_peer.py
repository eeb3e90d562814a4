"""MLX backend decode vs mlx-lm's own ``stream_generate`` on the same converted model, same prompt ids, greedy.

    .venv/bin/pip install -r requirements-mlx.txt
    .venv/bin/python benchmarks/mlx_peer.py [--runs 3] [--tokens 128]

Prints decode tokens/s for both and their ratio per run (target: ours at least 0.9x); asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from llm_backends import load_model
    from llm_backends.default_model import default_checkpoint

    folder = str(default_checkpoint())
    ours = load_model(folder, backend="mlx")
    model, tokenizer = mlx_lm.load(folder)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    prompt = ours.render(messages)

    def run_ours() -> float:
        last = list(ours.stream_chat(messages, temperature=0, max_new_tokens=args.tokens))[-1]
        return last.stats.tokens_per_s

    def run_theirs() -> float:
        for response in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=args.tokens, sampler=make_sampler(temp=0.0)
        ):
            last = response
        return last.generation_tps

    ratios = []
    print("| run | ours tok/s | mlx-lm tok/s | ours / mlx-lm |\n|---|---|---|---|")
    for run in range(1, args.runs + 1):
        a, b = run_ours(), run_theirs()
        ratios.append(a / b)
        print(f"| {run} | {a:.1f} | {b:.1f} | {a / b:.2f}× |")
    print(f"\nmedian ours / mlx-lm: {statistics.median(ratios):.2f}× ({ours.get_model_info()['device']})")


if __name__ == "__main__":
    main()
