"""The web chat page in a real browser: Debian's chromium driven by Playwright (never `playwright install`).

Loads /, sends a message, waits for the streamed answer and the reasoning panel, checks that the
page kept the conversation, and saves runs/screenshots/chat.png. Skipped when /usr/bin/chromium or
the playwright package is missing (setup: apt-get install -y chromium; pip install playwright).
"""

import os
import time
from pathlib import Path

import pytest

from test_serve_common import ANSWER, REASONING, engine_factory, live_server, scripted_model, tokenizer

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "screenshots" / "chat.png"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_chat_page_streams_answer_and_reasoning(browser):
    tok = tokenizer()
    with live_server(engine_factory(scripted_model(tok), tok)) as live:
        page = browser.new_page(viewport={"width": 900, "height": 640}, bypass_csp=True)  # for wait_for_function
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(live.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'nanoseek-tiny'")
        page.click("#settings summary")
        page.fill("#temperature", "0")          # greedy: the scripted text exactly
        page.click("#settings summary")
        for turn in (1, 2):
            page.fill("#input", "What is 2 plus 3?")
            page.press("#input", "Enter")
            answer = page.locator(".msg.assistant .answer").nth(turn - 1)
            answer.wait_for()
            page.wait_for_function(f"document.querySelectorAll('.msg.assistant .stats')[{turn - 1}].textContent"
                                   " !== ''")
            assert answer.text_content() == ANSWER
        reasoning = page.locator("details.reasoning").first
        assert reasoning.is_visible()
        assert page.locator(".thought").first.text_content() == REASONING
        assert "Thought for" in reasoning.locator("summary").text_content()
        assert reasoning.get_attribute("open") is None          # collapsed once the answer starts
        reasoning.locator("summary").click()                    # ... and opens on click
        assert reasoning.get_attribute("open") is not None
        assert page.locator(".msg.user").count() == 2 and page.locator(".stats").first.text_content().startswith("12 tokens")
        assert page.is_visible("#send") and not page.is_visible("#stop")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        assert not errors, errors
        page.close()


def test_stop_button_aborts_the_stream(browser):
    tok = tokenizer()
    make = engine_factory(scripted_model(tok, loop_chat=True), tok, max_seq_len=100_000)
    with live_server(make) as live:
        page = browser.new_page(bypass_csp=True)
        page.goto(live.url + "/")
        page.click("#settings summary")
        page.fill("#max_tokens", "90000")
        page.fill("#temperature", "0")
        page.fill("#input", "Think forever")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.thought') && "
                               "document.querySelector('.thought').textContent.length > 20")
        assert live.worker.batch_size == 1
        page.click("#stop")
        page.wait_for_selector("#send", state="visible")
        assert page.locator(".stats").first.text_content().endswith("stopped")
        deadline = time.monotonic() + 60
        while live.worker.batch_size:              # the server saw the disconnect and freed the row
            assert time.monotonic() < deadline
            time.sleep(0.02)
        page.close()


def test_failed_turn_is_not_resent(browser):
    tok = tokenizer()
    with live_server(engine_factory(scripted_model(tok), tok)) as live:
        page = browser.new_page(bypass_csp=True)
        bodies = []
        page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(r.post_data_json))
        page.goto(live.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'nanoseek-tiny'")
        page.click("#settings summary")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "-5")                      # the server answers 400
        page.fill("#input", "First question")
        page.press("#input", "Enter")
        page.locator(".msg.assistant.error").wait_for()
        page.wait_for_selector("#send", state="visible")
        page.fill("#max_tokens", "")
        page.fill("#input", "What is 2 plus 3?")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant .stats')[1].textContent !== ''")
        assert page.locator(".msg.assistant .answer").nth(1).text_content() == ANSWER
        assert len(bodies) == 2
        assert bodies[1]["messages"] == [{"role": "user", "content": "What is 2 plus 3?"}]
        assert "unsent" in page.locator(".msg.user").first.get_attribute("class")
        page.close()
