"""The chat page at `/` in a real headless Chromium (DevTools protocol) against a real uvicorn with the
fake engine: the page loads, a reply streams in, Stop aborts the generation on the server, the
conversation and the settings go into the next request, and the API key is asked for and used.
Screenshots: tests/artifacts/chat_page/*.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from cdp_browser import HeadlessChromium, find_chromium
from fake_engine import FakeEngine
from server_fixtures import serve_engine, wait_until

ARTIFACTS = Path(__file__).parent / "artifacts" / "chat_page"

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (.ci/setup installs it)")


def _js(value: str) -> str:
    return json.dumps(value)


def _type_and_send(page, text: str) -> None:
    page.evaluate(
        f"document.getElementById('input').value = {_js(text)}; "
        "document.getElementById('composer').requestSubmit(); true"
    )


def _set_key(page, key: str) -> None:
    page.evaluate(
        f"(() => {{ const k = document.getElementById('api-key'); k.value = {_js(key)}; "
        "k.dispatchEvent(new Event('change')); return true; })()"
    )


def _assistant_texts(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('.message.assistant')].map(e => e.textContent)")


@pytest.fixture
def browser(tmp_path):
    with HeadlessChromium(tmp_path / "profile") as b:
        yield b


def test_page_streams_a_reply_stops_and_keeps_the_conversation(browser):
    engine = FakeEngine(step_delay_s=0.03, max_model_len=4096)
    server = serve_engine(engine)
    try:
        assert httpx.get(f"{server.url}/static/chat.js").status_code == 200
        page = browser.page()
        page.navigate(server.url + "/")
        page.wait_for("document.getElementById('model').textContent === 'fake-model'", what="the model name")
        page.evaluate(
            "document.getElementById('system').value = 'You are a test pilot.';"
            "document.getElementById('max-tokens').value = '400'; true"
        )
        page.screenshot(ARTIFACTS / "1_loaded.png")

        # a long reply: it streams (text grows while Stop is enabled), then Stop aborts it
        _type_and_send(page, "Tell me a long story.")
        page.wait_for(
            "(document.querySelector('.message.assistant')?.textContent || '').length > 20", what="streamed text"
        )
        first = _assistant_texts(page)[0]
        assert page.evaluate("!document.getElementById('stop').disabled && document.getElementById('send').disabled")
        page.wait_for(
            f"document.querySelector('.message.assistant').textContent.length > {len(first)}", what="more streamed text"
        )
        page.screenshot(ARTIFACTS / "2_streaming.png")
        page.evaluate("document.getElementById('stop').click(); true")
        page.wait_for("document.getElementById('status').textContent === 'stopped'", what="the stopped status")
        wait_until(lambda: len(engine.cancelled) == 1 and not engine.active, 5.0, "the server to cancel the request")
        stopped = _assistant_texts(page)[0]
        time.sleep(0.3)
        assert _assistant_texts(page)[0] == stopped and stopped.endswith("(stopped)")
        assert page.evaluate("document.getElementById('stop').disabled && !document.getElementById('send').disabled")
        page.screenshot(ARTIFACTS / "3_stopped.png")

        # a short reply finishes on its own; the request carried the system prompt and the history
        page.evaluate(
            "document.getElementById('max-tokens').value = '6'; "
            "document.getElementById('temperature').value = '0'; true"
        )
        _type_and_send(page, "And a short one?")
        page.wait_for(
            "document.querySelectorAll('.message.assistant').length === 2 && "
            "document.getElementById('send').disabled === false",
            what="the second reply",
        )
        assert _assistant_texts(page)[1] and engine.finished
        prompt = engine.tokenizer.decode(engine.prompts[-1])
        assert "You are a test pilot." in prompt and "Tell me a long story." in prompt and "And a short one?" in prompt
        assert stopped.removesuffix("(stopped)") in prompt  # the stopped reply is part of the history
        assert page.evaluate("document.getElementById('status').textContent") == "stopped at the max tokens limit"
        page.screenshot(ARTIFACTS / "4_conversation.png")
    finally:
        server.stop()


def test_page_asks_for_the_api_key_and_uses_it(browser):
    engine = FakeEngine(step_delay_s=0.001, max_model_len=4096)
    server = serve_engine(engine, api_key="sekret-key")
    try:
        page = browser.page()
        page.navigate(server.url + "/")
        page.wait_for("document.getElementById('status').textContent.includes('API key')", what="the key prompt")
        page.screenshot(ARTIFACTS / "5_needs_key.png")
        _set_key(page, "sekret-key")
        page.wait_for("document.getElementById('model').textContent === 'fake-model'", what="the model name")
        page.evaluate("document.getElementById('max-tokens').value = '5'; true")
        _type_and_send(page, "Hello?")
        page.wait_for(
            "document.querySelectorAll('.message.assistant').length === 1 && !document.getElementById('send').disabled",
            what="a reply",
        )
        assert _assistant_texts(page)[0] and not page.evaluate("document.querySelectorAll('.message.error').length")
        _set_key(page, "wrong")
        _type_and_send(page, "Again?")
        page.wait_for("document.querySelectorAll('.message.error').length === 1", what="the error message")
        assert "Incorrect API key" in page.evaluate("document.querySelector('.message.error').textContent")
        page.screenshot(ARTIFACTS / "6_wrong_key.png")
    finally:
        server.stop()
