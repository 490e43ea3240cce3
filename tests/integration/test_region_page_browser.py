"""The search page with regions (issue 24), in a real headless browser on the real stack: after
an image is picked, a rectangle dragged on it is cut from the image in the page and uploaded
as the query, and each hit's matched box is drawn on its thumbnail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import LocalStack
from engine.models import LITE0_REGION_MODEL_SPEC
from engine.settings import Settings
from query_api import create_app
from tests.integration.api_support import served
from tests.integration.test_region_search_api import (
    CROP,
    CROP_OF,
    RegionSet,
    region_collections,
)
from tests.support.browser import headless_chromium

pytestmark = pytest.mark.stack

# Records each upload the page sends (its file's name and pixel size), so the test sees the
# request the drag made.
RECORD_UPLOADS = """
window.sent = [];
const send = window.fetch;
window.fetch = (path, init) => {
  if (init && init.body instanceof FormData) {
    const file = init.body.get("file");
    const entry = { path, name: file.name, collection: init.body.get("collection_name") };
    window.sent.push(entry);
    createImageBitmap(file).then((bitmap) => {
      entry.width = bitmap.width;
      entry.height = bitmap.height;
    });
  }
  return send(path, init);
};
"""
# Where the first hit's drawn box lies on its thumbnail's image, as fractions of the image.
FIRST_BOX = """
const card = document.querySelector("#results .hit");
const outline = card.querySelector(".box");
if (!outline) return null;
const img = card.querySelector("img");
const frame = card.querySelector(".thumb").getBoundingClientRect();
const scale = Math.min(frame.width / img.naturalWidth, frame.height / img.naturalHeight);
const width = img.naturalWidth * scale, height = img.naturalHeight * scale;
const left = frame.left + (frame.width - width) / 2, top = frame.top + (frame.height - height) / 2;
const box = outline.getBoundingClientRect();
return {
  id: card.dataset.id, box: card.dataset.box,
  x0: (box.left - left) / width, y0: (box.top - top) / height,
  x1: (box.right - left) / width, y1: (box.bottom - top) / height,
};
"""


@pytest.fixture
def api(settings: Settings, stack: LocalStack) -> Iterator[str]:
    """The API served over HTTP on the test's settings, Triton serving the region model."""
    stack.serve_models([LITE0_REGION_MODEL_SPEC.name])  # [] when served already
    with served(create_app(settings)) as base:
        yield base


@pytest.fixture
def photos(api: str, settings: Settings, unique: str, tmp_path: Path) -> Iterator[RegionSet]:
    with (
        httpx.Client(base_url=api, timeout=60) as client,
        region_collections(client, settings, unique, tmp_path / "photos") as made,
    ):
        yield made


@pytest.fixture
def browser() -> Iterator[Any]:
    with headless_chromium() as driver:
        yield driver


def test_a_dragged_part_of_the_query_is_searched_and_hits_show_their_box(
    api: str, photos: RegionSet, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: PLC0415

    photo = photos.paths[CROP_OF]
    browser.get(api + "/")
    wait = WebDriverWait(browser, 60)
    select = wait.until(lambda d: d.find_element(By.ID, "collection"))
    wait.until(
        lambda d: photos.regions in [o.get_attribute("value") for o in Select(select).options]
    )
    Select(select).select_by_value(photos.regions)
    browser.execute_script(RECORD_UPLOADS)
    picker = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false", picker)
    picker.send_keys(str(photo))
    status = browser.find_element(By.ID, "status")
    wait.until(lambda _: status.text.endswith(f"results for {photo.name}"))
    query = wait.until(
        lambda d: d.execute_script(
            "const i = document.getElementById('query-image');"
            "return i.complete && i.naturalWidth ? i.getBoundingClientRect() : null"
        )
    )

    # Drag CROP's rectangle on the shown image (offsets from its centre).
    width, height = query["width"], query["height"]
    frame = browser.find_element(By.ID, "query-frame")
    start = ((CROP[0] - 0.5) * width, (CROP[1] - 0.5) * height)
    ActionChains(browser).move_to_element_with_offset(
        frame, round(start[0]), round(start[1])
    ).click_and_hold().move_by_offset(
        round((CROP[2] - CROP[0]) * width), round((CROP[3] - CROP[1]) * height)
    ).release().perform()
    wait.until(lambda _: status.text.endswith(f"results for part of {photo.name}"))
    sent = wait.until(
        lambda d: [e for e in d.execute_script("return window.sent") if "width" in e][-1:]
    )[0]
    # The drag's upload: the crop, cut from the full-size photo (512 x 512).
    assert sent["path"] == "/search" and sent["collection"] == photos.regions
    assert sent["name"] == f"part-of-{photo.stem}.png"
    assert abs(sent["width"] - (CROP[2] - CROP[0]) * 512) <= 6, sent
    assert abs(sent["height"] - (CROP[3] - CROP[1]) * 512) <= 6, sent
    assert browser.find_element(By.ID, "selection").is_displayed()

    # The photo comes first, its matched region drawn over the crop's centre.
    drawn = wait.until(lambda d: d.execute_script(FIRST_BOX))
    browser.save_screenshot(str(tmp_path / "region-search.png"))
    print(f"screenshot: {tmp_path / 'region-search.png'}")
    assert drawn["id"] == CROP_OF and drawn["box"] != "0,0,1,1", drawn
    centre = ((CROP[0] + CROP[2]) / 2, (CROP[1] + CROP[3]) / 2)
    assert drawn["x0"] <= centre[0] <= drawn["x1"], drawn
    assert drawn["y0"] <= centre[1] <= drawn["y1"], drawn
    area = (drawn["x1"] - drawn["x0"]) * (drawn["y1"] - drawn["y0"])
    assert 0.1 < area < 0.3, drawn  # a 0.4 x 0.4 window, not the whole thumbnail
