"""The page's turns on a tiny model: each saved chat keeps its own cache, Stop marks the reply and keeps its stats,
a Stop before the reply starts means it never starts, and leaving the page frees only what nobody can reach."""

from __future__ import annotations

import threading
import time

import pytest
from forwards import count_forwards

import app
import chat_history
from llm_backends.serving import ModelRegistry
from test_contract import FakeRequest

# ChatSettings: system prompt, temperature, top-p, top-k, max new tokens, repetition penalty, seed, thinking
GREEDY = ("", 0, 1, 0, 8, 1, -1, False)


@pytest.fixture()
def page(qwen3_dir):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**27)
    model = registry.switch(registry.ids[0])
    return registry, model


def turn(replies, history, chat_id, tab, settings=GREEDY, text=None):
    history = [*history, {"role": "user", "content": text}] if text else history
    return list(replies.respond_in_chat(history, chat_id, tab, *settings))[-1]


def stats_of(chat) -> str:
    return [m.metadata["title"] for m in chat if getattr(m, "metadata", None) and "first token" in m.metadata["title"]][
        -1
    ]


def as_dicts(chat) -> list[dict]:
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content, "metadata": m.metadata} for m in chat]


def test_each_chat_keeps_its_own_cache_when_another_chat_runs_in_the_same_tab(page):
    registry, model = page
    replies, tab = app.Replies(registry), FakeRequest("tab-1")
    a, b = chat_history.new_chat_id(), chat_history.new_chat_id()
    chat_a = as_dicts(turn(replies, [], a, tab, text="Tell me about lighthouses and their keepers."))
    turn(replies, [], b, tab, text="Something else entirely: rivers of Europe.")
    again = turn(replies, chat_a, a, tab, text="And the oldest one?")
    assert "from cache" in stats_of(again), "chat A's cache survived chat B's turn in the same tab"
    cached = int(stats_of(again).split(", ")[1].split(" ")[0])
    assert cached > model.count_tokens(model.request([{"role": "user", "content": "Tell me about lighthouses"}]))


def test_a_fresh_prompt_says_it_was_read_anew(page):
    registry, _ = page
    chat = turn(app.Replies(registry), [], chat_history.new_chat_id(), FakeRequest("t"), text="Hello there")
    assert "all read anew (nothing cached)" in stats_of(chat)


def test_stop_ends_the_reply_with_its_stats_and_a_stopped_mark(page):
    registry, model = page
    replies, tab = app.Replies(registry), FakeRequest("tab-1")
    updates = []
    long = ("", 0, 1, 0, 2000, 1, -1, False)
    history = [{"role": "user", "content": "Tell me a long story."}]
    calls, handle = count_forwards(model)
    reader = threading.Thread(
        target=lambda: updates.extend(replies.respond_in_chat(history, chat_history.new_chat_id(), tab, *long))
    )
    try:
        replies.announce(tab)
        reader.start()
        while len(calls) < 5:
            time.sleep(0.001)
        replies.stop(tab)
        reader.join(10)
        assert not reader.is_alive() and len(calls) < 100
    finally:
        handle.remove()
    title = stats_of(updates[-1])
    assert title.startswith("■ Stopped · ") and "tok/s" in title, title
    assert model.cache_info()["in_use"] == 0


def test_a_stop_before_the_reply_starts_means_it_never_starts(page):
    registry, model = page
    replies, tab = app.Replies(registry), FakeRequest("tab-1")
    calls, handle = count_forwards(model)
    try:
        replies.announce(tab)  # the page sent the message; the reply waits in the queue
        replies.stop(tab)
        chat = turn(replies, [], chat_history.new_chat_id(), tab, text="Hello")
    finally:
        handle.remove()
    assert calls == [] and chat[-1].metadata["title"] == "■ Stopped"
    later = turn(replies, [], chat_history.new_chat_id(), tab, text="Hello")
    assert "first token" in stats_of(later), "the Stop counted once"


@pytest.mark.parametrize("exposed", [False, True])
def test_leaving_the_page_frees_a_tabs_chats_only_where_nobody_can_reach_them_again(page, exposed):
    registry, model = page
    replies, tab = app.Replies(registry, exposed=exposed), FakeRequest("tab-1")
    chat_id = chat_history.new_chat_id()
    turn(replies, [], chat_id, tab, text="Tell me about lighthouses.")
    held = model.cache_info()["sessions"]
    replies.forget(tab)
    assert model.cache_info()["sessions"] == (held - 1 if exposed else held)
    replies.forget_chat(tab, chat_id)  # deleted from the history: freed in any case
    assert model.cache_info()["sessions"] == held - 1


