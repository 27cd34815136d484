"""Serve at once, build behind, in a real browser: the report opens on a case whose later stages are
not built, the sidebar shows the background build's live progress, and the open chapter fills in
by itself when its stage lands — no reload, no click.

Runs ``streamlit run app.py`` (background builds on) on a copy of the small case's cache where
only data, models and experts are built, and drives Debian's chromium through Playwright.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from core.casestudy import worker
from tests.e2e.test_browser import CHROMIUM, FLAGS, READY, _require_browser, _serve

pytestmark = pytest.mark.e2e


def test_the_open_chapter_fills_in_when_the_background_build_lands(small_study, tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    cache = tmp_path / "cache"
    shutil.copytree(small_study.cache.root, cache, ignore=shutil.ignore_patterns("workers"))
    case = small_study.config.name
    env = {"CASEBOOK_CACHE": str(cache), "CASEBOOK_CASE": case, "CASEBOOK_BACKGROUND": "1"}
    try:
        with _serve(env, tmp_path / "server.log") as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(120_000)
                page.goto(f"{url}/suspects")
                page.wait_for_selector(f"{READY} h1")
                # While discovery is not built: the chapter says it is being built behind, and
                # the sidebar shows the worker's progress (stage and step).
                main = page.locator('[data-testid="stMain"]')
                sidebar = page.locator('[data-testid="stSidebar"]')
                if not worker.state(case, cache)["finished"]:
                    page.wait_for_selector("text=built in the background", timeout=60_000)
                    assert sidebar.get_by_text("Building in the background").count() >= 1
                # Then, with no reload, the chapter draws its charts.
                page.wait_for_function(
                    """() => document.querySelector('[data-testid="stMain"]')
                               .querySelectorAll('[data-testid="stVegaLiteChart"]').length > 0""",
                    timeout=300_000)
                assert main.get_by_text("built in the background").count() == 0
                end = worker.wait(case, cache, timeout=300)
                assert end["finished"] and end["error"] is None, end
                assert page.locator('[data-testid="stException"]').count() == 0
            finally:
                browser.close()
    finally:
        record = worker.running(case, cache)
        if record:
            os.killpg(record["pid"], signal.SIGKILL)
