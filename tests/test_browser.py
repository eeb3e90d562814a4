"""A real browser (Debian chromium driven by playwright) against the app: streaming, Stop, isolation, saved chats,
edit and Stop, LaTeX and code, the phone layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from forwards import count_forwards

import app
from llm_backends.serving import ModelRegistry
from test_app import free_port, slowly_loading

pytestmark = pytest.mark.embedded
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "test-output"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


SERVED: dict = {}  # the page_url fixture's server (its state holder)


@pytest.fixture(scope="module")
def page_url(embedded):
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"chromium is missing at {CHROMIUM}: apt-get install -y chromium (tests/run.sh does this)")
    registry = ModelRegistry([None], max_cache_bytes=2**30)
    registry.model, registry.current_id = embedded, registry.ids[0]
    config = app.AppConfig(port=free_port(), concurrency=2)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    SERVED["demo"] = demo
    yield f"http://127.0.0.1:{config.port}/", registry
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield instance
        instance.close()


def bot_text(page) -> str:
    bubbles = page.locator(".message-row.bot-row .message, .bot .message-content, [data-testid='bot']")
    return " ".join(bubbles.all_inner_texts())


def send(page, text: str) -> None:
    box = page.get_by_placeholder("Type a message…")
    box.fill(text)
    box.press("Enter")


def open_page(browser, url, width=1200, context=None):
    """A new tab, in a new browser context (its own storage) unless ``context`` is given."""
    context = context or browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.goto(url)
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    time.sleep(1.0)
    return page


def wait_reply(page, count: int) -> str:
    """Waits until the chat shows ``count`` stats lines; returns the last."""
    stats = page.locator("#chat .thought-group", has_text="first token")
    deadline = time.time() + 90
    while stats.count() < count and time.time() < deadline:
        time.sleep(0.1)
    assert stats.count() >= count, f"reply {count} did not finish"
    time.sleep(0.5)  # the turn's last step saves the chat
    return stats.nth(count - 1).inner_text()


def is_caption(note) -> bool:
    """A page note shown as a plain line: no expand arrow, no box."""
    boxed = note.evaluate("e => getComputedStyle(e).borderTopStyle") != "none"
    return not note.locator(".arrow").is_visible() and not boxed


def saved_titles(page) -> list[str]:
    return [t.strip() for t in page.locator("#chat-list label").all_inner_texts()]


def import_file(page, path) -> None:
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Import JSON").click()
    chooser.value.set_files(str(path))
    time.sleep(1.5)


def test_browser_chat_streams_stops_and_isolates_visitors(page_url, browser):
    url, registry = page_url
    model = registry.get()
    SHOTS.mkdir(exist_ok=True)
    page = open_page(browser, url, width=1100)

    send(page, "Tell me about the history of lighthouses.")
    lengths = []
    deadline = time.time() + 90
    while time.time() < deadline:
        lengths.append(len(bot_text(page)))
        if "to first token" in page.content():
            break
        time.sleep(0.15)
    growth = sorted(set(n for n in lengths if n))
    assert len(growth) >= 3, f"the reply should grow in several steps, saw lengths {growth}"
    page.screenshot(path=str(SHOTS / "browser-reply.png"), full_page=True)
    stats = page.locator(".thought-group", has_text="to first token").last
    assert stats.is_visible() and is_caption(stats), "stats are a plain caption"

    calls, handle = count_forwards(model)
    try:
        send(page, "Write a very long story about the sea, the sky and the mountains.")
        deadline = time.time() + 60
        while len(calls) < 10 and time.time() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 10, "generation started"
        page.locator("button.stop-button").click()
        time.sleep(1.5)
        settled = len(calls)
        time.sleep(2.0)
        assert len(calls) == settled, "the server kept generating after Stop"
        assert model.cache_info()["in_use"] == 0
    finally:
        handle.remove()
    page.screenshot(path=str(SHOTS / "browser-stopped.png"), full_page=True)

    other = open_page(browser, url)
    assert bot_text(other).strip() == "", "a second visitor starts with an empty chat"
    assert "France" not in other.locator(".message-row, .message").all_inner_texts().__str__()
    other.screenshot(path=str(SHOTS / "browser-second-visitor.png"), full_page=True)


def test_at_phone_width_the_model_info_sits_below_the_dropdown_and_says_base_model(page_url, browser):
    url, _ = page_url
    page = open_page(browser, url, width=390)
    assert page.locator(".sidebar.open").count() == 0, "on a phone the chats' panel starts closed"
    picker = page.locator("#model-picker input")
    assert picker.evaluate("e => getComputedStyle(e).textOverflow") == "ellipsis", "a long model id ends in …"
    assert picker.evaluate("e => parseFloat(getComputedStyle(e).paddingRight)") >= 24, "…before the arrow"
    dropdown = page.get_by_text("Switching loads the model").bounding_box()
    note = page.locator("p", has_text="This is a base model").first
    info = note.bounding_box()
    assert info["y"] > dropdown["y"] + dropdown["height"], "the info wraps below instead of being squeezed"
    assert info["width"] > 250, info
    assert "Qwen/Qwen3-0.6B" in page.content()
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "browser-phone.png"), full_page=True)


def test_saved_chats_survive_a_reload_and_reopen_with_their_settings_their_cache_and_an_export(
    page_url, browser, tmp_path
):
    url, _ = page_url
    page = open_page(browser, url)
    page.get_by_text("System prompt and sampling").click()
    page.get_by_label("System prompt").fill("You answer in one short sentence.")
    page.get_by_label("Presence penalty").first.fill("1.5")
    send(page, "The capital of France is")
    wait_reply(page, 1)
    page.get_by_role("button", name="New chat").click()
    page.get_by_label("System prompt").fill("")
    page.get_by_label("Presence penalty").first.fill("0")
    send(page, "Rivers of Europe:")
    wait_reply(page, 1)
    assert saved_titles(page) == ["Rivers of Europe:", "The capital of France is"]

    page.reload()
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    time.sleep(1.5)
    assert saved_titles(page) == ["Rivers of Europe:", "The capital of France is"], "the list survives a reload"
    assert "Rivers of Europe" in bot_text(page) or "Rivers of Europe" in page.locator("#chat").inner_text()
    page.locator("#chat-list label", has_text="The capital of France is").click()
    time.sleep(1.0)
    assert "The capital of France is" in page.locator("#chat").inner_text()
    page.get_by_text("System prompt and sampling").click()
    assert page.get_by_label("System prompt").input_value() == "You answer in one short sentence."
    assert page.get_by_label("Presence penalty").first.input_value() == "1.5"
    send(page, "And of Italy?")
    assert "from cache" in wait_reply(page, 2), "the reopened chat's next turn reuses its cache"
    page.screenshot(path=str(SHOTS / "browser-saved-chats.png"), full_page=True)

    page.get_by_text("Rename, delete, export, import").click()
    page.get_by_label("Name of the open chat").fill("Capitals")
    page.get_by_role("button", name="Rename", exact=True).click()
    time.sleep(0.8)
    assert saved_titles(page) == ["Capitals", "Rivers of Europe:"]
    with page.expect_download() as download:
        page.get_by_role("button", name="Export JSON").click()
    exported = tmp_path / "capitals.json"
    download.value.save_as(exported)
    body = json.loads(exported.read_text())
    assert download.value.suggested_filename == "Capitals.json" and body["title"] == "Capitals"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert body["messages"][0]["content"] == "You answer in one short sentence."
    assert body["settings"]["presence_penalty"] == 1.5
    assert not any("first token" in m["content"] for m in body["messages"]), "no page notes in the export"

    page.get_by_role("button", name="Delete", exact=True).click()
    time.sleep(0.8)
    assert saved_titles(page) == ["Rivers of Europe:"] and "Capitals" not in page.locator("#chat").inner_text()
    import_file(page, exported)
    assert saved_titles(page)[0] == "Capitals" and "And of Italy?" in page.locator("#chat").inner_text()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "tool", "content": "x"}]')
    import_file(page, bad)
    page.screenshot(path=str(SHOTS / "browser-bad-import.png"), full_page=True)
    assert "needs a role" in page.content(), "a bad file gets a clear error"
    assert len(saved_titles(page)) == 2, "and changes nothing"


# Makes a tab's requests to the server's steps arrive `delay` ms late, as on a slow link.
SLOW_STEPS = """(delay) => { const plain = window.fetch;
  window.fetch = async (...args) => {
    if (String(args[0]).includes("/run/predict")) await new Promise((done) => setTimeout(done, delay));
    return plain(...args);
  };
}"""


def two_tabs_on_one_chat(browser, url, message: str) -> tuple:
    """A browser context with two tabs: the first sends ``message``; the second, opened after the reply, opens the
    chat opened last (the same one)."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    first = open_page(browser, url, context=context)
    send(first, message)
    wait_reply(first, 1)
    second = open_page(browser, url, context=context)
    assert message in second.locator("#chat").inner_text()
    return context, first, second


