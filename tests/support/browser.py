"""A headless Chromium for the page tests (the search page, the docs): installed on first use
(``apt-get``, as CI's machines allow), driven by Selenium, always quit."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WINDOW = "1280,1000"


def ensure_chromium() -> None:
    """Install chromium and its driver unless both are on the PATH; fail loudly otherwise."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True)
    assert shutil.which("chromium") and shutil.which("chromedriver"), "chromium did not install"


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """A Selenium driver of a headless Chromium, quit on exit."""
    ensure_chromium()
    from selenium import webdriver  # noqa: PLC0415 (a dev-only dependency)

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={WINDOW}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        options=options,
        service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
    )
    try:
        yield driver
    finally:
        driver.quit()
