"""Saved chats (pure logic): names, the list, limits, export to and import from OpenAI messages, bad files."""

from __future__ import annotations

import json
import stat

import pytest

import chat_history
from chat_history import export_chat, import_chat, rename, upsert

KNOWN = {"system_prompt": (str,), "temperature": (int, float), "top_k": (int, float), "seed": (int, type(None))}
PAGE = [
    {"role": "user", "content": [{"type": "text", "text": "What is the tallest lighthouse?"}]},
    {"role": "assistant", "content": "Hmm", "metadata": {"title": "💭 Thinking", "status": "done"}},
    {"role": "assistant", "content": [{"type": "text", "text": "The Jeddah Light, $133\\,m$."}]},
    {"role": "assistant", "content": "", "metadata": {"title": "0.10 s to first token · 30 tok/s"}},
]


def test_a_chat_is_named_after_its_first_message_until_it_is_renamed():
    a = chat_history.new_chat_id()
    chats = upsert({}, a, PAGE[:1], {})
    assert chats[a]["title"] == "What is the tallest lighthouse?"
    edited = [{"role": "user", "content": "Tell me about ships"}]
    chats = upsert(chats, a, edited, {})
    assert chats[a]["title"] == "Tell me about ships", "an edited first message renames an unnamed chat"
    chats = rename(chats, a, "  Ships   and sea ")
    chats = upsert(chats, a, PAGE, {})
    assert chats[a]["title"] == "Ships and sea", "a name given by hand stays"
    assert len(chat_history.title_for([{"role": "user", "content": "word " * 100}])) == chat_history.MAX_TITLE


def test_the_list_shows_the_most_recent_first_and_drops_the_oldest_beyond_the_limit(monkeypatch):
    clock = iter(range(10_000))
    monkeypatch.setattr(chat_history.time, "time", lambda: next(clock))
    monkeypatch.setattr(chat_history, "MAX_CHATS", 3)
    chats, ids = {}, [chat_history.new_chat_id() for _ in range(4)]
    for n, chat_id in enumerate(ids):
        chats = upsert(chats, chat_id, [{"role": "user", "content": f"chat {n}"}], {})
    assert [title for title, _ in chat_history.choices(chats)] == ["chat 3", "chat 2", "chat 1"]
    chats = upsert(chats, ids[1], [{"role": "user", "content": "chat 1"}], {})
    assert chat_history.choices(chats)[0] == ("chat 1", ids[1])
    assert chat_history.choices(chat_history.delete(chats, ids[1]))[0][1] == ids[3]


def test_bad_names_and_unknown_chats_are_refused_and_change_nothing():
    a = chat_history.new_chat_id()
    chats = upsert({}, a, PAGE, {})
    for title, error in (("   ", "empty"), ("x" * 81, "at most 80"), ("fine", "saved chat")):
        with pytest.raises(ValueError, match=error):
            rename(chats, a if title.strip() != "fine" else chat_history.new_chat_id(), title)
    assert chats[a]["title"] == "What is the tallest lighthouse?"


def test_malformed_stored_entries_are_left_out():
    a = chat_history.new_chat_id()
    stored = {a: {"messages": PAGE}, "not-an-id": {"messages": []}, chat_history.new_chat_id(): "junk"}
    assert list(chat_history.saved(stored)) == [a]
    assert chat_history.saved(None) == {} and chat_history.saved(["a"]) == {}
    assert chat_history.valid_chat_id("../../etc") is None and chat_history.valid_chat_id(a) == a


def test_export_is_openai_messages_without_page_notes_and_imports_back():
    settings = {"system_prompt": "Be brief.", "temperature": 0.3, "top_k": 7}
    body = json.loads(export_chat({"title": "Lighthouses", "messages": PAGE, "settings": settings}))
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the tallest lighthouse?"},
        {"role": "assistant", "content": "The Jeddah Light, $133\\,m$."},
    ]
    assert body["title"] == "Lighthouses" and body["settings"] == {"temperature": 0.3, "top_k": 7}
    title, messages, imported = import_chat(json.dumps(body).encode(), KNOWN)
    assert title == "Lighthouses" and imported == settings
    assert messages == body["messages"][1:]


def test_a_bare_list_of_openai_messages_imports_with_text_parts_joined():
    data = json.dumps(
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ]
    )
    title, messages, settings = import_chat(data, KNOWN)
    assert (title, messages, settings) == (
        "Hi there",
        [{"role": "user", "content": "Hi there"}],
        {"system_prompt": "Be kind."},
    )


