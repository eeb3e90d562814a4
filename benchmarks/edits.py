"""Benchmark: edits, undos and follow-ups of a conversation that arrived in one request (restore points).

    .venv/bin/python benchmarks/edits.py      # prints warm vs cold time to first token for each edit

A ~1,600-token conversation of 15 exchanges reaches the embedded Gemma 3 270M (sliding window 512) in one
request, as an API client resuming a chat or a reopened chat would send it. Then, in the same session: the user
message N exchanges back is edited (N = 1, 3, 5, 8), the last exchange is undone and another question asked,
and a short turn is appended. Each is timed warm (the session's cache) and cold (a fresh computation of the
same prompt); both generate one token. Prints figures; asserts nothing.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARAGRAPH = (
    "The history of the lighthouse begins with open fires on hilltops, later raised on towers so that ships "
    "could see them from further away. Stone towers with oil lamps followed, then lenses that gathered the light. "
)


def conversation(exchanges: int) -> list[dict]:
    messages = []
    for i in range(exchanges):
        messages.append({"role": "user", "content": f"{PARAGRAPH}Question {i}: what happened next?"})
        messages.append({"role": "assistant", "content": f"Answer {i}: {PARAGRAPH}"})
    messages.append({"role": "user", "content": "And what came after that?"})
    return messages


def ttft(model, messages, session) -> tuple[float, int, int]:
    request = model.request(messages, session=session, max_new_tokens=1, temperature=0)
    started = time.perf_counter()
    last = list(model.stream(request))[-1]
    return time.perf_counter() - started, last.stats.prompt_tokens, last.stats.cached_tokens


def main() -> None:
    from llm_backends import SessionKey, load_model

    model = load_model()
    base = conversation(15)
    key = SessionKey("python", "", "bench-edits")
    print(
        f"model: {model.info.name} ({model.info.quantization}), restore points kept: "
        f"{model.engine.runner.max_checkpoints}"
    )
    print("| action | prompt tokens | cached | warm TTFT s | cold TTFT s | cold / warm |")
    print("|---|---|---|---|---|---|")

    def measure(label: str, messages: list[dict]) -> None:
        ttft(model, base, key)  # the session holds the whole conversation again before each action
        warm, prompt, cached = ttft(model, messages, key)
        cold = statistics.median(ttft(model, messages, None)[0] for _ in range(2))
        print(f"| {label} | {prompt} | {cached} | {warm:.3f} | {cold:.3f} | {cold / warm:.1f}× |")

    first, prompt, _ = ttft(model, base, key)
    print(f"| arrives in one request | {prompt} | 0 | {first:.3f} | – | – |")
    for back in (1, 3, 5, 8):
        edited = [dict(m) for m in base]
        index = len(edited) - 1 - 2 * back
        edited[index] = {"role": "user", "content": "An edited question: what about the desert?"}
        measure(f"edit the question {back} exchange(s) back", edited[: index + 1])
    measure("undo the last exchange, ask another", [*base[:-3], {"role": "user", "content": "Something else?"}])
    measure("retry the last answer", base)
    follow = [*base, {"role": "assistant", "content": "It grew."}, {"role": "user", "content": "Go on."}]
    measure("append a short turn", follow)
    entry = model.sessions._entries[key]
    checkpoints = sum(c.nbytes for c in entry.checkpoints)
    print(
        f"\nsession memory: {entry.nbytes / 2**20:.0f} MiB, of which {len(entry.checkpoints)} restore points "
        f"{checkpoints / 2**20:.0f} MiB ({checkpoints / max(1, len(entry.checkpoints)) / 2**20:.1f} MiB each)"
    )
    shared_system_prompt(model, SessionKey)


def shared_system_prompt(model, SessionKey) -> None:
    """A team under one ~2,000-token system prompt: the second person's first turn, and a third person whose
    first message repeats the first person's word for word (another principal: only the system prompt)."""
    system = {"role": "system", "content": PARAGRAPH * 48}
    first = [system, {"role": "user", "content": "My name is Ann and my question is about lenses."}]
    other = [system, {"role": "user", "content": "I am Bob. Who kept the lighthouses?"}]
    print("\n| a shared system prompt | prompt tokens | cached | TTFT s | cold TTFT s | cold / warm |")
    print("|---|---|---|---|---|---|")
    started, prompt, _ = ttft(model, first, SessionKey("api", "key:ann", "ann"))
    print(f"| first person, first turn | {prompt} | 0 | {started:.3f} | – | – |")
    operator = model.operator_tokens(model.request(first))
    for label, principal, messages in (
        ("second person (another key), first turn", "key:bob", other),
        ("third person repeating the first one's message", "key:cy", first),
    ):
        warm, prompt, cached = ttft(model, messages, SessionKey("api", principal, principal))
        cold = statistics.median(ttft(model, messages, None)[0] for _ in range(2))
        print(
            f"| {label} | {prompt} | {cached} (system prompt: {operator}) | {warm:.3f} | {cold:.3f} | "
            f"{cold / warm:.1f}× |"
        )


if __name__ == "__main__":
    main()
