"""Session caches on disk (cache_dir): they survive eviction and a restart, stay exact, and are never loaded
when damaged, foreign, or asked for by another person."""

from __future__ import annotations

import logging

from test_cache_reuse import Conversation, reply

from llm_backends import SessionKey, load_model

TURNS = ("Tell me about the sea, the sky and the mountains. " * 2, "What is the capital of France? " * 2)


def load(folder, cache_dir, **kwargs):
    return load_model(str(folder), max_cache_bytes=2**26, cache_dir=str(cache_dir), **kwargs)


def test_a_returning_session_after_a_restart_resumes_from_disk_and_answers_exactly(gemma3_dir, tmp_path):
    first = load(gemma3_dir, tmp_path)
    c = Conversation(first, "returning", max_new_tokens=16)
    for turn in TURNS:
        c.ask(turn)
    assert c.prompts[-1] > 16 * 4, "past the tiny Gemma's sliding window: only the stored states can resume it"
    first.sessions.persist()  # what the server does when it stops

    restarted = load(gemma3_dir, tmp_path)
    again = Conversation(restarted, "returning", max_new_tokens=16)  # checks every answer against a fresh one
    again.messages = list(c.messages)
    again.ask("And the mountains?")
    assert again.cached[-1] >= c.prompts[-1], "the whole earlier conversation came back from disk"
    info = restarted.cache_info()
    assert info["hits"]["disk"] == 1 and info["disk"]["reads"] == 1


def test_an_evicted_session_comes_back_from_disk(qwen3_dir, tmp_path):
    model = load_model(str(qwen3_dir), max_cache_bytes=2**26, cache_dir=str(tmp_path))
    model.sessions.max_sessions = 1  # every other session pushes the last one out of memory
    a = [{"role": "user", "content": "Hello, how are you today?"}]
    text, _, _ = reply(model, a, "a")
    reply(model, [{"role": "user", "content": "What is the capital of France?"}], "b")
    assert model.cache_info()["evictions"] >= 1 and model.cache_info()["disk"]["writes"] >= 1
    a += [{"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more."}]
    warm, _, last = reply(model, a, "a")
    fresh, _, _ = reply(model, a)
    assert warm == fresh and last.stats.cached_tokens > 0
    assert model.cache_info()["hits"]["disk"] == 1 and last.stats.cache_tier == "disk"
    _, _, last = reply(model, a + [{"role": "assistant", "content": warm}, {"role": "user", "content": "Go on."}], "a")
    assert last.stats.cache_tier == "memory"


def test_the_page_says_where_reused_tokens_came_from():
    import app
    from llm_backends import Stats

    line = app.stats_line(Stats(100, 90, 5, 0.1, 20.0, 0.4, cache_tier="disk"))
    assert "90 from cache (read from disk)" in line
    assert "(read from disk)" not in app.stats_line(Stats(100, 90, 5, 0.1, 20.0, 0.4, cache_tier="memory"))


def test_a_damaged_or_foreign_file_is_ignored_with_a_log_line(qwen3_dir, tmp_path, caplog):
    model = load(qwen3_dir, tmp_path)
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    reply(model, messages, "s")
    model.sessions.persist()
    (path,) = tmp_path.glob("*.kv")
    model_part, session_part = path.stem.split("-")
    assert len(model_part) == 16 and len(session_part) == 64, "the name is two hashes, not the session's name"

    other_precision = load(qwen3_dir, tmp_path, quantization="none")  # another model identity, same key
    with caplog.at_level(logging.WARNING):
        _, _, last = reply(other_precision, messages, "s")
    assert last.stats.cached_tokens == 0 and other_precision.cache_info()["disk"]["reads"] == 0

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    restarted = load(qwen3_dir, tmp_path)
    with caplog.at_level(logging.WARNING):
        text, _, last = reply(restarted, messages, "s")
    assert "checksum" in caplog.text and last.stats.cached_tokens == 0
    assert text == reply(restarted, messages)[0]


def test_one_persons_session_file_is_never_found_under_another_persons_key(qwen3_dir, tmp_path):
    model = load(qwen3_dir, tmp_path)
    mine, theirs = SessionKey("api", "key-a", "chat"), SessionKey("api", "key-b", "chat")
    assert model.sessions.tier.path(mine) != model.sessions.tier.path(theirs)
    lease, entry = model.sessions.checkout(mine, model.engine.new_entry)
    model.engine.runner.forward(entry, list(range(5, 60)))
    model.sessions.checkin(lease, entry)
    model.sessions.persist()
    restarted = load(qwen3_dir, tmp_path)
    _, found = restarted.sessions.checkout(theirs, restarted.engine.new_entry)
    assert found.ids == [] and restarted.cache_info()["hits"]["disk"] == 0
    _, found = restarted.sessions.checkout(mine, restarted.engine.new_entry)
    assert found.ids == list(range(5, 60))