@pytest.mark.parametrize(
    "data, error",
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"{not json", "not JSON"),
        (b'{"title": "x"}', "exported chat"),
        (b"[]", "no user message"),
        (b'[{"role": "tool", "content": "x"}]', r"messages\[0\] needs a role"),
        (b'[{"role": "user", "content": 3}]', r"messages\[0\].content"),
        (b'[{"role": "user", "content": [{"type": "text", "text": 5}]}]', r"messages\[0\].content"),
        (b'[{"role": "user", "content": [[{"type": "text", "text": "x"}]]}]', r"messages\[0\].content"),
        (b"[" + b" " * chat_history.MAX_IMPORT_BYTES + b"]", "larger than"),
    ],
)
def test_a_bad_file_gets_a_clear_error(data, error):
    with pytest.raises(ValueError, match=error):
        import_chat(data, KNOWN)


def test_unknown_settings_and_wrong_types_in_an_import_are_left_out():
    settings = {"temperature": 0, "evil": 1, "system_prompt": 5, "seed": "x", "top_k": True}
    data = json.dumps({"messages": [{"role": "user", "content": "hi"}], "settings": settings})
    assert import_chat(data, KNOWN)[2] == {"temperature": 0}


def test_the_stored_chats_stay_under_the_browsers_quota_dropping_the_oldest(monkeypatch):
    clock = iter(range(10_000))
    monkeypatch.setattr(chat_history.time, "time", lambda: next(clock))
    monkeypatch.setattr(chat_history, "MAX_STORED_BYTES", 5_000)
    chats, ids = {}, [chat_history.new_chat_id() for _ in range(5)]
    for chat_id in ids:
        chats = upsert(chats, chat_id, [{"role": "user", "content": "x" * 1_500}], {})
    assert ids[-1] in chats and ids[0] not in chats
    assert len(json.dumps(chats)) <= 5_000 + 2_000


def test_the_page_secret_survives_a_restart_and_only_its_owner_reads_it(tmp_path):
    first = chat_history.page_secret(tmp_path / "cache")
    assert chat_history.page_secret(tmp_path / "cache") == first and len(first) >= 24
    assert stat.S_IMODE((tmp_path / "cache" / "page-secret").stat().st_mode) == 0o600
    (tmp_path / "cache" / "page-secret").write_text("")
    assert len(chat_history.page_secret(tmp_path / "cache")) >= 24, "an empty file is not an empty key"


def test_images_export_as_data_urls_and_import_back_as_files_while_a_missing_file_becomes_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # attached images are in Gradio's upload folder
    import app
    from test_images import data_url, picture

    photo = tmp_path / "photo.png"
    picture(3).save(photo)
    page = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(photo)}}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
    ]
    body = json.loads(export_chat({"messages": page, "settings": {}}, app.exported_part))
    parts = body["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1] == {
        "type": "text",
        "text": "Hi",
    }
    title, messages, _ = import_chat(json.dumps(body), KNOWN, app.imported_image)
    assert title == "Hi" and messages[0]["content"][1] == "Hi"
    stored = messages[0]["content"][0]["path"]
    assert app.exported_part(stored) == parts[0], "the same pixels come back"
    with pytest.raises(ValueError, match="image_url"):
        import_chat(json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]), KNOWN)
    with pytest.raises(ValueError, match="data: URL"):
        import_chat(
            json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": "file:///etc/passwd"}]}]),
            KNOWN,
            app.imported_image,
        )
    system = [{"role": "system", "content": [{"type": "image_url", "image_url": data_url(picture(1))}]}]
    with pytest.raises(ValueError, match="must be a text part"):
        import_chat(json.dumps(system + body["messages"]), KNOWN, app.imported_image)
    photo.unlink()
    sent = chat_history.openai_messages(page, "", app.attached_part)
    assert sent[0]["content"] == [{"type": "text", "text": app.MISSING_IMAGE}, {"type": "text", "text": "Hi"}]


