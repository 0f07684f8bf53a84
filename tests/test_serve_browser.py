"""The search page in headless Chromium: upload a photo, see the grid of neighbours, screenshot.

Needs Debian's `chromium` and `chromium-driver` (driven with selenium). Set
LVD_SCREENSHOT=/path/file.png to keep the screenshot for a person to look at.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from browser_support import headless_chromium
from index_support import embedded_photo_run, running_server
from PIL import Image

from lvd.index.store import BuildOptions, IndexStore
from lvd.serve.run_inputs import build
from lvd.serve.service import ServeOptions

# the page is driven in headless Chromium
pytestmark = pytest.mark.needs("chromium")


@pytest.fixture()
def browser():
    with headless_chromium(1200, 900) as driver:
        yield driver


@pytest.mark.slow
def test_drop_page_shows_neighbours_grid(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = tmp_path / "run"
    rows, data, _ = embedded_photo_run(run)
    build(run / "embed", tmp_path / "index", BuildOptions(progress=False))
    query = next(r for r in rows if r["key"].startswith("chelsea"))
    upload = tmp_path / "query.jpg"
    upload.write_bytes(data[query["id"]])
    with running_server(IndexStore.open(tmp_path / "index"), ServeOptions()) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "15 images" in d.find_element(By.ID, "info").text)
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("8")
        browser.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid figure.hit")) == 8)
        # every thumbnail loaded as a real image
        wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        figures = browser.find_elements(By.CSS_SELECTOR, "#grid figure.hit")
        first = figures[0].find_element(By.TAG_NAME, "figcaption").text
        assert f"id {query['id']}" in first and first.startswith("1.000")
        assert "8 neighbours of query.jpg" in browser.find_element(By.ID, "status").text
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        # clicking a neighbour searches with it
        second_id = figures[1].find_element(By.TAG_NAME, "figcaption").text.split("id ")[1].split()[0]
        figures[1].click()
        wait.until(lambda d: f"neighbours of id {second_id}" in d.find_element(By.ID, "status").text)
        # a file that is not an image: the page says so and shows no grid
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: "cannot read the uploaded image" in d.find_element(By.ID, "status").text)
        assert browser.find_elements(By.CSS_SELECTOR, "#grid figure") == []
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] > 400 and img.shape[1] > 800 and img.std() > 20  # a real page, not a blank one
    if os.environ.get("LVD_SCREENSHOT"):
        shutil.copy(shot, os.environ["LVD_SCREENSHOT"])