def test_the_server_takes_a_cache_folder_from_the_flag_or_the_environment():
    import app

    assert app.parse_args(["--cache-dir", "/srv/kv"], env={}).cache_dir == "/srv/kv"
    assert app.parse_args([], env={"LLM_CACHE_DIR": "/data/kv"}).cache_dir == "/data/kv"
    assert app.parse_args([], env={}).cache_dir is None


def test_a_server_stopped_by_sigterm_writes_its_sessions_and_the_next_one_resumes_them(qwen3_dir, tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    root = Path(__file__).resolve().parent.parent
    cache = tmp_path / "kv"
    messages = [{"role": "user", "content": "Hello, how are you today? " * 4}]

    def start():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "app.py", "--model", str(qwen3_dir), "--port", str(port), "--cache-dir", str(cache)]
        server = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                    return server, url
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        server.kill()
        raise AssertionError(f"the server did not start: {server.stdout.read()}")

    def ask(url, history):
        body = {"messages": history, "max_tokens": 8, "temperature": 0, "user": "alice"}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()

    server, url = start()
    try:
        answer = ask(url, messages)["choices"][0]["message"]["content"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert len(list(cache.glob("*.kv"))) == 1, "the session was written when the server stopped"

    server, url = start()
    try:
        follow_up = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": "More."}]
        reply = ask(url, follow_up)
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def test_a_cleared_session_is_not_written_back_by_an_eviction_already_under_way(qwen3_dir, tmp_path):
    model = load(qwen3_dir, tmp_path)
    key = SessionKey("python", "", "forget-me")
    lease, entry = model.sessions.checkout(key, model.engine.new_entry)
    model.engine.runner.forward(entry, list(range(5, 40)))
    with model.sessions._lock:
        outgoing = model.sessions._outgo(key)
    payload = entry.payload()  # an eviction had copied it, and is about to write it
    model.sessions.clear(key)  # New chat, meanwhile
    model.sessions._save([(key, payload, outgoing)])
    assert not model.sessions.tier.path(key).exists()
    model.sessions.checkin(lease, entry)  # the cleared session's stream ends: nothing comes back
    assert model.cache_info()["sessions"] == 0


def test_forgetting_every_session_removes_this_models_files_and_nothing_else(qwen3_dir, gemma3_dir, tmp_path):
    qwen, gemma = load(qwen3_dir, tmp_path), load(gemma3_dir, tmp_path)
    for model in (qwen, gemma):
        reply(model, [{"role": "user", "content": "Hello, how are you today?"}], "a")
        model.sessions.persist()
    assert len(list(tmp_path.glob("*.kv"))) == 2
    qwen.clear_cache()
    assert qwen.cache_info()["disk"]["sessions"] == 0 and gemma.cache_info()["disk"]["sessions"] == 1
    assert qwen.cache_info()["sessions"] == 0


def test_a_copy_on_its_way_to_disk_from_before_a_clear_all_is_not_written(qwen3_dir, tmp_path):
    model = load(qwen3_dir, tmp_path)
    reply(model, [{"role": "user", "content": "Hello, how are you today?"}], "a")
    key = next(iter(model.sessions._entries))
    payload = model.sessions._entries[key].payload()
    with model.sessions._lock:
        outgoing = model.sessions._outgo(key)
    model.clear_cache()
    model.sessions._save([(key, payload, outgoing)])  # an eviction that raced the clear
    assert list(tmp_path.glob("*.kv")) == []


def test_switching_models_keeps_the_sessions_on_disk_for_when_the_model_returns(qwen3_dir, gemma3_dir, tmp_path):
    from llm_backends.serving import ModelRegistry

    registry = ModelRegistry([str(qwen3_dir), str(gemma3_dir)], max_cache_bytes=2**26, cache_dir=str(tmp_path))
    qwen = registry.switch(registry.ids[0])
    messages = [{"role": "user", "content": "Tell me about the sea, the sky and the mountains."}]
    text, _, _ = reply(qwen, messages, "a")
    registry.switch(registry.ids[1])
    assert qwen.cache_info()["sessions"] == 0, "the memory was let go"
    again = registry.switch(registry.ids[0])
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And the rivers?"}]
    warm, _, last = reply(again, messages, "a")
    assert last.stats.cache_tier == "disk" and last.stats.cached_tokens > 0
    assert warm == reply(again, messages)[0]


def _payload(n: int = 10) -> dict:
    import torch

    return {"ids": list(range(n)), "layers": [None], "restore_points": [], "filler": torch.zeros(n)}


def test_a_session_larger_than_the_disk_budget_is_not_written_and_the_others_stay(tmp_path, caplog):
    from llm_backends.disk_tier import DiskTier

    tier = DiskTier(tmp_path, "model", max_bytes=20_000)
    for name in "abc":
        assert tier.write(SessionKey("python", "", name), _payload())
    with caplog.at_level(logging.WARNING):
        assert not tier.write(SessionKey("python", "", "huge"), _payload(10_000))
    assert "larger than the disk budget" in caplog.text
    assert tier.info()["sessions"] == 3 and tier.info()["writes"] == 3


def test_a_file_that_cannot_be_removed_does_not_fail_the_write(tmp_path, caplog, monkeypatch):
    from pathlib import Path

    from llm_backends.disk_tier import DiskTier

    tier = DiskTier(tmp_path, "model", max_bytes=4_000)
    stuck = tier.path(SessionKey("python", "", "someone else's"))
    assert tier.write(SessionKey("python", "", "someone else's"), _payload())
    unlink = Path.unlink

    def refusing(path, missing_ok=False):
        if path == stuck:
            raise PermissionError("Operation not permitted")  # a sticky folder shared with another user
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refusing)
    with caplog.at_level(logging.WARNING):
        for name in "abc":
            assert tier.write(SessionKey("python", "", name), _payload())
    assert "could not remove" in caplog.text