def test_an_exported_photo_keeps_its_own_encoding_and_a_text_model_gets_a_note_for_earlier_images(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # attached images are in Gradio's upload folder
    import app
    from test_images import picture

    photo = tmp_path / "photo.jpg"
    picture(4).save(photo, format="JPEG", quality=80)
    part = app.exported_part(str(photo))
    assert part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    page = [{"role": "user", "content": [{"path": str(photo)}, "What is it?"]}, {"role": "assistant", "content": "A"}]
    sent = app.to_messages("", page, "And now?", images=False)
    assert sent[0]["content"] == [
        {"type": "text", "text": app.TEXT_ONLY_IMAGE},
        {"type": "text", "text": "What is it?"},
    ]
    assert app.to_messages("", page, "And now?")[0]["content"][0]["type"] == "image"
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": part["image_url"]}] * 3}]
    with pytest.raises(ValueError, match="at most 2"):
        import_chat(json.dumps(many), KNOWN, app.imported_image, max_images=2)
    _, messages, _ = import_chat(json.dumps(many), KNOWN, app.imported_image, max_images=3)
    paths = chat_history.files_of(messages[0]["content"])
    assert len(set(paths)) == 1 and paths[0].endswith(".jpg"), "the same image is stored once, as it came"


def test_a_steps_changes_name_only_what_it_changed_with_versions_that_order_them():
    one, two = chat_history.new_chat_id(), chat_history.new_chat_id()
    before = chat_history.upsert({}, one, [{"role": "user", "content": "a"}], {})
    before = chat_history.upsert(before, two, [{"role": "user", "content": "b"}], {})
    after = chat_history.rename(before, one, "Renamed")
    ((changed, record, version),) = chat_history.changes(before, after)
    assert changed == one and record["title"] == "Renamed" and version == record["v"] > before[one]["v"]
    stale = {one: before[one]}  # a copy taken before `two` was saved: `two` is not reported deleted
    assert [c[0] for c in chat_history.changes(stale, chat_history.upsert(stale, one, [], {}))] == [one]
    ((deleted, nothing, when),) = chat_history.changes(after, chat_history.delete(after, two))
    assert deleted == two and nothing is None and when == after[two]["v"]


def test_a_removal_carries_the_removed_records_version_so_a_newer_save_elsewhere_survives_it():
    chat = chat_history.new_chat_id()
    stale = chat_history.upsert({}, chat, [{"role": "user", "content": "a"}], {})
    newer = chat_history.upsert(stale, chat, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {})
    ((removed, nothing, version),) = chat_history.changes(stale, chat_history.delete(stale, chat))
    assert nothing is None and version == stale[chat]["v"] < newer[chat]["v"]


def turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_a_retried_or_edited_turn_keeps_its_earlier_versions_which_come_back_in_order():
    first = turn("Hi", "Hello")
    asked = [*first, *turn("Name a sea", "Baltic")]
    forks = chat_history.fork(asked, [], 2)  # retried: the new answer is about to be written
    retried = [*first, *turn("Name a sea", "Aegean")]
    assert chat_history.versions(forks) == (2, 2, 2)
    forks = chat_history.fork(retried, forks, 2)
    edited = [*first, *turn("Name an ocean", "Pacific")]
    assert chat_history.versions(forks) == (2, 3, 3)
    messages, forks = chat_history.switch(edited, forks, 2, -1)
    assert messages == retried and chat_history.versions(forks) == (2, 2, 3)
    messages, forks = chat_history.switch(messages, forks, 2, -1)
    assert messages == asked and chat_history.versions(forks) == (2, 1, 3)
    with pytest.raises(ValueError, match="no other version"):
        chat_history.switch(messages, forks, 2, -1)
    messages, forks = chat_history.switch(*chat_history.switch(messages, forks, 2, 1), 2, 1)
    assert messages == edited and chat_history.versions(forks) == (2, 3, 3)
    # A retry while an earlier version is shown adds the newest version last, losing none.
    messages, forks = chat_history.switch(messages, forks, 2, -1)
    forks = chat_history.fork(messages, forks, 2)
    assert chat_history.versions(forks) == (2, 4, 4)
    order, messages = [], asked  # the new version stands in for the one being written
    for _ in range(3):
        messages, forks = chat_history.switch(messages, forks, 2, -1)
        order.append(messages[3]["content"])
    assert order == ["Pacific", "Aegean", "Baltic"], "the versions keep their order, the newest last"


def test_versions_within_a_version_travel_with_it_and_a_later_turn_keeps_the_fork():
    first, second = turn("One", "1"), turn("Two", "2")
    chat = [*first, *second]
    forks = chat_history.fork(chat, [], 2)  # the second turn retried
    chat = [*first, *turn("Two", "two"), *turn("Three", "3")]  # answered, then a third turn
    assert chat_history.forks_of({"messages": chat, "forks": forks}) == forks, "a new turn keeps the fork"
    forks = chat_history.fork(chat, forks, 0)  # now the first message is edited: everything after it set aside
    assert [f["at"] for f in forks] == [0]
    chat = turn("Uno", "uno")
    messages, forks = chat_history.switch(chat, forks, 0, -1)
    assert messages == [*first, *turn("Two", "two"), *turn("Three", "3")]
    assert [f["at"] for f in forks] == [0, 2] and chat_history.versions(forks) == (2, 2, 2)
    back, inner = chat_history.switch(messages, forks, 2, -1)
    assert back == chat[:0] + [*first, *second], "the inner fork's earlier version comes back"
    assert chat_history.versions(inner) == (2, 1, 2)


def test_a_failed_retry_shows_the_version_it_would_have_replaced_and_keeps_every_other():
    chat = [*turn("Hi", "Hello"), *turn("Name a sea", "Baltic")]
    forks = chat_history.fork(chat, [], 2)
    failed = [*chat[:2], {"role": "user", "content": "Name a sea"}]  # no answer: the reply failed
    assert chat_history.drop_shown(failed, forks, 2) == (chat, [])
    assert chat_history.drop_shown(failed, [], 2) is None
    # A tail without an answer is never kept as a version.
    assert chat_history.fork(failed, [], 2) == []


def test_versions_are_capped_and_only_well_formed_forks_of_the_browsers_copy_are_used():
    chat, forks = turn("Q", "a0"), []
    for n in range(chat_history.MAX_VERSIONS + 3):
        forks = chat_history.fork(chat, forks, 0)
        chat = turn("Q", f"a{n + 1}")
    assert chat_history.versions(forks) == (0, chat_history.MAX_VERSIONS, chat_history.MAX_VERSIONS)
    good = {"at": 0, "before": [{"messages": turn("Q", "x")}], "after": []}
    junk = [
        "x",
        {"at": 1, "before": [{"messages": turn("Q", "x")}]},  # not a user message
        {"at": True, "before": [{"messages": turn("Q", "x")}]},
        {"at": 0, "before": [{"messages": [{"role": "assistant", "content": "x"}]}, "x"], "after": "x"},
        good,
        {"at": 0, "before": [{"messages": turn("Q", "y")}]},  # a second fork at the same message
    ]
    clean = chat_history.forks_of({"messages": chat, "forks": junk})
    assert clean == [{**good, "before": [{"messages": turn("Q", "x"), "forks": []}]}]
    long = turn("Q", "x") * 6_000
    deep = {"messages": long}
    for level in reversed(range(1, 5_000)):  # nested far beyond any real chat: read without a RecursionError
        deep = {"messages": long, "forks": [{"at": 2 * level, "before": [deep]}]}
    nested = chat_history.forks_of({"messages": long, "forks": [{"at": 0, "before": [deep]}]})
    depth = 0
    while nested:
        nested, depth = nested[0]["before"][0]["forks"], depth + 1
    assert depth == chat_history.MAX_FORK_DEPTH
    saved = upsert({}, chat_history.new_chat_id(), chat, {}, forks=clean)
    assert [r["forks"] for r in saved.values()] == [clean]
    assert "forks" not in next(iter(upsert({}, chat_history.new_chat_id(), chat, {}).values()))


def test_a_failed_retry_of_an_earlier_version_brings_that_version_back_in_its_place():
    base = turn("Hi", "Hello")
    chat, forks = [*base, *turn("Sea?", "Baltic")], []
    for answer in ("Aegean", "Black"):
        forks = chat_history.fork(chat, forks, 2)
        chat = [*base, *turn("Sea?", answer)]
    chat, forks = chat_history.switch(*chat_history.switch(chat, forks, 2, -1), 2, -1)
    assert chat[3]["content"] == "Baltic" and chat_history.versions(forks) == (2, 1, 3)
    forks = chat_history.fork(chat, forks, 2)  # retried while version 1 is shown; the reply fails
    stored = chat_history.forks_of({"messages": [*base, chat[2]], "forks": forks})  # as the browser keeps it
    restored, forks = chat_history.drop_shown([*base, chat[2]], stored, 2)
    assert restored[3]["content"] == "Baltic" and chat_history.versions(forks) == (2, 1, 3)
    later = [chat_history.switch(restored, forks, 2, 1)[0][3]["content"]]
    assert later == ["Aegean"], "the others keep their order"


def test_saved_versions_follow_the_chat_only_while_the_messages_up_to_their_fork_are_unchanged():
    a = chat_history.new_chat_id()
    chat = [*turn("One", "1"), *turn("Two", "2")]
    forks = chat_history.fork(chat, [], 2)
    chat = [*turn("One", "1"), *turn("Two", "two")]
    chats = upsert({}, a, chat, {}, forks=forks)
    grown = [*chat, *turn("Three", "3")]
    reshaped = [{"role": "user", "content": [{"type": "text", "text": "One"}]}, *grown[1:]]  # the page's own shape
    assert upsert(chats, a, reshaped, {})[a]["forks"] == forks, "a new turn keeps them"
    assert "forks" not in upsert(chats, a, chat[:2], {})[a], "an undone turn takes its versions with it"
    other = [*turn("Uno", "1"), *chat[2:]]  # another tab's chat, saved over this one
    assert "forks" not in upsert(chats, a, other, {})[a], "versions of another chat's message are not kept"


def test_versions_never_take_more_than_their_budget_so_other_chats_stay():
    chats = {}
    for n in range(20):
        chats = upsert(chats, chat_history.new_chat_id(), turn(f"chat {n}", "x" * 5_000), {})
    a = chat_history.new_chat_id()
    chat, forks = [m for n in range(45) for m in turn(f"question {n}", "y" * 3_000)], []
    for n in range(30):  # the first message edited again and again: each version is nearly the whole chat
        forks = chat_history.fork(chat, forks, 0)
        chat = [*turn(f"edit {n}", "z"), *chat[2:]]
        chats = upsert(chats, a, chat, {}, forks=forks)
    assert len(chats) == 21, "no other chat was pushed out"
    kept = chats[a]["forks"]
    assert len(json.dumps(kept, ensure_ascii=False).encode()) <= chat_history.MAX_VERSION_BYTES
    oldest = kept[0]["before"][0]["messages"][0]["content"]
    assert oldest != "question 0" and kept[0]["before"][-1]["messages"][0]["content"] == "edit 28", "oldest go first"


def test_a_malformed_saved_message_neither_breaks_a_retry_nor_shifts_a_fork():
    odd = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "metadata": "x"}]
    assert chat_history.fork(odd, [], 0)[0]["before"][0]["messages"] == odd
    forks = [{"at": 0, "before": [{"messages": [*turn("Q", "x"), "junk"]}], "after": []}]
    assert chat_history.forks_of({"messages": turn("Q", "y"), "forks": forks}) == [], "a tail the chat cannot show"
    assert chat_history.forks_of({"messages": [*turn("Q", "y"), 7], "forks": forks[:0]}) == []


