"""The HTML report in a real browser: headless Debian Chromium through Python Playwright.

The set-up installs what is missing (`apt-get install -y chromium`, `pip install playwright`);
the test skips, saying why, only when they cannot be installed. Playwright's own browser
download (`playwright install`) is never used.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compinv.evaluation.evaluate import Evaluation
from compinv.evaluation.report import write_report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _ensure_browser():
    """sync_playwright, installing Debian's chromium and the playwright package when missing."""
    if not Path(CHROMIUM).exists() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing and `apt-get install -y chromium` could not install it")
    try:
        return importlib.import_module("playwright.sync_api").sync_playwright
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "playwright"],
                       capture_output=True, timeout=600)
    try:
        return importlib.import_module("playwright.sync_api").sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing and `pip install playwright` failed")


def picture(path: Path, colour, size=64) -> Path:
    pixels = np.zeros((size, size, 3), np.uint8) + np.array(colour, np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def small_evaluation(folder: Path) -> Evaluation:
    """Two variants x two prompts x two seeds, with an attention heat-map on the spatial ones."""
    rng = np.random.default_rng(0)
    rows = []
    for v, variant in enumerate(("baseline", "spatial")):
        for p, prompt in enumerate(("a cat and a dog", "a cat and a cup")):
            for i in range(2):
                image = picture(folder / f"{variant}-{p}-{i}.png", (60 * v + 40, 80 * p + 40, 30 * i))
                attention = ([str(picture(folder / f"attention-{variant}-{p}-{i}.png", (200, 0, 0)))]
                             if variant == "spatial" else [])
                cos = 0.2 + 0.05 * v + 0.01 * rng.standard_normal()
                rows.append({"image": str(image), "variant": variant, "prompt": prompt,
                             "plain_prompt": prompt, "prompt_key": prompt, "index": i,
                             "objects": prompt.split()[-1], "attention": attention,
                             "clip_t": cos, "clip_score": 2.5 * cos,
                             "clip_i": 0.8 - 0.02 * v + 0.01 * rng.standard_normal(),
                             "inclusion": float((i + v) % 2)})
    return Evaluation(rows, ["clip_t", "clip_score", "clip_i", "inclusion"],
                      {"clip_t": "raw cosine", "clip_score": "2.5 max(cos, 0)", "clip_i": "CLIP-I",
                       "inclusion": "DETR >= 0.8"})


def test_report_tables_plot_and_grids_are_visible(tmp_path):
    sync_playwright = _ensure_browser()
    report = write_report(small_evaluation(tmp_path), tmp_path / "report.html")
    html = report.read_text()
    assert "src=\"data:image/" in html and "file://" not in html  # self-contained
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        page.goto(report.resolve().as_uri())
        for table in ("#metrics", "#differences", "#definitions"):
            assert page.locator(table).is_visible(), table
        assert page.locator("#metrics tr").count() == 3  # header + 2 variants
        assert "± " in page.locator("#metrics").inner_text()
        assert "spatial − baseline" in page.locator("#differences").inner_text()
        scatter = page.locator("#scatter")
        assert scatter.is_visible()
        assert scatter.evaluate("img => img.complete && img.naturalWidth") >= 300
        grids = page.locator("table.grid img")
        assert grids.count() == 8 + 4  # 2 variants x 2 prompts x 2 seeds, 4 heat-maps
        assert grids.evaluate_all("imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("img.attention").count() == 4
        assert page.locator("table.grid img").first.is_visible()
        browser.close()
