"""Debian's chromium, headless, driven by selenium through chromedriver: the web console's
screenshot at the end of `llmos demo`, and the browser the console's end-to-end test drives.

selenium is a development package (the `dev` extra) and chromium an apt package (`make install`
installs both); without them the screenshot is skipped, saying what is missing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless as root in a container: no sandbox, no GPU, and nothing reaching the network by itself.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)


def missing_browser() -> str:
    """Why no headless browser can run here ("" when one can)."""
    absent = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if absent:
        return f"{' and '.join(absent)} not installed (`make install` installs Debian's chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra: pip install -e '.[dev]')"
    return ""


def headless_chromium(user_data_dir: Path, width: int = 1280, height: int = 900, extra_flags: Sequence[str] = ()) -> WebDriver:
    """A fresh chromium with its own profile folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}", *extra_flags):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def console_screenshot(url: str, api_key: str, question: str, path: Path, timeout_s: float = 180.0) -> None:
    """Signs in to the console at `url`, asks the assistant `question`, waits for the answer
    and saves a screenshot of the page to `path`."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    profile = Path(tempfile.mkdtemp(prefix="llmos-chromium-"))
    try:
        driver = headless_chromium(profile)
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        raise RuntimeError(f"chromium did not start: {exc.msg}") from None
    try:
        driver.get(url)
        driver.find_element(By.ID, "api-key").send_keys(api_key, Keys.ENTER)
        deadline = time.monotonic() + timeout_s
        while not driver.find_element(By.ID, "console").is_displayed():
            if driver.find_element(By.ID, "sign-in-error").text or time.monotonic() > deadline:
                raise RuntimeError(f"could not sign in to the console: {driver.find_element(By.ID, 'sign-in-error').text or 'timed out'}")
            time.sleep(0.1)
        driver.find_element(By.ID, "chat-input").send_keys(question, Keys.ENTER)
        while not driver.find_elements(By.CSS_SELECTOR, '#chat-log article.message.assistant[aria-busy="false"]'):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer in the console within {timeout_s:.0f} s")
            time.sleep(0.2)
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    except WebDriverException as exc:
        raise RuntimeError(f"the console in chromium: {exc.msg}") from None
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