def test_tabs_of_one_browser_share_their_saved_chats_and_the_open_chat(page_url, browser):
    url, _ = page_url
    context, first, second = two_tabs_on_one_chat(browser, url, "Turn one")
    send(first, "Turn two")
    wait_reply(first, 2)
    time.sleep(1.0)
    assert "Turn two" in second.locator("#chat").inner_text(), "the other tab shows the open chat's new turn"
    send(second, "Turn three")
    wait_reply(second, 3)

    # The second tab's steps now arrive 1.5 s late: its next save is computed from a copy that lacks the first
    # tab's new chat, which must neither be dropped nor reported deleted.
    second.evaluate(SLOW_STEPS, 1500)
    first.get_by_role("button", name="New chat").click()
    time.sleep(0.5)
    send(first, "Rivers of Europe:")
    wait_reply(first, 1)
    send(second, "Turn four")
    wait_reply(second, 4)
    time.sleep(4.0)
    expected = ["Turn one", "Rivers of Europe:"]
    assert saved_titles(first) == saved_titles(second) == expected, "a stale copy's save drops nothing"
    first.locator("#chat-list label", has_text="Rivers of Europe:").click()
    time.sleep(1.0)
    first.get_by_text("Rename, delete, export, import").click()
    first.get_by_role("button", name="Delete", exact=True).click()
    deadline = time.time() + 10
    while saved_titles(second) != ["Turn one"] and time.time() < deadline:
        time.sleep(0.2)
    assert saved_titles(second) == ["Turn one"], "a delete reaches the other tab"
    first.close()
    second.close()
    third = open_page(browser, url, context=context)
    third.screenshot(path=str(SHOTS / "browser-two-tabs.png"), full_page=True)
    assert saved_titles(third) == ["Turn one"], "and what is stored agrees"
    third.locator("#chat-list label", has_text="Turn one").click()
    time.sleep(1.0)
    shown = third.locator("#chat").inner_text()
    assert all(f"Turn {n}" in shown for n in ("one", "two", "three", "four")), "no tab's turn was overwritten"
    context.close()


