"""The web app in a real browser: Playwright for Python driving Debian's Chromium (no browser download).

Skipped when /usr/bin/chromium or playwright is missing (``apt-get install chromium``; ``pip install playwright``).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from test_serve import GREEDY, engine, running, tiny_run  # noqa: F401 (fixtures)

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def send(page, text: str, bots: int) -> None:
    """Type a message, press Enter, wait until ``bots`` answers are shown and the reply has finished."""
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")
    page.wait_for_function(f"document.querySelectorAll('[data-testid=\"bot\"]').length >= {bots}", timeout=60_000)
    page.wait_for_selector("#send:enabled", timeout=60_000)  # Send is disabled until the answer is complete


def test_two_turns_in_one_session_and_a_separate_second_session(engine, tmp_path):
    from qtune.serve.api import create_app

    with running(create_app(engine, defaults=GREEDY)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            first = browser.new_context(viewport={"width": 1000, "height": 800})
            page = first.new_page()
            page.goto(url)
            page.wait_for_selector("#message textarea")

            page.locator("#message textarea").press("Enter")  # empty: ignored with a hint
            page.get_by_text("Empty message ignored").wait_for(timeout=10_000)
            assert page.locator('[data-testid="user"]').count() == 0

            send(page, "Write a loop.", 1)
            send(page, "Now a function.", 2)
            assert page.locator('[data-testid="user"]').all_inner_texts() == ["Write a loop.", "Now a function."]
            bots = page.locator('[data-testid="bot"]').all_inner_texts()
            assert bots[0].strip() == engine.answer("Write a loop.", settings=GREEDY)  # streamed text is the answer
            with page.expect_download() as download:
                page.locator("#download").click()
            transcript = json.loads(open(download.value.path(), encoding="utf-8").read())
            assert [t["user"] for t in transcript["turns"]] == ["Write a loop.", "Now a function."]
            page.screenshot(path=str(tmp_path / "chat.png"))

            second = browser.new_context().new_page()
            second.goto(url)
            second.wait_for_selector("#message textarea")
            send(second, "Hello", 1)
            assert second.locator('[data-testid="user"]').all_inner_texts() == ["Hello"]
            with second.expect_download() as download2:
                second.locator("#download").click()
            turns2 = json.loads(open(download2.value.path(), encoding="utf-8").read())["turns"]
            assert [t["user"] for t in turns2] == ["Hello"]  # the second context does not see the first's history
            time.sleep(0.2)
            assert page.locator('[data-testid="user"]').count() == 2  # and the first keeps its own
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 10_000
