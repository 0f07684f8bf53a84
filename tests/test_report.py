"""The report renders in headless Chromium with every picture loaded."""

import contextlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser_support import headless_chromium
from PIL import Image

from lvd.curate.config import load_config
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.curate.report import run_report


def _write(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


@pytest.fixture()
def run(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(24):
        _write(tmp_path / "pool" / f"{i:02d}.png", tuple(int(v) for v in rng.integers(0, 256, 3)))
    _write(tmp_path / "eval" / "shoe" / "e0.png", (250, 0, 0))
    _write(tmp_path / "seeds" / "shoe" / "s0.png", (0, 0, 250))
    (tmp_path / "pool" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"sources.pool=[{tmp_path / 'pool'}]",
            f"sources.eval.ev={tmp_path / 'eval'}",
            f"sources.seeds.s={tmp_path / 'seeds'}",
            "workers=0",
            "progress=false",
            "embed.copy_detection.weights=null",
            "dedup.threshold=0.99",
            "decontam.threshold=0.99",
        ],
    )
    run_manifest(cfg)
    m = read_manifest(cfg.run_dir)
    pool = m[m.set == "pool"]["id"].to_numpy()
    ev = m[m.set == "eval:ev"]["id"].iloc[0]
    seed = m[m.set == "seed:s"]["id"].iloc[0]
    run = tmp_path / "run"
    (run / "dedup").mkdir()
    comp = np.arange(len(pool))
    comp[1:4] = 0  # one group of four
    keep = np.ones(len(pool), bool)
    keep[1:4] = False
    pd.DataFrame({"id": pool, "component": comp, "keep": keep}).to_parquet(run / "dedup" / "near.parquet")
    pd.DataFrame({"id": pool[5:6], "dup_of": pool[6:7]}).to_parquet(run / "dedup" / "exact.parquet")
    pd.DataFrame({"id": pool[7:8], "eval_set": ["ev"], "eval_id": [ev], "similarity": [0.91]}).to_parquet(
        run / "dedup" / "decontam.parquet"
    )
    (run / "cluster").mkdir()
    pd.DataFrame(
        {"id": pool, "cluster": np.arange(len(pool)) % 3, "distance": np.linspace(0, 1, len(pool), dtype=np.float32)}
    ).to_parquet(run / "cluster" / "assign.parquet")
    (run / "retrieve").mkdir()
    pd.DataFrame(
        {
            "seed_set": "s",
            "seed_id": seed,
            "id": pool[10:14],
            "rank": [1, 2, 3, 4],
            "similarity": [0.9, 0.8, 0.7, 0.6],
            "mode": "sample",
            "cluster": 0,
        }
    ).to_parquet(run / "retrieve" / "neighbors.parquet")
    return cfg


def test_report_lists_every_decision(run):
    page = run_report(run).read_text()
    for text in (
        "Duplicate groups",
        "1 near-duplicate groups",
        "Decontamination",
        "sim 0.910",
        "Clusters",
        "3 clusters",
        "Retrieval per seed set",
        "#1 sim 0.900",
        "Quarantined inputs",
        "not an image",
    ):
        assert text in page, text
    assert "<svg" in page


@pytest.mark.needs("chromium")
@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_all_pictures(run, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    index = run_report(run)
    with headless_chromium(1200, 900) as browser:
        browser.get(index.as_uri())
        # pictures load lazily: scroll through the page as a reader would, and let the page count them
        WebDriverWait(browser, 60).until(
            lambda d: d.execute_script("return document.body.dataset.imagesLoaded !== undefined")
        )
        height = browser.execute_script("return document.body.scrollHeight")
        for y in range(0, height + 1200, 600):
            browser.execute_script(f"window.scrollTo(0, {y})")
        loaded_all = "return document.body.dataset.imagesLoaded === document.body.dataset.imagesTotal"
        with contextlib.suppress(TimeoutException):
            WebDriverWait(browser, 60).until(lambda d: d.execute_script(loaded_all))
        total = int(browser.execute_script("return document.body.dataset.imagesTotal"))
        loaded = int(browser.execute_script("return document.body.dataset.imagesLoaded"))
        browser.execute_script("window.scrollTo(0, 0)")
        browser.set_window_size(
            1200, browser.execute_script("return document.body.scrollHeight") + 200
        )  # the whole page
        assert total >= 20 and loaded == total
        shot = Path(os.environ.get("LVD_KEEP_SCREENSHOT") or tmp_path / "report.png")  # keep it to look at
        browser.save_screenshot(str(shot))
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the planted pure-red eval image and blue seed image appear as thumbnails on the page
    red = ((arr[..., 0] > 230) & (arr[..., 1] < 30) & (arr[..., 2] < 30)).sum()
    blue = ((arr[..., 2] > 230) & (arr[..., 0] < 30) & (arr[..., 1] < 30)).sum()
    assert red > 500 and blue > 500


def test_report_escapes_names_says_what_it_truncates_and_names_files(run, tmp_path):
    """Jinja2 autoescaping: a file name with markup is shown as text; truncation is announced."""
    run_dir = Path(run.run_dir)
    near = pd.read_parquet(run_dir / "dedup" / "near.parquet")
    pool = near["id"].to_numpy()
    comp = np.arange(len(pool)) // 2  # 12 groups of two ...
    import lvd.curate.report as report

    pd.DataFrame({"id": pool, "component": comp, "keep": np.arange(len(pool)) % 2 == 0}).to_parquet(
        run_dir / "dedup" / "near.parquet"
    )
    for part in (run_dir / "manifest").glob("*.parquet"):
        m = pd.read_parquet(part)
        m.loc[m["id"] == pool[0], "key"] = "<img src=x onerror=alert(1)>.png"  # a hostile file name, shown in group 0
        m.to_parquet(part, index=False)
    old = report.MAX_GROUPS
    report.MAX_GROUPS = 5  # ... of which 5 are shown
    try:
        page = report.run_report(run).read_text()
    finally:
        report.MAX_GROUPS = old
    assert "showing 5 of 12 groups" in page and 'href="../dedup/near.parquet"' in page
    assert "01.png" in page  # file names under the thumbnails
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page and "<img src=x onerror" not in page
    manifest = read_manifest(run_dir, status=None)
    assert manifest[manifest.status != "ok"]["source"].iloc[0] in page  # quarantine by source
