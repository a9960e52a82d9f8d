"""The web app in a real browser: Playwright for Python driving Debian's Chromium (no browser download).

Skipped when /usr/bin/chromium or playwright is missing (``apt-get install chromium``; ``pip install playwright``).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from serve_fixtures import FILLER, GREEDY, INDENTED, running, scripted, serve_process

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


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


def bot_texts(page) -> list[str]:
    return page.locator('[data-testid="bot"]').all_inner_texts()


def wait_for_words(page, n: int) -> None:
    """Wait until the last answer shows at least ``n`` words (it is streaming)."""
    page.wait_for_function(
        f"""() => {{ const b = document.querySelectorAll('[data-testid="bot"]');
                    return b.length && (b[b.length - 1].innerText.match(/word/g) || []).length >= {n}; }}""",
        timeout=60_000,
    )


def wait_until(condition, seconds: float) -> float:
    """Poll ``condition()`` until true; returns the seconds it took (fails after ``seconds``)."""
    start = time.perf_counter()
    while not condition():
        assert time.perf_counter() - start < seconds, "condition not met in time"
        time.sleep(0.05)
    return time.perf_counter() - start


def test_stop_ends_the_stream_and_closing_the_tab_cancels_it_and_deletes_the_transcript(engine, tmp_path, monkeypatch):
    from pathlib import Path

    from qtune.serve.api import create_app
    from qtune.serve.engine import GenerationSettings

    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))  # the app's cache folder, where transcripts live
    app = create_app(engine, defaults=GenerationSettings(max_new_tokens=400))
    long_answer = 400 * 0.05  # seconds: 400 tokens of at least 50 ms each

    def transcript_files() -> list[Path]:
        return sorted(cache.glob("qtune-chat-*/*"))

    with scripted(engine, FILLER, delay=0.05), running(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.goto(url)
            page.wait_for_selector("#message textarea")
            assert page.locator("#stop").is_disabled()
            box = page.locator("#message textarea")
            box.fill("Write a long story.")
            box.press("Enter")
            wait_for_words(page, 5)
            assert page.locator("#send").is_disabled()
            page.locator("#stop").click()
            took = wait_until(lambda: page.locator("#send").is_enabled(), long_answer / 4)
            shown = bot_texts(page)[-1]
            time.sleep(1.0)
            assert bot_texts(page)[-1] == shown  # the stream has stopped
            assert 5 <= shown.count("word") < 200 and not engine.busy
            assert page.locator("#stop").is_disabled() and took < long_answer / 4

            with page.expect_download() as download:
                page.locator("#download").click()
            turns = json.loads(open(download.value.path(), encoding="utf-8").read())["turns"]
            assert turns[0]["user"] == "Write a long story."
            assert turns[0]["assistant"].count("word") == shown.count("word")
            assert turns[0]["assistant"] == FILLER[: len(turns[0]["assistant"])]  # the text so far, exactly
            first = transcript_files()
            assert len(first) == 1  # one file in this session's own folder

            box.fill("Again.")
            box.press("Enter")
            wait_for_words(page, 3)
            page.locator("#stop").click()
            page.wait_for_selector("#send:enabled", timeout=10_000)
            page.wait_for_function("document.querySelectorAll('[data-testid=\"bot\"]').length == 2")
            second = transcript_files()
            assert len(second) == 1 and second != first  # replaced, not accumulated

            # a second session, answering when its tab is closed: generation stops, and each session's
            # transcript folder goes with it
            other = browser.new_context().new_page()
            other.goto(url)
            other.wait_for_selector("#message textarea")
            other.locator("#message textarea").fill("Write a long story.")
            other.locator("#message textarea").press("Enter")
            wait_for_words(other, 5)
            assert engine.busy
            other.close()
            assert wait_until(lambda: not engine.busy, long_answer / 4) < long_answer / 4
            page.close()
            wait_until(lambda: not list(cache.glob("qtune-chat-*")), 10)
            assert list(cache.rglob("*.json")) == []  # and Gradio kept no copy of a transcript
        finally:
            browser.close()


def test_sigterm_while_the_web_app_streams_an_answer_exits_within_seconds(tiny_run):
    import signal

    with (
        serve_process(tiny_run.root, FILLER, 0.05, "--max-new-tokens", "400") as (server, url),
        sync_api.sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.goto(url)
            page.wait_for_selector("#message textarea")
            page.locator("#message textarea").fill("Write a long story.")
            page.locator("#message textarea").press("Enter")
            wait_for_words(page, 5)  # 400 tokens of 50 ms each: 20 s to go
            server.send_signal(signal.SIGTERM)
            start = time.perf_counter()
            server.wait(timeout=30)
            took = time.perf_counter() - start
        finally:
            browser.close()
    # the answer is cancelled and the page's open streams are closed, not waited for (measured 0.2 s)
    assert took < 5, took
    assert server.returncode == -signal.SIGTERM and "Traceback" not in server.stdout.read()


CODE = "def add(a, b):\n    if a:\n        return a + b  # both\n\n    return b\n"
MARKDOWN_ANSWER = f"Here is the *function*:\n\n```python\n{CODE}```\n\nCall it with **two** numbers."


def code_blocks(page) -> list[str]:
    """The exact text of every code block in the answers (textContent: nothing trimmed or collapsed)."""
    return page.eval_on_selector_all('[data-testid="bot"] pre code', "els => els.map(e => e.textContent)")


def test_answers_render_as_markdown_with_highlighted_code_kept_exactly(engine):
    from qtune.serve.api import create_app
    from qtune.serve.engine import GenerationSettings

    app = create_app(engine, defaults=GenerationSettings(max_new_tokens=200))
    with running(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("#message textarea")
            with scripted(engine, MARKDOWN_ANSWER, delay=0.1):  # ~40 tokens: 4 s of streaming to watch
                box = page.locator("#message textarea")
                box.fill("Write add.")
                box.press("Enter")
                # while streaming, the fence is still open: the block runs to the end of the text so far
                page.wait_for_function(
                    """() => { const c = document.querySelector('[data-testid="bot"] pre code');
                                                  return c && c.textContent.includes('if a:'); }""",
                    timeout=60_000,
                )
                partial = code_blocks(page)
                assert page.locator("#send").is_disabled()  # still streaming
                assert len(partial) == 1 and CODE.startswith(partial[0].rstrip("\n")) and partial[0] != CODE
                page.wait_for_selector("#send:enabled", timeout=60_000)
            assert code_blocks(page) == [CODE]  # every space and blank line of the code, exactly
            block = page.locator('[data-testid="bot"] pre code')
            assert block.get_attribute("class").split() == ["language-python"]
            keywords = block.locator(".token.keyword").all_inner_texts()
            assert keywords == ["def", "if", "return", "return"]  # highlighted by Prism
            assert block.locator(".token.comment").all_inner_texts() == ["# both"]
            bot = page.locator('[data-testid="bot"]').last
            assert bot.locator("em").all_inner_texts() == ["function"]  # and the prose is Markdown
            assert bot.locator("strong").all_inner_texts() == ["two"]

            bot.hover()
            bot.locator(".copy_code_button").click()
            assert page.evaluate("navigator.clipboard.readText()") == CODE

            # bare code (no fence) is shown exactly as generated, indentation and "#" included
            with scripted(engine, INDENTED):
                send(page, "Sort xs.", 2)
            assert code_blocks(page) == [CODE, INDENTED]
            second = page.locator('[data-testid="bot"]').last
            assert second.locator("h1").count() == 0
            second.hover()
            second.locator(".copy_code_button").click()
            assert page.evaluate("navigator.clipboard.readText()") == INDENTED  # Gradio's own copy trims it

            # and so are the user's messages
            send(page, "  keep   these  spaces", 3)
            shown = page.eval_on_selector_all('[data-testid="user"] pre code', "els => els.map(e => e.textContent)")
            assert shown == ["  keep   these  spaces\n"]
            assert page.locator('[data-testid="user"]').first.inner_text() == "Write add."
        finally:
            browser.close()
