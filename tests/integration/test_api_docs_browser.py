"""The interactive docs (``/docs``) render in a real headless browser from the API's own files:
Swagger UI shows the API's title and operations, and the page loaded nothing from another host
(so it works without internet access)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from engine.settings import Settings
from engine.store import VectorStore
from query_api import create_app
from query_api.app import TITLE
from tests.integration.api_support import served
from tests.support.browser import headless_chromium

pytestmark = pytest.mark.stack


@pytest.fixture
def browser() -> Iterator[Any]:
    with headless_chromium() as driver:
        yield driver


def test_the_docs_render_offline_in_a_headless_browser(
    settings: Settings, store: VectorStore, browser: Any
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    # Auth on: the docs and their files stay open without a key.
    api = settings.api.model_copy(update={"auth": "on", "api_keys": ["docs-test-key"]})
    with served(create_app(settings.model_copy(update={"api": api}))) as base:
        browser.get(base + "/docs")
        wait = WebDriverWait(browser, 60)
        title = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title"))
        assert TITLE in title.text
        operations = wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock") or None
        )
        assert len(operations) >= 14  # every route of the schema
        assert "POST/search" in "".join(op.text.replace("\n", "") for op in operations)
        assert not browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .errors-wrapper")
        loaded: list[str] = browser.execute_script(
            "return performance.getEntriesByType('resource').map(entry => entry.name)"
        )
    assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in loaded), loaded
    elsewhere = [url for url in loaded if not url.startswith(base) and not url.startswith("data:")]
    assert elsewhere == [], elsewhere
