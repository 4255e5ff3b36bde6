"""The web console in a real browser: Debian's chromium, headless, driven by selenium through
chromedriver, against a gateway on a real stack. Sign in with an API key, drop a Markdown file on
the documents page and watch it reach "indexed", ask the assistant about it and see the answer
stream in with a citation that opens the passage, read the request's trace, delete the document.
Screenshots go to the test's output folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from llmos.stack import stop_pids
from llmos_cli.browser import console_screenshot, headless_chromium, missing_browser
from tests.conftest import REPO, TEST_API_KEY, RunningStack
from tests.integration.test_gateway_openai import Gateway, start_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

DOCUMENT_ID = "bike-repair-e2e"
DOCUMENT = """# Bicycle repair service

Northwind repairs bicycles bought in its stores. A standard bicycle tune-up costs 35 euros and takes
two working days. Bring the bicycle and its receipt to any Northwind store with a workshop.

Electric bicycles are serviced only at the Leeds workshop.
"""
QUESTION = "How much does a bicycle tune-up cost?"
# "How long is a gift card valid?", played by chromium as its microphone.
SPOKEN_QUESTION = REPO / "demo" / "voice" / "gift-card-question.wav"
T = TypeVar("T")


@pytest.fixture(scope="module")
def gateway(stack: RunningStack) -> Iterator[Gateway]:
    process, running = start_gateway(stack, "gateway-console")
    try:
        yield running
    finally:
        stop_pids([process.pid], 10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if reason := missing_browser():
        pytest.fail(reason)
    driver = headless_chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """The first truthy value of `condition`, polled; elements replaced meanwhile count as not yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (NoSuchElementException, StaleElementReferenceException):
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def visible(driver: WebDriver, css: str) -> bool:
    return driver.find_element(By.CSS_SELECTOR, css).is_displayed()


def sign_in(driver: WebDriver) -> None:
    driver.find_element(By.ID, "api-key").send_keys(TEST_API_KEY, Keys.ENTER)
    wait_for(lambda: visible(driver, "#console"), 30, "the console after sign-in")


def status_of(driver: WebDriver, document_id: str) -> str | None:
    badges = driver.find_elements(By.CSS_SELECTOR, f'tr[data-document-id="{document_id}"] .badge')
    return badges[0].get_attribute("data-status") if badges else None


def drop_file(driver: WebDriver, name: str, content: str) -> None:
    """A file dropped on the drop zone, as a person drags one from their desktop."""
    driver.execute_script(
        """
        const [name, content] = arguments;
        const transfer = new DataTransfer();
        transfer.items.add(new File([content], name, {type: "text/markdown"}));
        const zone = document.getElementById("drop-zone");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        """,
        name, content,
    )


def watch_the_answer(driver: WebDriver) -> None:
    """Records in the page, at each change, how much of the assistant's answer is shown and
    whether its stream is still open (aria-busy): the test's polling could miss a fast stream."""
    driver.execute_script(
        """
        window.answerStates = [];
        const log = document.getElementById("chat-log");
        new MutationObserver(() => {
          const article = log.querySelector("article.message.assistant");
          if (article) window.answerStates.push({t: performance.now(), busy: article.getAttribute("aria-busy"),
                                                 length: article.querySelector(".answer").textContent.length});
        }).observe(log, {subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ["aria-busy"]});
        """
    )


def unlabelled_controls(driver: WebDriver) -> list[str]:
    """Form controls without a label a screen reader would read."""
    return list(driver.execute_script(
        """
        return Array.from(document.querySelectorAll("input:not([type=hidden]), select, textarea, button"))
          .filter((control) => !(control.labels && control.labels.length) && !control.getAttribute("aria-label")
                               && !(control.tagName === "BUTTON" && control.textContent.trim()))
          .map((control) => control.id || control.outerHTML.slice(0, 80));
        """
    ))