def test_a_chat_deleted_in_one_tab_is_closed_in_another_that_has_it_open_and_never_comes_back(page_url, browser):
    url, _ = page_url
    context, first, second = two_tabs_on_one_chat(browser, url, "Secret plans")
    second.get_by_text("Rename, delete, export, import").click()
    second.get_by_role("button", name="Delete", exact=True).click()
    deadline = time.time() + 10
    while "Secret plans" in first.locator("#chat").inner_text() and time.time() < deadline:
        time.sleep(0.2)
    assert "Secret plans" not in first.locator("#chat").inner_text(), "the other tab closes the deleted chat"
    send(first, "Something else")
    wait_reply(first, 1)
    time.sleep(1.0)
    third = open_page(browser, url, context=context)
    assert saved_titles(third) == ["Something else"], "the deleted chat was not saved again"
    context.close()


def test_a_reload_during_a_reply_keeps_the_message_in_the_saved_chat(page_url, browser):
    url, _ = page_url
    page = open_page(browser, url)
    page.get_by_text("System prompt and sampling").click()
    page.get_by_label("Temperature (0 = greedy)").first.fill("0")  # the base model's reply runs on (see below)
    send(page, "Describe a day at the beach.")
    page.locator("button.stop-button").wait_for(state="visible", timeout=10_000)
    page.reload()
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    time.sleep(1.5)
    assert saved_titles(page) == ["Describe a day at the beach."]
    assert "Describe a day at the beach." in page.locator("#chat").inner_text(), "the open chat shows it again"


def test_after_an_edit_the_reply_can_be_stopped_and_is_marked_stopped_with_its_stats(page_url, browser):
    url, _ = page_url
    page = open_page(browser, url)
    # Greedy: the base model's reply to the edited message runs on for hundreds of tokens every time, so Stop
    # (after the edit, and again after a retry) always lands mid-reply.
    page.get_by_text("System prompt and sampling").click()
    page.get_by_label("Temperature (0 = greedy)").first.fill("0")
    send(page, "Hello")
    wait_reply(page, 1)
    page.locator(".message-row.user-row").first.hover()
    page.locator("button[aria-label='Edit']").first.click()
    page.locator(".message-row.user-row textarea").first.fill("Describe a day at the beach.")
    page.locator("#chat button[aria-label='Submit']").click()
    stop = page.locator("button.stop-button")
    stop.wait_for(state="visible", timeout=10_000)
    time.sleep(0.5)
    page.screenshot(path=str(SHOTS / "browser-edit-streaming.png"), full_page=True)
    assert page.locator(".message-row.user-row").count() == 1, "the edited message replaced the first one"
    stop.click()
    title = wait_reply(page, 1)
    assert title.startswith("■ Stopped · ") and "tok/s" in title, title
    assert not stop.is_visible(), "the send button is back"
    page.locator("button[aria-label='Retry']").last.click()
    stop.wait_for(state="visible", timeout=10_000)
    stop.click()
    assert "Stopped" in wait_reply(page, 1)
    page.screenshot(path=str(SHOTS / "browser-stopped-after-retry.png"), full_page=True)


def answer_text(page) -> str:
    """The open chat's last answer as the page shows it (not its notes)."""
    return page.locator("#chat .message-row.bot-row").last.locator(".message:not(.thought)").last.inner_text()


