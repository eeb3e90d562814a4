"""A real browser (Debian chromium driven by playwright) against the app: streaming, Stop, isolation."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import app
from llm_backends.serving import ModelRegistry
from test_app import free_port

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


@pytest.fixture(scope="module")
def page_url(embedded):
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"chromium is missing at {CHROMIUM}: apt-get install -y chromium (tests/run.sh does this)")
    registry = ModelRegistry([None], max_cache_bytes=2**30)
    registry.model, registry.current_id = embedded, registry.ids[0]
    config = app.AppConfig(port=free_port(), concurrency=2)
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
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
    box = page.get_by_role("textbox").last
    box.fill(text)
    box.press("Enter")


def test_browser_chat_streams_stops_and_isolates_visitors(page_url, browser):
    url, registry = page_url
    model = registry.get()
    SHOTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(url)
    page.get_by_role("textbox").last.wait_for(timeout=60_000)

    send(page, "The capital of France is")
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
    assert stats.is_visible() and not stats.locator(".arrow").is_visible(), "stats are a plain caption"

    calls = []
    handle = model.model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
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

    other = browser.new_context().new_page()
    other.goto(url)
    other.get_by_role("textbox").last.wait_for(timeout=60_000)
    time.sleep(1.0)
    assert bot_text(other).strip() == "", "a second visitor starts with an empty chat"
    assert "France" not in other.locator(".message-row, .message").all_inner_texts().__str__()
    other.screenshot(path=str(SHOTS / "browser-second-visitor.png"), full_page=True)


def test_at_phone_width_the_model_info_sits_below_the_dropdown_and_says_base_model(page_url, browser):
    url, _ = page_url
    page = browser.new_page(viewport={"width": 390, "height": 800})
    page.goto(url)
    page.get_by_role("textbox").last.wait_for(timeout=60_000)
    dropdown = page.get_by_text("Switching loads the model").bounding_box()
    note = page.locator("p", has_text="This is a base model").first
    info = note.bounding_box()
    assert info["y"] > dropdown["y"] + dropdown["height"], "the info wraps below instead of being squeezed"
    assert info["width"] > 250, info
    assert "Qwen/Qwen3-0.6B" in page.content()
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "browser-phone.png"), full_page=True)