def test_the_limits_never_drop_the_version_a_retry_set_aside_so_a_failed_reply_shows_it_again():
    base, forks = turn("Hi", "Hello"), []
    chat = [*base, *turn("Sea?", "v0")]
    for n in range(1, chat_history.MAX_VERSIONS):
        forks = chat_history.fork(chat, forks, 2)
        chat = [*base, *turn("Sea?", f"v{n}")]
    while chat_history.versions(forks)[1] > 1:
        chat, forks = chat_history.switch(chat, forks, 2, -1)
    assert chat[3]["content"] == "v0" and chat_history.versions(forks)[2] == chat_history.MAX_VERSIONS
    forks = chat_history.fork(chat, forks, 2)  # retried at version 1 of 16: one version must go, not this one
    restored, _ = chat_history.drop_shown([*base, chat[2]], forks, 2)
    assert restored[3]["content"] == "v0"
    # The bytes' budget too: four big answers, the second shown and retried; the oldest go, never the second.
    chat, forks = [*base, *turn("Sea?", "A" * 150_000)], []
    for letter in "BCD":
        forks = chat_history.fork(chat, forks, 2)
        chat = [*base, *turn("Sea?", letter * 150_000)]
    for _ in range(2):
        chat, forks = chat_history.switch(chat, forks, 2, -1)
    assert chat[3]["content"][0] == "B"
    forks = chat_history.within_budget(chat_history.fork(chat, forks, 2))
    restored, _ = chat_history.drop_shown([*base, chat[2]], forks, 2)
    assert restored[3]["content"][0] == "B"