def test_continue_goes_on_with_a_cut_off_answer_as_a_larger_limit_would_and_from_the_cache(page_url, browser):
    url, _ = page_url
    page = open_page(browser, url)
    page.get_by_text("System prompt and sampling").click()
    page.get_by_label("Temperature (0 = greedy)").first.fill("0")
    limit = page.get_by_label("Max new tokens").first
    limit.fill("32")
    send(page, "Explain how a car engine works, step by step, in detail.")
    wait_reply(page, 1)
    whole = answer_text(page)
    page.get_by_role("button", name="New chat").click()
    limit.fill("16")
    send(page, "Explain how a car engine works, step by step, in detail.")
    wait_reply(page, 1)
    cut = answer_text(page)
    assert whole.startswith(cut) and cut != whole
    go_on = page.get_by_role("button", name="Continue the answer")
    go_on.click()
    time.sleep(0.5)
    deadline = time.time() + 60
    while (not go_on.is_enabled() or answer_text(page) == cut) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.8)  # the last step saves the chat
    page.screenshot(path=str(SHOTS / "browser-continued.png"), full_page=True)
    assert answer_text(page) == whole, "16 + 16 tokens are the 32-token answer"
    stats = page.locator("#chat .thought-group", has_text="first token")
    assert stats.count() == 1, "one stats line: the continuation's"
    line = stats.first.inner_text()
    prompt, cached = map(int, re.search(r"(\d+) prompt tokens, (\d+) from cache", line).groups())
    assert cached == prompt - 1, f"all but the last token of the cut answer come from the cache: {line}"
    page.reload()
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    time.sleep(1.5)
    assert answer_text(page) == whole, "the continued answer is saved"
    page.get_by_role("button", name="New chat").click()
    time.sleep(0.5)
    go_on.click()
    time.sleep(0.8)
    assert "Nothing to continue" in page.content() and go_on.is_enabled()


def user_texts(page) -> list[str]:
    return [t.strip() for t in page.locator("#chat .message-row.user-row").all_inner_texts()]


def version_shown(page) -> str:
    label = page.locator("#version [data-testid='markdown']")
    return label.inner_text().strip() if page.locator("#version").is_visible() else ""


def wait_version(page, expected: str) -> None:
    deadline = time.time() + 30
    while version_shown(page) != expected and time.time() < deadline:
        time.sleep(0.1)
    assert version_shown(page) == expected


def ask_greedy(page, text: str) -> str:
    """Sends ``text`` for a greedy answer of at most 16 tokens; returns the answer."""
    page.get_by_text("System prompt and sampling").click()
    page.get_by_label("Temperature (0 = greedy)").first.fill("0")
    page.get_by_label("Max new tokens").first.fill("16")
    send(page, text)
    wait_reply(page, 1)
    return answer_text(page)


def edit_first(page, text: str) -> None:
    """Edits the chat's first message to ``text`` and sends it."""
    page.locator(".message-row.user-row").first.hover()
    page.locator("button[aria-label='Edit']").first.click()
    page.locator(".message-row.user-row textarea").first.fill(text)
    page.locator("#chat button[aria-label='Submit']").click()