def test_sign_in_upload_ask_cite_trace_delete(gateway: Gateway, browser: WebDriver, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser.get(f"{gateway.url}/")
    assert browser.title == "LLM OS console"
    assert unlabelled_controls(browser) == []

    # A wrong key is refused with the gateway's message; the right one signs in.
    browser.find_element(By.ID, "api-key").send_keys("not-a-key", Keys.ENTER)
    wait_for(lambda: browser.find_element(By.ID, "sign-in-error").text, 30, "the refusal of a wrong key")
    sign_in(browser)
    assert "tester" in browser.find_element(By.ID, "identity").text
    assert browser.execute_script("return sessionStorage.getItem('llmos.apiKey')") == TEST_API_KEY
    assert browser.execute_script("return localStorage.length") == 0

    # Documents: drop the file, watch its status go to indexed.
    browser.find_element(By.ID, "tab-documents").click()
    drop_file(browser, f"{DOCUMENT_ID}.md", DOCUMENT)
    seen = {wait_for(lambda: status_of(browser, DOCUMENT_ID), 60, "the dropped document in the table")}
    deadline = time.monotonic() + 300
    while (status := status_of(browser, DOCUMENT_ID)) != "indexed" and time.monotonic() < deadline:
        assert status != "failed", browser.find_element(By.CSS_SELECTOR, f'tr[data-document-id="{DOCUMENT_ID}"]').text
        seen.add(status)
        time.sleep(0.1)
    assert status == "indexed", f"still {status} after 300 s (seen: {seen})"
    print(f"statuses seen in the table: {sorted(seen | {status})}")
    browser.save_screenshot(str(shots / "documents.png"))

    # Chat: the answer streams in, then cites the document; the citation opens the passage.
    browser.find_element(By.ID, "tab-chat").click()
    watch_the_answer(browser)
    browser.find_element(By.ID, "chat-input").send_keys(QUESTION, Keys.ENTER)
    answer = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#chat-log article.message.assistant"), 30, "the answer to start")
    wait_for(lambda: answer.get_attribute("aria-busy") == "false", 300, "the answer to end")
    final = answer.find_element(By.CSS_SELECTOR, ".answer").text
    assert "35" in final, final
    assert "failed" not in answer.find_element(By.CSS_SELECTOR, ".meta").text
    states = browser.execute_script("return window.answerStates")
    while_streaming = [state for state in states if state["busy"] == "true" and state["length"]]
    assert while_streaming, f"the answer appeared only once the stream had ended: {states}"
    print(f"answer shown while streaming at lengths {sorted({state['length'] for state in while_streaming})}, "
          f"{states[-1]['t'] - while_streaming[0]['t']:.0f} ms before the stream ended")
    sources = answer.find_elements(By.CSS_SELECTOR, f'.sources button[data-document-id="{DOCUMENT_ID}"]')
    assert sources, answer.text
    browser.save_screenshot(str(shots / "chat.png"))
    sources[0].click()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#passage-text mark"), 30, "the cited passage highlighted")
    assert browser.find_element(By.ID, "passage").get_attribute("open") is not None
    assert "35 euros" in browser.find_element(By.ID, "passage-text").text
    assert "35" in browser.find_element(By.CSS_SELECTOR, "#passage-text mark").text
    browser.save_screenshot(str(shots / "passage.png"))
    browser.find_element(By.ID, "passage-close").click()

    # The trace of the last request, the chat turn: the gateway's span over the services' spans.
    browser.find_element(By.ID, "tab-trace").click()
    assert "chat turn" in browser.find_element(By.ID, "trace-request").text
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '#trace-body tr[data-service="retrieval"]'), 30, "the trace's span tree")
    services = {row.get_attribute("data-service") for row in browser.find_elements(By.CSS_SELECTOR, "#trace-body tr")}
    assert {"gateway", "dialogue", "retrieval"} <= services, services
    assert browser.find_element(By.CSS_SELECTOR, "#trace-body tr").get_attribute("data-service") == "gateway"  # the root
    browser.save_screenshot(str(shots / "trace.png"))

    # Phone-sized: one column, nothing wider than the window.
    browser.set_window_size(390, 844)
    browser.find_element(By.ID, "tab-chat").click()
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(shots / "chat-phone.png"))
    browser.set_window_size(1280, 900)

    # Delete: the row leaves the table.
    browser.find_element(By.ID, "tab-documents").click()
    wait_for(lambda: status_of(browser, DOCUMENT_ID), 30, "the document listed again")
    browser.find_element(By.CSS_SELECTOR, f'tr[data-document-id="{DOCUMENT_ID}"] button.danger').click()
    browser.switch_to.alert.accept()
    wait_for(lambda: status_of(browser, DOCUMENT_ID) is None, 60, "the deleted document to leave the table")
    assert f"{DOCUMENT_ID} deleted" in browser.find_element(By.ID, "documents-status").text
    browser.save_screenshot(str(shots / "deleted.png"))
    print(f"screenshots: {shots}")


def test_the_demo_screenshot_of_the_console(gateway: Gateway, tmp_path: Path) -> None:
    """What `llmos demo` saves under LLMOS_HOME: the console signed in, a question answered."""
    if reason := missing_browser():
        pytest.fail(reason)
    path = tmp_path / "home" / "console.png"
    console_screenshot(f"{gateway.url}/", TEST_API_KEY, "Do you ship to Norway?", path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 10_000
    with pytest.raises(RuntimeError, match="could not sign in to the console: This key was refused"):
        console_screenshot(f"{gateway.url}/", "not-a-key", "Do you ship to Norway?", tmp_path / "refused.png")


def test_a_voice_turn_from_the_microphone(gateway: Gateway, tmp_path: Path) -> None:
    """Chromium's fake microphone plays a recorded question; the page records it (WebM/Opus),
    turns it into WAV, and the answer comes back transcribed, answered and spoken."""
    if reason := missing_browser():
        pytest.fail(reason)
    microphone = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={SPOKEN_QUESTION}")
    driver = headless_chromium(tmp_path / "chromium-profile", extra_flags=microphone)
    try:
        driver.get(f"{gateway.url}/")
        sign_in(driver)
        driver.find_element(By.ID, "tab-voice").click()
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#voice-select option"), 30, "the served voices")
        record = driver.find_element(By.ID, "record")
        record.click()
        wait_for(lambda: record.get_attribute("aria-pressed") == "true", 10, "the recording to start")
        time.sleep(3.2)  # the clip's 3 s
        record.click()
        status = driver.find_element(By.ID, "voice-status")
        wait_for(lambda: visible(driver, "#voice-audio") or "failed" in status.text or "Nothing" in status.text, 240, "the spoken answer")
        assert visible(driver, "#voice-audio"), status.text
        heard = driver.find_element(By.CSS_SELECTOR, "#voice-turn .message.user").text.removeprefix("You:").strip()
        # Recognized through the browser's Opus recording: the words, if not each one ("gift" has come back as "does it").
        assert {"long", "card", "valid"} <= set(heard.lower().split()), heard
        assert driver.find_element(By.CSS_SELECTOR, "#voice-turn article.message.assistant .answer").text
        spoken_s = wait_for(lambda: driver.execute_script("const a = document.getElementById('voice-audio'); return a.readyState >= 1 && a.duration"),
                            30, "the answer's audio to load")
        assert spoken_s > 0.5
        print(f"heard {heard!r}; answer spoken for {spoken_s:.1f} s")
        driver.save_screenshot(str(tmp_path / "voice.png"))
    finally:
        driver.quit()
