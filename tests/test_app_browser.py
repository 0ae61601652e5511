"""Headless Chromium clicks through Train, Sample and Compare and checks that images appear.

Debian's ``chromium`` driven by Python Playwright (``executable_path``; no browser download).
Screenshots of every tab go to the test's tmp folder and, with ``MIXOFSHOW_SCREENSHOTS=DIR``,
to DIR (the README's ``docs/screenshots`` were made that way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.app_helpers import AppServer

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


def _shot(page, tmp_path: Path, name: str) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    page.screenshot(path=str(tmp_path / f"{name}.png"))
    out = os.environ.get("MIXOFSHOW_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(out) / f"{name}.png"
        page.screenshot(path=str(path))
        from PIL import Image

        with Image.open(path) as img:  # 256 colours keep the committed PNGs small
            small = img.convert("RGB").quantize(256)
        small.save(path, optimize=True)


def _fill(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True).filter(visible=True).first
    box.fill(value)
    box.press("Tab")


def test_click_through_train_then_sample(tmp_path):
    app = AppServer(tmp_path / "runs")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(app.url)
            page.get_by_role("tab", name="Train").click()
            _fill(page, "Steps", "6")
            _fill(page, "Resolution", "64")
            _fill(page, "Validate every (0: end, -1: never)", "3")
            _fill(page, "Checkpoint every", "3")
            page.locator("#train-submit").click()
            try:
                page.locator("#train-status", has_text="done").wait_for(timeout=240_000)
            except Exception:
                _shot(page, tmp_path, "failure")
                raise
            page.locator("#train-gallery img").first.wait_for(timeout=30_000)
            assert page.locator("#train-gallery img").count() >= 1
            _shot(page, tmp_path, "train")

            page.get_by_role("tab", name="Sample").click()
            page.locator("#sample-refresh").click()
            page.get_by_label("Concept or fused model").click()
            page.get_by_role("option").first.click()
            _fill(page, "Steps", "25")  # the toy world samples 25 steps in about a second
            page.locator("#sample-submit").click()
            page.locator("#sample-gallery img").first.wait_for(timeout=180_000)
            page.wait_for_timeout(2500)  # the second image
            assert page.locator("#sample-gallery img").count() >= 2
            _shot(page, tmp_path, "sample")

            page.get_by_role("tab", name="Compare").click()
            for label, value in (("Seeds", "0"), ("Steps per run", "2"), ("Resolution (shipped concept)", "64"),
                                 ("Images per prompt", "1"), ("Sampler steps", "25"), ("Held-out loss draws", "2")):
                _fill(page, label, value)  # CLIP left empty: the toy world's own
            page.locator("#compare-submit").click()
            page.locator("#compare-status", has_text="done").wait_for(timeout=240_000)
            page.locator("#compare-plots img").first.wait_for(timeout=30_000)
            assert page.locator("#compare-report table").count() >= 1  # comparison.md's table
            report = page.locator("#compare-report").inner_text()
            assert "toyworld" in report and "identity" in report  # the world's CLIP and identity judge
            page.set_viewport_size({"width": 1280, "height": 1900})
            page.wait_for_timeout(2000)
            _shot(page, tmp_path, "compare")
            page.set_viewport_size({"width": 1280, "height": 860})

            for tab in ("Fuse", "Runs", "Queue"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(1500)
                if tab == "Fuse":  # the trained concept is listed; tick it
                    page.get_by_label("robot (robot.safetensors)").check()
                if tab == "Runs":  # the training run, not the newer sample set
                    page.get_by_label("Run", exact=True).click()
                    page.get_by_role("option", name="train: robot").click()
                if tab == "Queue":
                    _fill(page, "Job id (click a row)", "1")
                page.wait_for_timeout(2000)
                _shot(page, tmp_path, tab.lower())
            browser.close()
    finally:
        app.stop()
