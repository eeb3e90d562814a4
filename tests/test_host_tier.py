"""Sessions evicted from a GPU's memory wait in host RAM (host_cache_bytes) and come back exactly; what falls out of
host RAM goes on to disk; a cleared session is gone from host RAM too. CI has no GPU: these tests ask for the tier
on a CPU, where it runs the same code (its copies then stay in RAM). On a GPU machine they load as ``LLM_TEST_*``
says (conftest.py), e.g. ``LLM_TEST_DEVICE=cuda LLM_TEST_EXACT=1``: the copies then go between device and host."""

from __future__ import annotations

import pytest
import torch
from test_cache_reuse import Conversation, reply

from conftest import TINY_LOAD
from llm_backends import SessionKey, load_model
from llm_backends.host_tier import HostTier, payload_bytes

TURNS = ("Tell me about the sea, the sky and the mountains. " * 2, "What is the capital of France? " * 2)


def one_at_a_time(folder, **kwargs):
    """A model that keeps one session in (device) memory: every other session pushes the last one out."""
    model = load_model(str(folder), max_cache_bytes=2**26, **TINY_LOAD, **kwargs)
    model.sessions.max_sessions = 1
    return model


def test_an_evicted_session_comes_back_from_host_ram_and_answers_exactly(gemma3_dir):
    model = one_at_a_time(gemma3_dir, host_cache_bytes=2**28)
    c = Conversation(model, "a", max_new_tokens=16)  # checks every answer against a fresh computation
    for turn in TURNS:
        c.ask(turn)
    assert c.prompts[-1] > 16 * 4, "past the tiny Gemma's sliding window: only the held states can resume it"
    reply(model, [{"role": "user", "content": "Something else entirely."}], "b")  # a leaves device memory
    assert model.cache_info()["host"]["sessions"] == 1
    c.ask("And the mountains?")
    assert c.cached[-1] >= c.prompts[-2], "the whole earlier conversation came back from host RAM"
    info = model.cache_info()
    assert info["hits"]["host"] == 1 and info["host"]["takes"] == 1
    assert info["host"]["sessions"] == 1, "b waits there now"


def test_a_retry_after_a_trip_through_host_ram_reuses_the_whole_prompt(gemma3_dir):
    model = one_at_a_time(gemma3_dir, host_cache_bytes=2**28)
    messages = [{"role": "user", "content": TURNS[0]}]
    first, _, _ = reply(model, messages, "a")
    reply(model, [{"role": "user", "content": "Something else entirely."}], "b")
    again, _, last = reply(model, messages, "a")  # the restore point at the prompt's end came along
    assert again == first and last.stats.cache_tier == "host"
    assert last.stats.cached_tokens == last.stats.prompt_tokens


def test_what_falls_out_of_host_ram_goes_to_disk(qwen3_dir, tmp_path):
    model = one_at_a_time(qwen3_dir, host_cache_bytes=1, cache_dir=str(tmp_path))  # nothing fits in host RAM
    a = [{"role": "user", "content": "Hello, how are you today?"}]
    text, _, _ = reply(model, a, "a")
    reply(model, [{"role": "user", "content": "What is the capital of France?"}], "b")
    assert model.cache_info()["host"]["sessions"] == 0 and model.cache_info()["disk"]["writes"] == 1
    a += [{"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more."}]
    warm, _, last = reply(model, a, "a")
    fresh, _, _ = reply(model, a)
    assert warm == fresh and last.stats.cache_tier == "disk" and last.stats.cached_tokens > 0


def test_a_server_that_stops_writes_its_host_ram_sessions_to_disk(qwen3_dir, tmp_path):
    model = one_at_a_time(qwen3_dir, host_cache_bytes=2**28, cache_dir=str(tmp_path))
    reply(model, [{"role": "user", "content": "Hello, how are you today?"}], "a")
    reply(model, [{"role": "user", "content": "What is the capital of France?"}], "b")
    assert model.cache_info()["host"]["sessions"] == 1 and model.cache_info()["disk"]["writes"] == 0
    model.sessions.persist()
    assert model.cache_info()["disk"]["sessions"] == 2


def test_a_cleared_session_is_gone_from_host_ram(qwen3_dir):
    model = one_at_a_time(qwen3_dir, host_cache_bytes=2**28)
    a = [{"role": "user", "content": "Hello, how are you today?"}]
    reply(model, a, "a")
    reply(model, [{"role": "user", "content": "What is the capital of France?"}], "b")
    assert model.cache_info()["host"]["sessions"] == 1
    model.clear_cache("a")
    _, _, last = reply(model, a, "a")
    assert last.stats.cached_tokens == 0 and model.cache_info()["hits"]["host"] == 0
    reply(model, [{"role": "user", "content": "Something else."}], "c")  # a goes to host RAM, then all is cleared
    model.clear_cache()
    assert model.cache_info()["host"]["sessions"] == 0