def test_a_retried_or_edited_message_keeps_its_earlier_versions_to_flip_back_to_also_after_a_reload(page_url, browser):
    url, _ = page_url
    page = open_page(browser, url)
    sea = ask_greedy(page, "Name a sea.")
    assert not page.locator("#older-version").is_visible(), "a chat without versions shows no arrows"
    edit_first(page, "Name an ocean.")
    wait_version(page, "version 2 of 2")  # set as the new version's turn begins (the old reply gone)
    wait_reply(page, 1)
    ocean = answer_text(page)
    page.locator("#older-version").click()
    wait_version(page, "version 1 of 2")
    assert user_texts(page) == ["Name a sea."] and answer_text(page) == sea
    page.locator("button[aria-label='Retry']").last.click()  # a third version, of the first
    wait_version(page, "version 3 of 3")
    wait_reply(page, 1)
    page.reload()
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    wait_version(page, "version 3 of 3")
    page.locator("#older-version").click()
    wait_version(page, "version 2 of 3")
    assert user_texts(page) == ["Name an ocean."] and answer_text(page) == ocean
    send(page, "And a lake?")  # a later turn: the versions stay, now those of an earlier message
    wait_reply(page, 2)
    wait_version(page, "version 2 of 3 from “Name an ocean.”")
    page.screenshot(path=str(SHOTS / "browser-versions.png"), full_page=True)
    page.locator("#older-version").click()
    wait_version(page, "version 1 of 3")
    assert user_texts(page) == ["Name a sea."], "the earlier version has one turn"
    page.locator("#newer-version").click()
    wait_version(page, "version 2 of 3 from “Name an ocean.”")
    assert user_texts(page) == ["Name an ocean.", "And a lake?"], "the later turn came back with its version"
    lake = answer_text(page)
    page.get_by_text("System prompt and sampling").click()
    seed = page.get_by_label("Seed (-1 = random)").first
    seed.fill("-2")  # refused when the reply is asked for
    seed.press("Tab")
    page.locator("button[aria-label='Retry']").last.click()
    page.locator(".toast-body", has_text="seed").wait_for(timeout=30_000)
    wait_version(page, "version 2 of 3 from “Name an ocean.”")
    time.sleep(0.5)
    assert user_texts(page) == ["Name an ocean.", "And a lake?"] and answer_text(page) == lake, "it failed: kept"
    assert page.get_by_placeholder("Type a message…").input_value() == "", "the message is still in the chat"
    page.reload()
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    wait_version(page, "version 2 of 3 from “Name an ocean.”")
    assert answer_text(page) == lake
    page.get_by_text("System prompt and sampling").click()
    seed.fill("-1")  # the chat was saved with -2
    seed.press("Tab")
    page.locator("button[aria-label='Retry']").last.click()  # a second fork, after the first: the arrows flip it
    wait_version(page, "version 2 of 2")
    wait_reply(page, 2)
    forks = page.locator("#forks input")
    assert forks.is_visible() and forks.input_value() == "of “And a lake?”"
    page.locator("#forks").click()
    page.get_by_role("option", name="of “Name an ocean.”").click()
    wait_version(page, "version 2 of 3")
    page.locator("#older-version").click()
    wait_version(page, "version 1 of 3")
    assert user_texts(page) == ["Name a sea."] and not forks.is_visible(), "one fork on this version's path"
    page.locator("#newer-version").click()
    wait_version(page, "version 2 of 3")
    assert user_texts(page) == ["Name an ocean.", "And a lake?"] and forks.is_visible()
    page.screenshot(path=str(SHOTS / "browser-versions-two-forks.png"), full_page=True)
    page.locator("#older-version").click()
    wait_version(page, "version 1 of 3")
    page.reload()  # the arrows flip the chat's last fork, the only one on this version's path
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    wait_version(page, "version 1 of 3")
    page.locator("#newer-version").click()
    wait_version(page, "version 2 of 3")  # still this fork's, though the version shown now holds a later one
    assert forks.input_value() == "of “Name an ocean.”"
    page.locator("#older-version").click()
    wait_version(page, "version 1 of 3")
    assert user_texts(page) == ["Name a sea."]


def test_a_flip_in_one_tab_shows_in_the_other_that_has_the_chat_open_also_at_phone_width(page_url, browser):
    url, _ = page_url
    context = browser.new_context(viewport={"width": 390, "height": 900})
    first = open_page(browser, url, context=context)
    river = ask_greedy(first, "Name a river.")
    edit_first(first, "Name a mountain.")
    wait_version(first, "version 2 of 2")
    wait_reply(first, 1)
    second = open_page(browser, url, context=context)
    wait_version(second, "version 2 of 2")
    second.locator("#older-version").click()
    wait_version(second, "version 1 of 2")
    wait_version(first, "version 1 of 2")
    assert user_texts(first) == ["Name a river."] and answer_text(first) == river, "the flip reached the other tab"
    first.screenshot(path=str(SHOTS / "browser-versions-phone.png"), full_page=True)
    arrows = [first.locator(f"#{name}").bounding_box() for name in ("older-version", "version", "newer-version")]
    assert all(box and box["x"] >= 0 and box["x"] + box["width"] <= 390 for box in arrows), "on the screen"
    assert max(box["y"] for box in arrows) < min(box["y"] + box["height"] for box in arrows), "on one line"
    context.close()


def test_a_reply_that_fails_unlocks_the_page_and_gives_the_message_back(page_url, browser):
    url, _ = page_url
    page = open_page(browser, url)
    page.get_by_text("System prompt and sampling").click()
    seed = page.get_by_label("Seed (-1 = random)").first
    seed.fill("-2")  # refused when the reply is asked for
    seed.press("Tab")
    send(page, "Hello there")
    box = page.get_by_placeholder("Type a message…")
    # The turn began and failed: its error shows (the user row it showed can come and go between two looks).
    page.locator(".toast-body", has_text="seed").wait_for(timeout=30_000)
    deadline = time.time() + 30
    while time.time() < deadline and not (box.is_enabled() and box.input_value() == "Hello there"):
        time.sleep(0.2)
    page.screenshot(path=str(SHOTS / "browser-failed-reply.png"), full_page=True)
    assert box.is_enabled() and box.input_value() == "Hello there", "the page is unlocked, the message kept"
    assert page.locator(".message-row.user-row").count() == 0 and not page.locator("button.stop-button").is_visible()
    seed.fill("-1")
    seed.press("Tab")
    box.press("Enter")
    assert "first token" in wait_reply(page, 1), "the same message, sent again, is answered"