def test_the_budget_drops_nested_versions_before_the_one_an_edit_set_aside():
    base = turn("Hi", "Hello")
    chat, forks = [*base, *turn("Sea?", "a0" + "x" * 100_000)], []
    for n in range(1, 6):
        forks = chat_history.fork(chat, forks, 2)
        chat = [*base, *turn("Sea?", f"a{n}" + "x" * 100_000)]
    forks = chat_history.within_budget(chat_history.fork(chat, forks, 0))  # the first message edited
    assert len(json.dumps(forks).encode()) <= chat_history.MAX_VERSION_BYTES
    restored, _ = chat_history.drop_shown([{"role": "user", "content": "Hey"}], forks, 0)
    assert restored == chat, "the whole chat before the edit comes back, its latest answer included"


def test_the_budget_measures_a_large_saved_copy_whole_only_a_few_times(monkeypatch):
    forks = [{"at": 0, "before": [{"messages": turn("Q", "x" * 700), "forks": []} for _ in range(1_500)], "after": []}]
    wholes, size = [], chat_history._size
    monkeypatch.setattr(chat_history, "_size", lambda value: wholes.append(isinstance(value, list)) or size(value))
    trimmed = chat_history.within_budget(forks)
    assert len(json.dumps(trimmed).encode()) <= chat_history.MAX_VERSION_BYTES
    assert sum(wholes) <= 4, "the forks are not measured whole once per dropped version (quadratic in their size)"