def test_a_chat_id_the_page_did_not_make_falls_back_to_the_tabs_own_session(page):
    registry, _ = page
    replies, tab = app.Replies(registry), FakeRequest("tab-1")
    assert replies.chat_session(tab, "../other") == app.page_session(tab, False)
    assert replies.chat_session(tab, "a" * 32).name == "chat:" + "a" * 32


def test_a_saved_chat_names_only_files_the_page_stored(tmp_path, monkeypatch):
    """The browser keeps the saved chats: one edited to name a server file (the code, a logins file) must not
    have Gradio serve it."""
    from gradio.utils import get_upload_folder

    upload = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(upload))
    assert get_upload_folder() == str(upload)
    (upload / "abc").mkdir(parents=True)
    photo = upload / "abc" / "photo.png"
    photo.write_bytes(b"png")
    logins = tmp_path / "logins.txt"
    logins.write_text("ann:pw\n")
    messages = [
        {"role": "user", "content": [{"path": str(photo)}, {"type": "text", "text": "What is this?"}]},
        {"role": "user", "content": [{"type": "file", "file": {"path": app.__file__}}, "and this?"]},
        {"role": "user", "content": {"path": str(logins)}},
        {"role": "user", "content": [{"path": str(upload / "abc" / ".." / ".." / "logins.txt")}]},
        {"role": "user", "content": {"component": "file", "value": str(logins)}},
        {"role": "assistant", "content": "", "metadata": {"title": "1.0 s to first token", "evil": {"path": "x"}}},
        {"role": "system", "content": "not a chat message"},
    ]
    shown = chat_history.shown_messages(messages, app.page_file, app.missing_file)
    assert shown[0]["content"] == [{"path": str(photo)}, "What is this?"]
    assert shown[1]["content"] == ["[app.py: a file no longer on this server]", "and this?"]
    assert shown[2]["content"] == shown[3]["content"] == "[logins.txt: a file no longer on this server]"
    assert shown[4]["content"] == "", "a component part is left out"
    assert shown[5] == {"role": "assistant", "content": "", "metadata": {"title": "1.0 s to first token"}}
    assert len(shown) == 6
    assert app.exported_part(str(logins)) is None and app.attached_part(app.__file__)["type"] == "text"
    controls = {"messages": None}
    record = {"messages": messages, "settings": {}}
    _, opened, *_ = app.opened_chat(
        {f.name: type("C", (), {})() for f in app.fields(app.ChatSettings)} | controls, "c1", {"c1": record}
    )
    assert "logins" not in str(opened) and app.__file__ not in str(opened)


def test_saved_settings_out_of_their_controls_range_are_left_out():
    class Slider:
        minimum, maximum = 0, 2

    controls = {f.name: type("C", (), {})() for f in app.fields(app.ChatSettings)} | {"temperature": Slider()}
    assert app.settings_in_range(controls, {"temperature": 99, "top_p": 0.5}) == {"top_p": 0.5}
    assert app.settings_in_range(controls, {"temperature": 1.5}) == {"temperature": 1.5}


def test_a_chat_saved_before_the_later_settings_gets_their_defaults_back():
    """Opening a chat saved before min-p and the penalties existed sets them to their defaults (it was made
    with them), instead of keeping the previous chat's; a chat without settings leaves the controls alone."""
    controls = {f.name: type("C", (), {})() for f in app.fields(app.ChatSettings)}
    old = {"system_prompt": "", "temperature": 0.5, "top_p": 1, "top_k": 0, "max_new_tokens": 64}
    updates = dict(zip([f.name for f in app.fields(app.ChatSettings)], app.saved_settings(controls, old), strict=True))
    for name in ("min_p", "presence_penalty", "frequency_penalty", "thinking_budget", "dry_multiplier"):
        assert updates[name]["value"] == 0, name
    assert updates["xtc_probability"]["value"] == 0 and updates["xtc_threshold"]["value"] == 0.1
    assert updates["temperature"]["value"] == 0.5 and "value" not in updates["seed"]
    assert all("value" not in update for update in app.saved_settings(controls, None))


def test_undoing_a_turn_ends_its_running_reply(page):
    registry, _ = page
    replies = app.Replies(registry)
    tab = FakeRequest("tab-undo")
    counts = []
    for undone in (False, True):
        replies.announce(tab)
        stream = replies.respond_in_chat(
            [{"role": "user", "content": "Tell me a story."}], "c1", tab, "", 0, 1, 0, 400, 1, -1, False
        )
        next(stream)
        if undone:
            replies.end(tab)  # what Undo and the chat's trash button do first
        counts.append(len(list(stream)))
    assert counts[0] > 50 and counts[1] <= 1, f"steps streamed after the first: {counts}"