def test_replies_render_latex_and_code_blocks_with_a_copy_button(page_url, browser, tmp_path):
    url, _ = page_url
    chat = {
        "title": "Math and code",
        "messages": [
            {"role": "user", "content": "Euler?"},
            {
                "role": "assistant",
                "content": "Inline \\(e^{i\\pi} + 1 = 0\\), and\n\n$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$\n\n"
                "The apple costs $5 and the pear costs $10.\n\n```python\nprint(1 + 1)\n```",
            },
        ],
    }
    path = tmp_path / "math.json"
    path.write_text(json.dumps(chat))
    page = open_page(browser, url)
    page.get_by_text("Rename, delete, export, import").click()
    import_file(page, path)
    reply = page.locator("#chat .message-row.bot-row").first
    assert reply.locator(".katex").count() >= 2, "inline and display LaTeX are typeset"
    assert reply.locator(".copy_code_button").count() >= 1, "the code block has a copy button"
    assert "costs $5 and the pear costs $10" in reply.inner_text(), "prices are not maths"
    page.screenshot(path=str(SHOTS / "browser-latex-code.png"), full_page=True)


@pytest.fixture(scope="module")
def qwen_page_url(qwen3_dir, gemma3_dir, tmp_path_factory):
    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**27)
    registry.switch(registry.ids[0])
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(gemma3_dir, models / "tiny-gemma3")
    config = app.AppConfig(port=free_port(), concurrency=2, models_dir=str(models))
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{config.port}/"
    demo.close()


def test_a_thinking_budget_cuts_the_reasoning_which_opens_on_a_click_while_stats_stay_a_caption(qwen_page_url, browser):
    page = open_page(browser, qwen_page_url)
    page.get_by_text("System prompt and sampling").click()
    page.get_by_label("Temperature (0 = greedy)").first.fill("0")  # the tiny model's greedy reply thinks on
    page.get_by_label("Thinking budget (tokens, 0 = no limit)").fill("3")
    send(page, "Why is the sky blue?")
    wait_reply(page, 1)
    thinking = page.locator("#chat .thought-group", has_text="Thinking").first
    assert thinking.locator(".arrow").is_visible(), "the thinking message keeps its arrow"
    thinking.locator(".title").click()
    assert "Considering the limited time by the user" in thinking.inner_text(timeout=5_000)
    stats = page.locator("#chat .thought-group", has_text="first token").last
    assert is_caption(stats), "the stats line stays a caption"
    page.screenshot(path=str(SHOTS / "browser-thinking-budget.png"), full_page=True)


def test_the_operator_loads_a_model_from_the_models_folder_and_frees_it(qwen_page_url, browser):
    page = open_page(browser, qwen_page_url)
    other = open_page(browser, qwen_page_url)  # another visitor's page shows each change within app.WATCH_S
    panel = page.locator("#operator")
    assert panel.is_visible(), "the one person at a local server is its operator"
    source = page.get_by_label("Load a model")
    source.fill("../../etc")
    page.get_by_role("button", name="Load", exact=True).click()
    page.get_by_text("is neither a folder").wait_for(timeout=10_000)
    assert "qwen3" in page.locator("#model-info").inner_text(), "a refused source leaves the model serving"
    source.fill("tiny-gemma3")
    page.get_by_role("button", name="Load", exact=True).click()
    page.get_by_text("Now serving tiny-gemma3").wait_for(timeout=30_000)
    assert "gemma3" in page.locator("#model-info").inner_text()
    assert not page.get_by_label("Thinking budget (tokens, 0 = no limit)").is_visible(), "Gemma does not think"
    page.screenshot(path=str(SHOTS / "browser-operator-loaded.png"), full_page=True)
    other.locator("#model-info", has_text="gemma3").wait_for(timeout=10_000)
    assert other.locator("#model-picker input").input_value() == "tiny-gemma3"
    page.get_by_role("button", name="Free the current model").click()
    page.get_by_text("No model is loaded").wait_for(timeout=10_000)
    other.locator("#model-info", has_text="No model is loaded").wait_for(timeout=10_000)
    page.locator("#model-picker input").click()
    page.get_by_role("option").first.click()
    page.get_by_text("Now serving").last.wait_for(timeout=30_000)
    send(page, "Hello")
    assert "first token" in wait_reply(page, 1), "a model chosen again serves"


def test_the_header_shows_the_loads_progress_and_then_the_model(qwen3_dir, browser):
    registry, release = slowly_loading(qwen3_dir)
    config = app.AppConfig(port=free_port())
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    try:
        page = open_page(browser, f"http://127.0.0.1:{config.port}/")
        page.get_by_text("converting the checkpoint (40%)").wait_for(timeout=10_000)
        release.set()
        page.get_by_text("qwen3 · int8 weights").wait_for(timeout=30_000)
    finally:
        release.set()
        demo.close()


