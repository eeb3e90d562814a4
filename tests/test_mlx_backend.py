"""The MLX backend (mlx[cpu] on Linux): the same surface and exact cache reuse as the transformers backend."""

from __future__ import annotations

import pytest

from conftest import CI
from llm_backends import SessionKey, load_model
from llm_backends.mlx_backend import available

if not available():
    if CI:
        raise RuntimeError("CI must run the MLX tests: pip install -r requirements-mlx.txt (tests/run.sh does)")
    pytest.importorskip("mlx_lm", reason="mlx and mlx-lm are not installed (pip install -r requirements-mlx.txt)")

from test_cache_reuse import Conversation, run_script  # noqa: E402

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def mlx_qwen3(qwen3_dir):
    return load_model(str(qwen3_dir), backend="mlx", max_cache_bytes=2**28)


@pytest.fixture(scope="module")
def mlx_gemma3(gemma3_dir):
    return load_model(str(gemma3_dir), backend="mlx", max_cache_bytes=2**28)


def test_model_info_reports_the_mlx_backend(mlx_qwen3, mlx_gemma3):
    info = mlx_qwen3.get_model_info()
    assert info["backend"] == "mlx" and info["family"] == "qwen3" and info["quantization"] == "none"
    assert mlx_gemma3.get_model_info()["family"] == "gemma3"


@pytest.mark.parametrize("thinking", [True, False])
def test_mlx_qwen3_reuse_equals_recompute_across_a_script(mlx_qwen3, thinking):
    c = run_script(Conversation(mlx_qwen3, f"mlx-qwen-{thinking}", enable_thinking=thinking))
    assert sum(c.cached) > 0


def test_mlx_gemma3_reuse_equals_recompute_past_its_window(mlx_gemma3):
    c = Conversation(mlx_gemma3, "mlx-gemma", max_new_tokens=24)
    for turn in ("Hello, how are you today?", "Tell me about the sea and the sky.", "What is the capital of France?"):
        c.ask(turn)
    assert max(c.prompts) > 16 * 4, "past the 16-token sliding window"
    c.retry()
    c.undo()
    c.ask("A different question.")
    c.ask_and_stop("Numbers 0 1 2 3", after_chunks=2)
    c.ask("And now?")


def test_mlx_closing_a_stream_stops_it(mlx_qwen3):
    stream = mlx_qwen3.stream_chat(HELLO, session_id="mlx-close", temperature=0, max_new_tokens=500)
    next(stream)
    stream.close()
    assert mlx_qwen3.cache_info()["in_use"] == 0
    entry = mlx_qwen3.sessions._entries[SessionKey("python", "", "mlx-close")]
    assert len(entry.ids) < 40, "generation stopped at the close"


def test_mlx_create_has_the_openai_shape(mlx_qwen3):
    out = mlx_qwen3.create(HELLO, temperature=0, max_tokens=6)
    assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] == 6
    events = list(mlx_qwen3.create(HELLO, temperature=0, max_tokens=6, stream=True))
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_mlx_bad_input_raises_value_error(mlx_qwen3):
    with pytest.raises(ValueError):
        mlx_qwen3.stream_chat([])
    with pytest.raises(ValueError):
        mlx_qwen3.stream_chat(HELLO, temperature=float("nan"))


def test_mlx_4bit_model_loads_and_reports_its_quantization(qwen3_dir, tmp_path):
    from mlx_lm import convert

    out = tmp_path / "q4"
    convert(str(qwen3_dir), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32)
    model = load_model(str(out), backend="mlx")
    assert model.get_model_info()["quantization"] == "mlx-4bit"
    assert list(model.stream_chat(HELLO, temperature=0, max_new_tokens=4))[-1].stats.completion_tokens == 4


def test_mlx_runs_the_converted_embedded_gemma(embedded):
    from llm_backends.default_model import default_checkpoint

    model = load_model(str(default_checkpoint()), backend="mlx")
    c = Conversation(model, "mlx-embedded", restore_points=False, max_new_tokens=12)
    c.ask("The capital of France is")
    c.ask("And the capital of Italy is")
    assert c.cached[-1] > 0


def test_the_page_dropdown_can_hold_an_mlx_model(qwen3_dir):
    from llm_backends.serving import ModelRegistry

    registry = ModelRegistry([f"mlx:{qwen3_dir}"], max_cache_bytes=2**26)
    assert registry.ids == [f"{qwen3_dir.name} (mlx)"]
    assert registry.switch(registry.ids[0]).get_model_info()["backend"] == "mlx"


