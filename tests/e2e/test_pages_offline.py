"""The report runs offline (issue 22): in a real browser, opening the first chapter makes no
request to any other host (the favicon used to come from a font CDN), and its favicon is served
by the app itself. Debian's chromium through Playwright, on the small prebuilt case."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from tests.e2e.test_browser import CHROMIUM, FLAGS, READY, _require_browser, _serve

pytestmark = pytest.mark.e2e


def test_no_request_leaves_the_machine_and_the_favicon_is_local(small_study, tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    env = {"CASEBOOK_CACHE": str(small_study.cache.root), "CASEBOOK_CASE": small_study.config.name,
           "CASEBOOK_BACKGROUND": "0"}
    with _serve(env, tmp_path / "server.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            asked: list[str] = []
            page.on("request", lambda r: asked.append(r.url))
            page.goto(url)
            page.wait_for_selector(f"{READY} h1")
            page.wait_for_timeout(1500)  # the favicon is set after the first script run
            icons = page.eval_on_selector_all("link[rel~='icon']", "els => els.map(e => e.href)")
            assert icons, "the page has a favicon"
            host = urlparse(url).hostname
            outside = [u for u in asked + icons
                       if urlparse(u).scheme in ("http", "https") and urlparse(u).hostname != host]
            assert not outside, outside
        finally:
            browser.close()