def test_two_visitors_of_an_open_server_share_at_most_the_operators_system_prompt(embedded, browser):
    """A server others reach without logins: each browser is its own person. The second visitor sending the same
    words under the same system prompt reuses the system prompt's tokens at most, never the first one's turn."""
    registry = ModelRegistry([None], max_cache_bytes=2**30)
    registry.model, registry.current_id = embedded, registry.ids[0]
    config = app.AppConfig(port=free_port(), host="0.0.0.0", insecure_no_auth=True)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    system = "You are the help desk of the lighthouse museum. Answer briefly. " * 6
    secret = "My locker code is 4417 and my cat is called Biscuit."
    try:
        url = f"http://127.0.0.1:{config.port}/"
        first, second = open_page(browser, url), open_page(browser, url)
        for page in (first, second):
            page.get_by_text("System prompt and sampling").click()
            page.get_by_label("System prompt").fill(system)
        send(first, secret)
        wait_reply(first, 1)
        assert saved_titles(second) == [], "the second browser sees none of the first one's chats"
        send(second, secret)
        stats = wait_reply(second, 1)
        request = embedded.request([{"role": "system", "content": system}, {"role": "user", "content": secret}])
        operator, prompt = embedded.operator_tokens(request), embedded.count_tokens(request)
        cached = int(stats.split(", ")[1].split(" ")[0]) if "from cache" in stats else 0
        assert cached <= operator < prompt, (cached, operator, prompt, stats)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def vision_page_url(gemma3_vision_dir):
    registry = ModelRegistry([str(gemma3_vision_dir)], max_cache_bytes=2**27)
    registry.switch(registry.ids[0])
    config = app.AppConfig(port=free_port(), concurrency=2)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{config.port}/", registry.get()
    demo.close()


def test_an_attached_image_reaches_the_vision_model_is_reused_next_turn_and_survives_reload_and_export(
    vision_page_url, browser, tmp_path
):
    import numpy as np
    from PIL import Image

    url, model = vision_page_url
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(7).rand(90, 120, 3) * 255).astype("uint8")).save(photo)
    page = open_page(browser, url)
    assert "attach images" in page.locator("#message textarea").get_attribute("placeholder")
    page.locator("#message input[type=file]").set_input_files(str(photo))
    page.locator("#message .thumbnails img").wait_for(timeout=10_000)
    send(page, "What is in this picture?")
    first = wait_reply(page, 1)
    asked = model.request(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": photo.read_bytes()},
                    {"type": "text", "text": "What is in this picture?"},
                ],
            }
        ]
    )
    prompt = model.render(asked.messages)
    assert f"{len(prompt)} prompt tokens" in first, "the image's tokens were in the prompt"
    assert page.locator("#chat .user-row img, #chat .message.user img").count() >= 1, "the image shows in the chat"
    send(page, "And what colour is it?")
    second = wait_reply(page, 2)
    cached = int(second.split(" from cache")[0].rsplit(", ", 1)[-1])
    assert cached > max(i for i, t in enumerate(prompt) if t < 0), "the follow-up reused the image's tokens"
    page.screenshot(path=str(SHOTS / "browser-image.png"), full_page=True)

    page.reload()
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    time.sleep(1.5)
    assert page.locator("#chat .user-row img, #chat .message.user img").count() >= 1, "the image survives a reload"
    page.get_by_text("Rename, delete, export, import").click()
    with page.expect_download() as download:
        page.get_by_role("button", name="Export JSON").click()
    exported = tmp_path / "picture.json"
    download.value.save_as(exported)
    body = json.loads(exported.read_text())
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    page.get_by_role("button", name="Delete", exact=True).click()
    time.sleep(0.8)
    import_file(page, exported)
    assert page.locator("#chat .user-row img, #chat .message.user img").count() >= 1, "the import shows the image"
    send(page, "Once more?")
    assert "prompt tokens" in wait_reply(page, 1), "the imported chat goes on"  # export leaves page notes out
    assert "⚠️" not in page.locator("#chat").inner_text() and "no longer" not in page.locator("#chat").inner_text()


def test_a_text_only_model_reads_attached_text_files_and_pdfs_and_refuses_an_image_with_the_reason(
    page_url, browser, tmp_path
):
    from PIL import Image
    from test_documents import file_part, pdf

    url, registry = page_url
    model = registry.get()
    page = open_page(browser, url)
    box = page.locator("#message textarea")
    assert "text files and PDFs" in box.get_attribute("placeholder") and "no images" in box.get_attribute("placeholder")
    assert "text only" in page.locator("#model-info").inner_text()
    notes, report = tmp_path / "notes.txt", tmp_path / "report.pdf"
    notes.write_text("The meeting moved to Thursday at 10.\n")
    report.write_bytes(pdf("Revenue grew by 12 percent."))
    page.locator("#message input[type=file]").set_input_files([str(notes), str(report)])
    page.locator("#message .thumbnail-item").nth(1).wait_for(timeout=10_000)
    send(page, "When is the meeting?")
    stats = wait_reply(page, 1)
    question = {"type": "text", "text": "When is the meeting?"}
    parts = [file_part("notes.txt", notes.read_bytes()), file_part("report.pdf", report.read_bytes()), question]
    prompt = model.count_tokens(model.request([{"role": "user", "content": parts}]))
    assert f"{prompt} prompt tokens" in stats, "both files' text was in the prompt"
    chat = page.locator("#chat")
    assert "notes.txt" in chat.inner_text() and "report.pdf" in chat.inner_text(), "the files show by name"
    page.screenshot(path=str(SHOTS / "browser-documents.png"), full_page=True)
    send(page, "And the revenue?")
    follow = wait_reply(page, 2)
    assert int(follow.split(" from cache")[0].rsplit(", ", 1)[-1]) >= prompt, "the follow-up reused the files' tokens"

    page.reload()
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    time.sleep(1.5)
    shown = page.locator("#chat").inner_text()
    assert "notes.txt" in shown and "report.pdf" in shown and "no longer" not in shown, "the files survive a reload"

    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(photo)
    page.locator("#message input[type=file]").set_input_files(str(photo))
    page.locator("#message .thumbnails img").wait_for(timeout=10_000)
    send(page, "What is this?")
    page.get_by_text("reads text only").first.wait_for(timeout=30_000)
    deadline = time.time() + 30
    while time.time() < deadline and not (box.is_enabled() and box.input_value() == "What is this?"):
        time.sleep(0.2)
    assert box.input_value() == "What is this?", "the message is back in the box"
    assert page.locator(".message-row.user-row").count() == 2, "the chat is as it was"