def test_mlx_structured_output_tool_calls_logprobs_and_completions(mlx_qwen3):
    import json

    import jsonschema
    from test_api_features import ASK, PERSON, WEATHER

    out = mlx_qwen3.create(
        ASK,
        max_tokens=120,
        temperature=0,
        enable_thinking=False,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        logprobs=True,
        top_logprobs=3,
    )
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), PERSON)
    assert len(out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    called = mlx_qwen3.create(
        ASK, max_tokens=120, temperature=0, tools=[WEATHER], tool_choice="required", enable_thinking=False
    )
    (call,) = called["choices"][0]["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    text = mlx_qwen3.create_completion("Once upon a time", max_tokens=5, temperature=0, logprobs=1)
    assert text["usage"]["completion_tokens"] == 5 and len(text["choices"][0]["logprobs"]["tokens"]) == 5


def test_mlx_gemma3_past_its_window_reuses_on_every_turn_from_restore_points(mlx_gemma3):
    c = Conversation(mlx_gemma3, "mlx-gemma-restore", max_new_tokens=24)
    for turn in ("Hello, how are you today?", "Tell me about the sea and the sky.", "What is the capital of France?"):
        c.ask(turn)
    assert max(c.prompts) > 16 * 4, "past the 16-token sliding window"
    assert all(cached > 0 for cached in c.cached[1:]), c.cached
    c.retry()
    assert c.cached[-1] == c.prompts[-1], "a retry resumes from the restore point at the prompt's end"
    c.undo()
    c.ask("A different question.")
    assert c.cached[-1] >= c.shared(1), "an undo resumes where the turn began"
    c.ask_and_stop("Numbers 0 1 2 3", after_chunks=2)
    c.ask("And now?")
    assert c.cached[-1] > 0


def test_mlx_a_new_session_starts_from_another_sessions_prefix(mlx_gemma3):
    system = {"role": "system", "content": "You answer in one short sentence about the sea. " * 6}
    first = [system, {"role": "user", "content": "Hello there."}]
    second = [system, {"role": "user", "content": "What is the capital of France?"}]
    list(mlx_gemma3.stream_chat(first, session_id="mlx-donor", temperature=0, max_new_tokens=4))
    c = Conversation(mlx_gemma3, "mlx-borrower", max_new_tokens=8)
    c.messages = second[:1]
    c.ask(second[1]["content"])
    assert c.cached[0] > 0, "the system prompt's tokens come from the other session"


def test_mlx_sessions_survive_a_restart_through_the_disk_tier_and_answer_exactly(gemma3_dir, tmp_path):
    turns = ("Tell me about the sea, the sky and the mountains. " * 2, "What is the capital of France? " * 2)
    first = load_model(str(gemma3_dir), backend="mlx", max_cache_bytes=2**26, cache_dir=str(tmp_path))
    c = Conversation(first, "returning", max_new_tokens=16)
    for turn in turns:
        c.ask(turn)
    assert c.prompts[-1] > 16 * 4, "past the tiny Gemma's sliding window: only stored states can resume it"
    first.sessions.persist()  # what the server does when it stops

    restarted = load_model(str(gemma3_dir), backend="mlx", max_cache_bytes=2**26, cache_dir=str(tmp_path))
    again = Conversation(restarted, "returning", max_new_tokens=16)  # checks every answer against a fresh one
    again.messages = list(c.messages)
    again.ask("And the mountains?")
    assert again.cached[-1] >= c.prompts[-1], "the whole earlier conversation came back from disk"
    assert restarted.cache_info()["hits"]["disk"] == 1
    transformers = load_model(str(gemma3_dir), max_cache_bytes=2**26, cache_dir=str(tmp_path))
    other = Conversation(transformers, "returning", max_new_tokens=16)
    other.messages = list(c.messages)
    other.ask("And the mountains?")
    assert transformers.cache_info()["hits"]["disk"] == 0, "another backend never reads MLX's files"


def test_mlx_copies_and_stored_states_hold_none_of_the_tokens_cut_away(mlx_qwen3):
    """mlx-lm's buffers keep room past their tokens; a cut leaves the cut tokens there. The kept system prompt is
    a copy of its sender's cache cut back, so another person's session started from it held the sender's whole
    conversation in its buffers (and wrote it to disk)."""
    import mlx.core as mx

    system = {"role": "system", "content": "You are the help desk of a small shop. Answer briefly. " * 3}
    alice, bob = SessionKey("api", "alice-mlx", "c1"), SessionKey("api", "bob-mlx", "c1")

    def ask(session, text):
        messages = [system, {"role": "user", "content": text}]
        request = mlx_qwen3.request(messages, session=session, temperature=0, max_new_tokens=4, thinking=False)
        return list(mlx_qwen3.stream(request))[-1].stats

    ask(alice, "My account number is 12345678. " * 20)
    assert ask(bob, "Hi").cached_tokens > 0, "bob starts from the kept system prompt"
    store = mlx_qwen3.sessions
    kept = [system_entry.entry for system_entry in store._systems.values()]
    assert kept
    for entry in [*kept, store._entries[bob]]:
        held = len(entry.ids)
        for layer in entry.cache:
            assert layer.offset <= held and not mx.any(layer.keys[..., layer.offset :, :]).item(), "only zeros past"
        for layer in entry.payload()["layers"]:
            assert layer is None or layer[0]["array"].shape[2] <= held, "what goes to disk holds its tokens only"
    mlx_qwen3.clear_sessions(alice)
    mlx_qwen3.clear_sessions(bob)


def test_mlx_a_continued_answer_is_the_longer_answer(mlx_gemma3):
    ask = [{"role": "user", "content": "Explain how a car engine works, step by step, in detail."}]

    def answer(messages, max_tokens, user=None, **fields):
        out = mlx_gemma3.create(messages, max_tokens=max_tokens, temperature=0, user=user, **fields)
        return out["choices"][0]["message"]["content"], out["usage"]

    whole, _ = answer(ask, 24)
    start, _ = answer(ask, 9, "mlx-continue")
    more, usage = answer(
        [*ask, {"role": "assistant", "content": start}], 15, "mlx-continue", continue_final_message=True
    )
    assert start + more == whole
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_mlx_takes_the_same_sampling_settings(mlx_qwen3):
    """min_p, the presence and frequency penalties and logit_bias on MLX: a large bias forces its token, the
    penalised greedy reply differs from the plain one and comes again from the cache, min_p 1 draws greedily."""
    the = mlx_qwen3.tokenizer.encode(" the", add_special_tokens=False)
    forced = mlx_qwen3.create(HELLO, max_tokens=4, temperature=0, enable_thinking=False, logit_bias={the[0]: 100})
    assert forced["choices"][0]["message"]["content"] == " the" * 4
    fields = {"temperature": 0, "enable_thinking": False, "presence_penalty": 2.0, "frequency_penalty": 2.0}
    plain = mlx_qwen3.create(HELLO, max_tokens=24, temperature=0, enable_thinking=False)
    penalised = mlx_qwen3.create(HELLO, max_tokens=24, **fields)
    again = mlx_qwen3.create(HELLO, max_tokens=24, user="mlx-penalties", **fields)
    text = penalised["choices"][0]["message"]["content"]
    assert again["choices"][0]["message"]["content"] == text != plain["choices"][0]["message"]["content"]
    sampled = mlx_qwen3.create(HELLO, max_tokens=12, temperature=1.0, min_p=1.0, seed=4, enable_thinking=False)
    greedy = mlx_qwen3.create(HELLO, max_tokens=12, temperature=0, enable_thinking=False)
    assert sampled["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_mlx_n_replies_read_the_prompt_once_and_each_is_its_seeds_lone_reply(mlx_gemma3):
    ask = [{"role": "user", "content": "tell me about the dragon and the baker " * 4}]  # past the 16-token window
    sampled = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8}
    stream = mlx_gemma3.stream_choices(mlx_gemma3.request(ask, seed=21, **sampled), 3)
    replies: dict[int, str] = {0: "", 1: "", 2: ""}
    with stream:
        for chunk in stream:
            replies[chunk.index] += chunk.text
            if chunk.finish_reason is not None and chunk.index:
                assert chunk.stats.cached_tokens == chunk.stats.prompt_tokens  # a copy of the first's cache
    alone = ["".join(c.text for c in mlx_gemma3.stream_chat(ask, seed=21 + i, **sampled)) for i in range(3)]
    assert [replies[i] for i in range(3)] == alone