def test_a_search_finds_the_chats_holding_every_word_newest_first_with_a_few_words_around_them(monkeypatch):
    clock = iter(range(100, 200))
    monkeypatch.setattr(chat_history.time, "time", lambda: next(clock))
    chats = None
    for n, (question, answer) in enumerate(
        [
            ("Name an ocean.", "The Pacific Ocean is the largest of the five oceans on Earth, by far."),
            ("What is a lake?", "A body of fresh water; the ocean is salt."),
            ("Tell me a joke.", "Why did the chicken cross the road?"),
        ]
    ):
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "", "metadata": {"title": "0.1 s to first token · PACIFIC"}},
            {"role": "assistant", "content": answer},
        ]
        chats = upsert(chats, f"{n:032x}", messages, {})
    ids = [f"{n:032x}" for n in range(3)]
    assert [chat_id for _, chat_id in chat_history.search(chats, "OCEAN")] == [ids[1], ids[0]], "newest first"
    assert chat_history.search(chats, "ocean NAME") == [("Name an ocean.", ids[0])], "the title holds them all"
    label, _ = chat_history.search(chats, "pacific largest")[0]
    assert label == "Name an ocean. · The Pacific Ocean is the largest of the five oceans…"
    assert chat_history.search(chats, "road joke") == [("Tell me a joke. · …the chicken cross the road?", ids[2])]
    assert chat_history.search(chats, "first token") == [], "page notes are not searched"
    assert chat_history.search(chats, "  ") == chat_history.search(chats, None) == []
    assert len(chat_history.search(chats, "the", limit=2)) == 2


def test_a_search_survives_whatever_the_browser_saved_and_looks_for_at_most_eight_words():
    chats = upsert(None, "a" * 32, [{"role": "user", "content": "Straße " * 30 + "Pacific ocean"}], {})
    chats["a" * 32]["messages"] += ["hello", None, {"role": "user", "content": {"type": "text", "text": 5}}]
    label, _ = chat_history.search(chats, "PACIFIC")[0]
    assert "Pacific" in label, "the words around the match, though case-folding lengthens what comes before"
    many = " ".join(f"w{n}" for n in range(2000)) + " pacific"
    assert chat_history.search(chats, many) == [], "the first 8 words are looked for (w0... are in no chat)"
    assert chat_history.search(chats, "pacific " * 2000 + "x" * 5000) == [], "a word is cut to 64 characters"
    assert len(chat_history.search(chats, "straße " * 100)) == 1, "the same word counts once"


def test_the_search_index_the_server_keeps_for_a_tab_holds_at_most_the_browsers_budget_of_text(monkeypatch):
    chats = upsert(None, "a" * 32, [{"role": "user", "content": "old " * 40 + "walrus"}], {})
    chats = upsert(chats, "b" * 32, [{"role": "user", "content": "new " * 20 + "otter"}], {})
    monkeypatch.setattr(chat_history, "MAX_STORED_BYTES", 100)
    index = chat_history.search_index(chats)
    assert [chat_id for _, chat_id, _ in index] == ["b" * 32, "a" * 32], "newest first"
    assert sum(len(body) for _, _, body in index) == 100
    assert chat_history.find(index, "otter") == chat_history.search(chats, "otter") != []
    assert chat_history.find(index, "walrus") == [], "text past the budget is not kept"
    assert chat_history.find(None, "otter") == []