def test_a_search_of_the_saved_chats_finds_a_chat_by_its_words_and_opens_it(page_url, browser, tmp_path):
    url, _ = page_url
    page = open_page(browser, url)
    long_text = "A long log of numbers: " + " ".join(str(i) for i in range(30_000))  # ~170 KB
    chats = {
        "log.json": [{"role": "user", "content": "Keep this log."}, {"role": "assistant", "content": long_text}],
        "ocean.json": [{"role": "user", "content": "Name an ocean."}, {"role": "assistant", "content": "The Pacific."}],
        "lake.json": [{"role": "user", "content": "What is a lake?"}, {"role": "assistant", "content": "Fresh water."}],
        "joke.json": [{"role": "user", "content": "Tell a joke."}, {"role": "assistant", "content": "A pacific one."}],
    }
    page.get_by_text("Rename, delete, export, import").click()
    for name, messages in chats.items():
        (tmp_path / name).write_text(json.dumps(messages))
        import_file(page, tmp_path / name)
    page.reload()  # the search reads what the page sent on load
    page.get_by_placeholder("Type a message…").wait_for(timeout=60_000)
    time.sleep(1.0)
    page.get_by_text("Rename, delete, export, import").click()
    page.get_by_role("button", name="+ New chat").click()
    search = page.get_by_placeholder("Search chats")
    sent: list[int] = []  # the size of each request that carries the words typed so far ("P", "PA", ...)

    def seen(request) -> None:
        body = request.post_data_buffer or b"" if request.method == "POST" else b""
        if re.search(rb'"P[ACIF]*"', body):
            sent.append(len(body))

    page.on("request", seen)
    search.press_sequentially("PACIFIC", delay=30)  # typed: each key is an input event
    found = page.locator("#chat-found")
    found.get_by_text("Found 2").wait_for(timeout=10_000)
    assert sent and max(sent) < 4096, f"a keystroke sends the words only, not the saved chats: {sent}"
    # The server's copy for this tab is gone (its session's state expired, say): the search asks for it once.
    holder = SERVED["demo"].state_holder
    for session in list(holder.session_data):
        holder.delete_state(session)
    search.press("Control+a")
    search.press_sequentially("29999", delay=30)
    found.get_by_text("Found 1").wait_for(timeout=10_000)
    search.press("Control+a")
    search.press_sequentially("PACIFIC", delay=30)
    found.get_by_text("Found 2").wait_for(timeout=10_000)
    labels = found.locator("label").all_inner_texts()
    assert labels == ["Tell a joke. · A pacific one.", "Name an ocean. · The Pacific."], "newest first, with the words"
    found.get_by_text("Name an ocean.").click()
    page.locator("#chat").get_by_text("The Pacific.").wait_for(timeout=10_000)
    assert page.locator("#chat-list input:checked").evaluate("e => e.parentElement.innerText") == "Name an ocean."
    page.screenshot(path=str(SHOTS / "browser-search.png"), full_page=True)
    page.get_by_role("button", name="Delete", exact=True).click()
    deadline = time.time() + 10
    while time.time() < deadline and found.locator("label").count() != 1:
        time.sleep(0.1)
    assert found.locator("label").all_inner_texts() == ["Tell a joke. · A pacific one."], (
        "a deleted chat leaves the list"
    )
    search.press("Control+a")
    search.press_sequentially("volcano", delay=30)
    found.get_by_text("No saved chat holds these words").wait_for(timeout=10_000)
    search.press("Control+a")
    search.press("Backspace")
    deadline = time.time() + 10
    while time.time() < deadline and found.is_visible():
        time.sleep(0.1)
    assert not found.is_visible(), "no words, no search list"