def test_the_folder_keeps_other_processes_writes_and_files_that_are_not_ours(tmp_path):
    import os
    import time

    from llm_backends.disk_tier import TMP_PREFIX, DiskTier

    notes, writing, stale = tmp_path / "my-notes.tmp", tmp_path / f"{TMP_PREFIX}a.tmp", tmp_path / f"{TMP_PREFIX}b.tmp"
    for path in (notes, writing, stale):
        path.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # left by a process killed while writing
    DiskTier(tmp_path, "model", max_bytes=100)
    assert notes.exists() and writing.exists() and not stale.exists()


def test_deleting_a_chat_removes_its_files_for_every_model(tmp_path):
    from llm_backends.disk_tier import DiskTier
    from llm_backends.session_cache import SessionStore

    key, other = SessionKey("python", "", "forget-me"), SessionKey("python", "", "keep-me")
    before = DiskTier(tmp_path, "the model switched out", 2**20)  # or the code before an upgrade
    before.write(key, _payload())
    before.write(other, _payload())
    store = SessionStore(max_bytes=2**20, tier=DiskTier(tmp_path, "the model now", 2**20))
    store.tier.write(key, _payload())
    store.clear(key)
    assert [p.name for p in tmp_path.glob("*.kv")] == [before.path(other).name]


def test_a_file_under_another_sessions_name_is_refused_and_removed(tmp_path, caplog):
    import shutil

    from llm_backends.disk_tier import DiskTier

    tier = DiskTier(tmp_path, "model", 2**20)
    mine, theirs = SessionKey("api", "key-a", "chat"), SessionKey("api", "key-b", "chat")
    tier.write(theirs, _payload())
    shutil.copy(tier.path(theirs), tier.path(mine))
    with caplog.at_level(logging.WARNING):
        assert tier.load(mine, lambda: None) is None
    assert "another session" in caplog.text and tier.info()["rejected"] == 1
    assert not tier.path(mine).exists(), "a refused file is removed, not read and refused again"
    assert tier.path(theirs).exists()


def test_an_unusable_cache_dir_is_a_clear_error_before_the_weights_load(qwen3_dir, tmp_path, monkeypatch):
    import pytest

    from llm_backends import transformers_backend

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded first")

    import transformers

    monkeypatch.setattr(transformers_backend.int8_weights, "load_stored", no_weights)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    plain_file = tmp_path / "file"
    plain_file.write_text("")
    with pytest.raises(ValueError, match="cache_dir .* is not a folder this process can write"):
        load_model(str(qwen3_dir), cache_dir=str(plain_file / "kv"))
    with pytest.raises(ValueError, match="disk_cache_bytes"):
        load_model(str(qwen3_dir), cache_dir=str(tmp_path), disk_cache_bytes=0)


def test_a_new_cache_folder_is_its_owners_alone(tmp_path):
    from llm_backends.disk_tier import DiskTier

    DiskTier(tmp_path / "kv", "model", 2**20)
    assert (tmp_path / "kv").stat().st_mode & 0o777 == 0o700


def test_a_cache_from_another_cuda_mode_or_gpu_has_another_identity(monkeypatch):
    import torch

    from llm_backends.transformers_backend import cache_identity

    assert cache_identity("c", "none", "torch.float32", "cpu", True) == cache_identity(
        "c", "none", "torch.float32", "cpu", False
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    fast, exact = (cache_identity("c", "nf4", "torch.bfloat16", "cuda", mode) for mode in (False, True))
    assert fast != exact, "a cache from the fast kernels would break the exact mode's promise"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA A100-SXM4-80GB")
    assert cache_identity("c", "nf4", "torch.bfloat16", "cuda", True) != exact


def test_the_server_takes_a_disk_budget_from_the_flag_or_the_environment():
    import app

    assert app.parse_args(["--cache-dir-gb", "2"], env={}).cache_dir_gb == 2.0
    config = app.parse_args(["--cache-dir", "/srv/kv"], env={"LLM_CACHE_DIR_GB": "0.5"})
    assert config.cache_dir_gb == 0.5
    registry = app.registry_for(config)
    assert registry._load_kwargs["disk_cache_bytes"] == 2**29
