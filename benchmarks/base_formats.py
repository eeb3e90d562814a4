"""Which prompt format makes a base model (no chat template: the embedded Gemma 3 270M) stay on topic in a chat.

Each format turns the same 20 short questions into a prompt; the model answers greedily (48 tokens at most, cut
at the format's stop strings). A reply is on topic when it names one of the question's keywords (the answer, or
failing that the thing asked about) in its first line, and starts no new turn of its own. Prints a table per
format, then each question's replies for the best one.

    .venv/bin/python benchmarks/base_formats.py [--model SRC] [--tokens 48]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_backends import load_model  # noqa: E402

# (question, keywords any of which shows the reply is about it; lower case)
QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("What do bees make?", ["honey", "wax"]),
    ("What is the boiling point of water in Celsius?", ["100"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is the opposite of hot?", ["cold"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "co2", "co₂"]),
    ("What is frozen water called?", ["ice"]),
    ("Which ocean is the largest?", ["pacific"]),
    ("What is 2 plus 3?", ["five", "5"]),
    ("What language is spoken in Spain?", ["spanish"]),
    ("What is the fastest land animal?", ["cheetah"]),
    ("Which planet is called the Red Planet?", ["mars"]),
    ("What do you call a baby cat?", ["kitten"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What is the main ingredient of bread?", ["flour", "wheat"]),
]


def gemma_turns(question: str) -> str:
    return f"<bos><start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"


# name -> (prompt for one question, stop strings); None: the app's own chat path (what the page and /v1 send).
FORMATS = {
    "Gemma turns (the app's old fallback)": (gemma_turns, ("<end_of_turn>",)),
    "User:/Assistant: transcript": (lambda q: f"User: {q}\nAssistant:", ("\nUser:",)),
    "transcript with a preamble": (
        lambda q: (
            "A conversation between a user and a helpful assistant who answers briefly and correctly.\n\n"
            f"User: {q}\nAssistant:"
        ),
        ("\nUser:",),
    ),
    "Question:/Answer:": (lambda q: f"Question: {q}\nAnswer:", ("\nQuestion:", "\nAnswer:")),
    "the app's chat path (base-model template)": (None, ()),
}
NEW_TURN = re.compile(r"^\s*(user|assistant|question|answer|q|a)\s*:", re.IGNORECASE | re.MULTILINE)


def on_topic(reply: str, keywords: list[str]) -> bool:
    first_line = next((line for line in reply.strip().splitlines() if line.strip()), "").lower()
    return any(k in first_line for k in keywords) and not NEW_TURN.search(reply.strip())


def run(model, name: str, tokens: int) -> list[tuple[str, str, bool]]:
    render, stops = FORMATS[name]
    results = []
    for question, keywords in QUESTIONS:
        if render is None:
            out = model.create([{"role": "user", "content": question}], max_tokens=tokens, temperature=0)
            reply = out["choices"][0]["message"]["content"]
        else:
            out = model.create_completion(render(question), max_tokens=tokens, temperature=0, stop=list(stops))
            reply = out["choices"][0]["text"]
        results.append((question, reply, on_topic(reply, keywords)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a base checkpoint (default: the embedded Gemma 3 270M)")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    model = load_model(args.model)
    print(f"{model.info.name} ({model.info.quantization}), {len(QUESTIONS)} questions, greedy, {args.tokens} tokens")
    scores = {}
    for name in FORMATS:
        started = time.perf_counter()
        results = run(model, name, args.tokens)
        scores[name] = results
        hits = sum(ok for _, _, ok in results)
        print(f"| {name:<42} | {hits:>2} / {len(results)} on topic | {time.perf_counter() - started:5.1f} s |")
    best = max(scores, key=lambda name: sum(ok for _, _, ok in scores[name]))
    print(f"\nbest: {best}\n")
    for question, reply, ok in scores[best]:
        shown = " ".join(reply.split())[:90]
        print(f"{'✓' if ok else '✗'} {question:<50} {shown}")


if __name__ == "__main__":
    main()
