"""The search page in headless Chromium: upload a photo, see the grid of neighbours, screenshot.

Needs Debian's `chromium` and `chromium-driver` (driven with selenium). Set
LVD_SCREENSHOT=/path/file.png to keep the screenshot for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


def clip_retrieval_front() -> Path:
    """The web front inside the clip-retrieval wheel (front/build/, installed beside its package)."""
    import importlib.metadata

    index = next(p for p in importlib.metadata.files("clip-retrieval") if str(p).endswith("front/build/index.html"))
    return Path(index.locate()).parent


class static_server:
    """`with static_server(folder) as url:` files of a folder over http on a free loopback port."""

    def __init__(self, folder: Path):
        import functools
        import http.server

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        import threading

        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


SHADOW_PICS = "return [...document.querySelector('clip-front').shadowRoot.querySelectorAll('img.pic')]"


@pytest.mark.slow
@pytest.mark.needs("clip_retrieval")
def test_clip_retrieval_front_from_the_wheel_shows_lvd_results(tmp_path, browser):
    """clip-retrieval's own front, served as it ships, against `lvd index serve --cors-origin`: an
    uploaded photo comes back first with every picture loaded, and "search by this image" works."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = tmp_path / "run"
    rows, data, _ = embedded_photo_run(run)
    build(run / "embed", tmp_path / "photos", BuildOptions(factory="Flat", progress=False))
    query = next(r for r in rows if "coffee" in r["key"])
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(data[query["id"]])
    with static_server(clip_retrieval_front()) as front:
        opts = ServeOptions(cors_origins=(front,))
        with running_server(IndexStore.open(tmp_path / "photos"), opts, name="photos") as back:
            browser.get(f"{front}/?back={back}&index=photos")
            wait = WebDriverWait(browser, 60)
            chooser = wait.until(
                lambda d: d.execute_script(
                    "const f = document.querySelector('clip-front');"
                    "return f && f.shadowRoot && f.shadowRoot.getElementById('filechooser');"
                )
            )
            chooser.send_keys(str(upload))  # the camera button's file input
            wait.until(lambda d: len(d.execute_script(SHADOW_PICS)) == len(rows))
            wait.until(lambda d: d.execute_script(SHADOW_PICS + ".every(i => i.complete && i.naturalWidth > 0)"))
            sources = browser.execute_script(SHADOW_PICS + ".map(i => i.src)")
            assert sources[0].startswith(f"{back}/thumb/{query['id']}?")  # its own file first
            assert len(set(sources)) == len(rows)
            shot = tmp_path / "front.png"
            browser.save_screenshot(str(shot))
            # "search by this image" on the third result sends its url back as image_url
            third = int(sources[2].split("/thumb/")[1].split("?")[0])
            browser.execute_script(
                "document.querySelector('clip-front').shadowRoot.querySelectorAll('.subImageSearch')[2].click()"
            )
            wait.until(lambda d: d.execute_script(SHADOW_PICS + "[0].src").startswith(f"{back}/thumb/{third}?"))
            wait.until(lambda d: d.execute_script(SHADOW_PICS + ".every(i => i.complete && i.naturalWidth > 0)"))
            assert browser.find_elements(By.CSS_SELECTOR, "clip-front")
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.std() > 20  # pictures on the page, not a blank one
    if os.environ.get("LVD_SCREENSHOT"):
        shutil.copy(shot, os.environ["LVD_SCREENSHOT"].replace(".png", "-clip-front.png"))


@pytest.mark.slow
def test_the_page_searches_by_text_for_an_index_with_a_text_tower(tmp_path, browser):
    """A photo index embedded with a (random, tiny) CLIP pair: the page shows its text box and a grid."""
    from index_support import photo_run, write_embed
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from text_support import clip_folder

    from lvd.pretrain.models.embedder import Embedder

    run = tmp_path / "run"
    rows, data = photo_run(run)
    clip_folder(tmp_path / "clip")
    embedder = Embedder("auto", tmp_path / "clip", dtype="float32")
    ids = np.array([r["id"] for r in rows], np.int64)
    x = embedder.embed_bytes([data[i] for i in ids.tolist()])
    write_embed(run / "embed", ids, x, part_rows=8, success={**embedder.info(), "counts": {"ok": len(ids)}})
    build(run / "embed", tmp_path / "index", BuildOptions(factory="Flat", progress=False))
    want = (x.astype(np.float64) @ embedder.embed_text(["a photo of a coat"])[0].astype(np.float64)).argmax()
    with running_server(IndexStore.open(tmp_path / "index"), ServeOptions(api_key="k3y")) as url:
        browser.get(url + "/?key=k3y")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "textform").is_displayed())
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        browser.find_element(By.ID, "text").send_keys("a photo of a coat\n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid figure.hit")) == 5)
        wait.until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        first = browser.find_elements(By.CSS_SELECTOR, "#grid figure.hit")[0].text
        assert f"id {ids[want]}" in first
        assert "neighbours of \u201ca photo of a coat\u201d" in browser.find_element(By.ID, "status").text