def test_one_persons_session_in_host_ram_is_never_found_under_another_persons_key(qwen3_dir):
    model = one_at_a_time(qwen3_dir, host_cache_bytes=2**28)
    mine, theirs = SessionKey("api", "alice", "chat"), SessionKey("api", "bob", "chat")
    lease, entry = model.sessions.checkout(mine, model.engine.new_entry)
    model.engine.runner.forward(entry, list(range(5, 60)))
    model.sessions.checkin(lease, entry)
    lease, other = model.sessions.checkout(SessionKey("api", "carol", "x"), model.engine.new_entry)
    model.sessions.checkin(lease, other)  # alice's session goes to host RAM
    lease, found = model.sessions.checkout(theirs, model.engine.new_entry, list(range(5, 60)))
    assert found.ids == [] and found.found == "none"
    model.sessions.checkin(lease, found)


def test_host_ram_keeps_the_most_recent_sessions_within_its_bytes():
    tier = HostTier(max_bytes=3 * 4096)
    payload = {"ids": [1, 2], "layers": [{"keys": torch.zeros(512), "values": torch.zeros(512), "seen": 2}]}
    assert payload_bytes(payload) == 4096
    assert tier.put("a", payload) == [] and tier.put("b", payload) == [] and tier.put("c", payload) == []
    assert [key for key, _ in tier.put("d", payload)] == ["a"]
    huge = {"layers": [{"keys": torch.zeros(4096), "values": torch.zeros(1), "seen": None}]}
    assert [key for key, _ in tier.put("e", huge)] == ["e"], "too big for the budget: out at once, alone"
    assert tier.info()["sessions"] == 3, "the others stay"


def test_load_model_checks_the_host_budget(qwen3_dir):
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="host_cache_bytes"):
            load_model(str(qwen3_dir), host_cache_bytes=bad)


def test_the_server_takes_a_host_budget_from_the_flag_or_the_environment():
    import app

    assert app.parse_args(["--host-cache-gb", "0.5"], env={}).host_cache_gb == 0.5
    assert app.parse_args([], env={"LLM_HOST_CACHE_GB": "0"}).host_cache_gb == 0
    config = app.parse_args([], env={})
    assert config.host_cache_gb is None and "host_cache_bytes" not in app.registry_for(config)._load_kwargs
    config.host_cache_gb = 0.5
    assert app.registry_for(config)._load_kwargs["host_cache_bytes"] == 2**29


def test_the_page_and_the_metrics_say_a_reply_came_from_host_ram(qwen3_dir):
    import app
    from llm_backends import Stats
    from llm_backends.metrics import Metrics

    assert "90 from cache (from host RAM)" in app.stats_line(Stats(100, 90, 5, 0.1, 20.0, 0.4, cache_tier="host"))
    model = one_at_a_time(qwen3_dir, host_cache_bytes=2**28)
    metrics = Metrics(lambda: model)
    a = [{"role": "user", "content": "Hello, how are you today?"}]
    text, _, _ = reply(model, a, "a")
    reply(model, [{"role": "user", "content": "What is the capital of France?"}], "b")
    a += [{"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more."}]
    for chunk in model.stream_chat(a, session_id="a", temperature=0, max_new_tokens=4):
        metrics.observe(chunk)
    text = metrics.exposition().decode()
    assert 'llm_cache_hits_total{tier="host"} 1.0' in text
    assert 'llm_cache_sessions{tier="host"} 1.0' in text and 'llm_cache_sessions{tier="memory"} 1.0' in text


def test_a_cleared_session_is_not_brought_back_by_an_eviction_already_under_way(qwen3_dir):
    model = one_at_a_time(qwen3_dir, host_cache_bytes=2**28)
    key = SessionKey("python", "", "a")
    lease, entry = model.sessions.checkout(key, model.engine.new_entry)
    model.engine.runner.forward(entry, list(range(5, 40)))
    model.sessions.checkin(lease, entry)
    with model.sessions._lock:  # an eviction takes a out of memory and starts copying it...
        victims = [(key, model.sessions._drop(key), model.sessions._outgo(key))]
    model.clear_cache("a")  # ...New chat, meanwhile, and the new chat's first reply ends...
    lease, fresh = model.sessions.checkout(key, model.engine.new_entry)
    model.sessions.checkin(lease, fresh)
    model.sessions._spill(victims)  # ...before the old copy arrives: it goes nowhere
    assert model.cache_info()["host"]["sessions"] == 0


def test_a_session_that_cannot_come_back_from_host_ram_is_read_again_with_a_log_line(caplog):
    import logging

    tier = HostTier(max_bytes=2**20)
    tier.put("a", {"ids": [1], "layers": [], "restore_points": [], "devices": {"ids": [None], "layers": []}})

    class Refusing:
        def load_payload(self, payload):
            raise RuntimeError("CUDA out of memory")

    with caplog.at_level(logging.WARNING):
        assert tier.take("a", Refusing) is None
    assert "read again" in caplog.text and tier.info()["failed"] == 1 and tier.info()["sessions"] == 0
