"""The report in a real browser: ``streamlit run`` on the small prebuilt case, driven by Debian's
chromium through Playwright.

Every page in the navigation draws without an exception box, with its images and charts; a deep
link (URL with query parameters) reopens the same view, and changing a choice writes the URL.
A screenshot of each page goes to ``tests/e2e/screenshots/<page>.png`` (ignored by git); with
``CASEBOOK_E2E_CASE=decoy-mnist`` (a fully built case) to ``assets/screenshots/`` for the README.

Without ``/usr/bin/chromium`` (or Playwright) the tests skip, unless ``CASEBOOK_REQUIRE_BROWSER=1``
(set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
# Screenshots: the README's (assets/screenshots, committed) when the tests run on a fully built case
# (CASEBOOK_E2E_CASE), else an ignored folder so that a plain test run leaves the tree clean.
# CASEBOOK_SCREENSHOTS overrides both.
SHOTS = Path(os.environ.get("CASEBOOK_SCREENSHOTS") or (
    ROOT / "assets" / "screenshots" if os.environ.get("CASEBOOK_E2E_CASE")
    else ROOT / "tests" / "e2e" / "screenshots"))
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]
READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'
# Pages that must draw images and Altair charts (the others only must not raise).
DRAWS = {"case-study": ("stImage", "stVegaLiteChart"), "influence": ("stImage", "stVegaLiteChart"),
         "representations": ("stImage", "stVegaLiteChart"),
         "corrections": ("stImage", "stVegaLiteChart"), "essence": ("stVegaLiteChart",),
         "suspects": ("stVegaLiteChart",)}


def _require_browser():
    problems = []
    if not CHROMIUM.exists():
        problems.append(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright package is not installed")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("CASEBOOK_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests are required here (CASEBOOK_REQUIRE_BROWSER=1) but {message}")
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_dir(study) -> str:
    cache = getattr(study, "cache", None)
    root = getattr(cache, "root", None) or getattr(study, "cache_dir", None)
    if root is None:
        raise AttributeError("cannot tell where the small study's cache lives")
    return str(root)


# The code the server runs, frozen: a stage's cache key hashes the source of the modules it imports,
# read again whenever a file changes (core.storage.codehash), so in a working tree that is edited
# while the test runs (several people commit to one tree) the live server would see a built stage
# as unbuilt and draw the build offer instead of its results — the cause of "representations
# draws no stImage" (1 run in 6: representations imports the most modules). Building, reporting
# and serving from one copy of the tree tests one version of the code, whatever happens around.
FROZEN = ("app.py", "pyproject.toml", ".streamlit", "chapters", "ui", "core")


def _freeze(dst: Path) -> Path:
    """A copy of the code the app runs (``FROZEN``) under ``dst``; returns ``dst``."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in FROZEN:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dst / name)
    return dst


class _Frozen:
    """A case study as the frozen tree sees it: its name, cache, report JSON and case facts (read
    once by ``python -m core report`` run in that tree)."""

    def __init__(self, name: str, cache_dir: Path, tree: Path):
        import json

        self.config = type("Config", (), {"name": name})()
        self.cache_dir, self.tree = cache_dir, tree
        out = subprocess.run([sys.executable, "-m", "core", "report", name, "--json", "--cache",
                              str(cache_dir)], cwd=tree, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        self._report = json.loads(out.stdout)
        # the case facts the pages read (subject, reference, models, classes), as that tree gives
        facts = ("import json, sys; from core.casestudy import CaseStudy; "
                 "s = CaseStudy.open(sys.argv[1], cache_dir=sys.argv[2]); "
                 "print(json.dumps(s.case_facts(), default=str))")
        out = subprocess.run([sys.executable, "-c", facts, name, str(cache_dir)], cwd=tree,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        self._facts = json.loads(out.stdout)

    def report(self) -> dict:
        return self._report

    def case_facts(self) -> dict:
        return self._facts


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The frozen copy of the app's code that the small case is built, reported and served from."""
    return _freeze(tmp_path_factory.mktemp("e2e-tree") / "app")


@pytest.fixture(scope="module")
def study(request, tmp_path_factory, tree):
    """The small prebuilt case, built and read by the frozen tree (:func:`_freeze`); or, for README
    screenshots of a fully built case, the one named by ``CASEBOOK_E2E_CASE`` (cache:
    ``CASEBOOK_E2E_CACHE``, default the repo's .cache; served from the live tree)."""
    case = os.environ.get("CASEBOOK_E2E_CASE")
    if not case:
        import shutil

        # Every page draws its results: build the later stages too, in a copy of the small
        # study's cache (other tests rely on those stages being unbuilt in the shared one); what
        # the frozen tree's keys no longer match (an edit since) is rebuilt there.
        small = request.getfixturevalue("small_study")
        root = tmp_path_factory.mktemp("e2e-cache") / "cache"
        shutil.copytree(_cache_dir(small), root)
        out = subprocess.run([sys.executable, "-m", "core", "build", small.config.name, "--stages",
                              "data,models,experts,discovery,representations,corrections,essence",
                              "--device", "cpu", "--no-estimate", "--cache", str(root)],
                             cwd=tree, capture_output=True, text=True, timeout=3600,
                             env={**os.environ, "CASEBOOK_BACKGROUND": "0"})
        assert out.returncode == 0, out.stderr[-3000:]
        return _Frozen(small.config.name, root, tree)
    from core.casestudy import CaseStudy

    built = CaseStudy.open(case, cache_dir=os.environ.get("CASEBOOK_E2E_CACHE") or ROOT / ".cache")
    missing = [s for s in ("data", "models", "experts") if not built.status()[s]]
    if missing:
        pytest.fail(f"CASEBOOK_E2E_CASE={case}: build {', '.join(missing)} first "
                    f"(python -m core build {case})")
    return built


@contextlib.contextmanager
def _serve(env_extra: dict, log, cwd: Path = ROOT):
    """``streamlit run app.py`` headless on a free port with ``env_extra``, from the tree ``cwd``;
    yields its URL."""
    port = _free_port()
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not come up in 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: only the server and its children
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(study, tmp_path_factory):
    _require_browser()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    with _serve({"CASEBOOK_CACHE": _cache_dir(study), "CASEBOOK_CASE": study.config.name}, log,
                cwd=getattr(study, "tree", ROOT)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(90_000)
    try:
        yield pg
    finally:
        context.close()


def _settle(page) -> None:
    """Wait until the script has run to the end and the asynchronous drawings are in place."""
    page.wait_for_selector(f"{READY} h1", timeout=120_000)
    for _ in range(2):  # a run can be followed by a rerun (URL written, navigation settled): wait it out
        page.wait_for_timeout(300)
        page.wait_for_selector(READY, timeout=120_000)
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
                   .every(c => c.querySelector('canvas, svg'))
              && [...document.querySelectorAll('[data-testid="stImage"] img')]
                   .every(i => i.complete && i.naturalWidth > 0)""", timeout=60_000)


def _screenshot(page, path: Path, width: int = 1400, cap: int = 9000) -> None:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to fit it."""
    height = page.evaluate("""() => Math.max(...[...document.querySelectorAll(
        '[data-testid="stMain"], [data-testid="stMainBlockContainer"], [data-testid="stAppViewContainer"]')]
        .map(e => e.scrollHeight), window.innerHeight)""")
    page.set_viewport_size({"width": width, "height": min(int(height) + 40, cap)})
    page.wait_for_timeout(400)  # charts re-lay out to the new size
    _settle(page)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": width, "height": 1000})


def _count(page, testid: str) -> int:
    return page.locator(f'[data-testid="{testid}"]').count()


def _drawn(page, testid: str, timeout_ms: int = 30_000) -> bool:
    """Whether an element ``testid`` appears within ``timeout_ms``: a chapter that writes its view
    into the URL reruns once more, and on a loaded machine that rerun can outlast :func:`_settle`."""
    try:
        page.wait_for_selector(f'[data-testid="{testid}"]', state="attached", timeout=timeout_ms)
    except Exception:  # playwright's TimeoutError
        return False
    return _count(page, testid) > 0


def _nav_pages(page, base: str) -> dict[str, str]:
    links = page.locator('[data-testid="stSidebarNav"] a')
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    out = {}
    for href in hrefs:
        path = href.split("?")[0].rstrip("/").rsplit("/", 1)[-1] if href else ""
        name = path if path and not path.startswith("127.0.0.1") else "case-study"
        out[name] = href if href.startswith("http") else f"{base}/{href.lstrip('/')}"
    return out


def _assert_shell(page) -> None:
    """The entrypoint ran: its navigation sections and the shared sidebar are drawn."""
    sidebar = page.locator('[data-testid="stSidebar"]')
    assert sidebar.get_by_text("Background", exact=True).count() == 1  # a navigation section
    assert sidebar.get_by_text("Cache", exact=True).count() == 1
    assert sidebar.locator('[data-testid="stSelectbox"]').filter(has_text="Model").count() == 1


def test_a_deep_link_reopens_the_view_and_choices_write_the_url(server, page, study):
    # Link to a view the report flags: a shortcut expert of the vanilla model when there is one.
    top = study.report()["experts"]["top"]
    pick = next((r for r in top if r["model"] == "vanilla" and r["shortcut"]), None)
    pick = pick or next(r for r in top if r["model"] == "clean" and r["rank"] == 2)
    model, cls, layer, unit = pick["model"], pick["class"], pick["layer"], pick["unit"]
    import ui

    label = ui.model_label(model, facts=study.case_facts())
    # First visit of a fresh server, straight to a deep link: app.py must still run (sidebar, nav).
    page.goto(f"{server}/influence?model={model}&cls={cls}&layer={layer}&view=heatmap&expert={unit}")
    _settle(page)
    assert _count(page, "stException") == 0
    _assert_shell(page)
    assert page.locator("h2", has_text=f"Experts of {layer} for class {cls}").count() == 1
    assert page.get_by_text(label).count() >= 1
    assert page.locator('[data-testid="stRadio"] input[type="radio"]:checked').evaluate_all(
        "els => els.map(e => e.closest('label').innerText)").count("heatmap") == 1
    assert f"expert={unit}" in page.url and f"cls={cls}" in page.url
    verdict = page.locator('[data-testid="stMarkdown"]', has_text=f"unit {unit}").filter(
        has_text="carries the shortcut" if pick["shortcut"] else "does not carry it")
    assert verdict.count() >= 1
    _screenshot(page, SHOTS / "influence-deep-link.png")

    # Choosing another class writes it into the URL; that URL opens the same view in a new tab.
    other = (cls + 1) % 10
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Class").first.click()
    page.get_by_role("option", name=str(other), exact=True).click()
    page.wait_for_function(f"() => location.search.includes('cls={other}')", timeout=60_000)
    _settle(page)
    assert page.locator("h2", has_text=f"Experts of {layer} for class {other}").count() == 1
    link = page.url
    fresh = page.context.new_page()
    fresh.goto(link)
    _settle(fresh)
    assert fresh.locator("h2", has_text=f"Experts of {layer} for class {other}").count() == 1
    assert fresh.get_by_text(label).count() >= 1
    assert _count(fresh, "stException") == 0


def test_every_page_draws_without_exceptions(server, page):
    page.goto(server)
    _settle(page)
    pages = _nav_pages(page, server)
    assert {"case-study", "influence", "method"} <= set(pages), pages
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, href in pages.items():
        page.goto(href)
        _settle(page)
        _assert_shell(page)
        errors = page.locator('[data-testid="stException"]')
        assert errors.count() == 0, f"{name}: {errors.first.inner_text()}"
        for testid in DRAWS.get(name, ()):
            assert _drawn(page, testid), f"{name} draws no {testid}"
        if name in DRAWS:
            assert page.locator('[data-testid="stVegaLiteChart"] canvas, '
                                '[data-testid="stVegaLiteChart"] svg').count() > 0
        _screenshot(page, SHOTS / f"{name}.png")
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- a user's case
# The example folder case of core.cases.newcase (3 RGB classes, 48×48, a "mark" region, a reference),
# listed through $CASEBOOK_CASES: every chapter draws, and a reader explains an image of their own.


@pytest.fixture(scope="module")
def user_server(tmp_path_factory, tree):
    _require_browser()
    from tests.test_pages import write_user_cases

    root = tmp_path_factory.mktemp("user-cases")
    write_user_cases(root)
    cache = tmp_path_factory.mktemp("user-cache")
    env = {"CASEBOOK_CACHE": str(cache), "CASEBOOK_CASE": "shapes", "CASEBOOK_CASES": str(root)}
    out = subprocess.run([sys.executable, "-m", "core", "build", "shapes", "--stages",
                          "data,models,experts", "--device", "cpu", "--no-estimate", "--cache",
                          str(cache)], cwd=tree, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, **env, "CASEBOOK_BACKGROUND": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    log = tmp_path_factory.mktemp("streamlit-user") / "server.log"
    with _serve(env, log, cwd=tree) as url:  # built and served by one frozen copy of the code
        yield url


def _png(rgb) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_every_chapter_draws_for_a_users_case(user_server, page):
    page.goto(user_server)
    _settle(page)
    pages = _nav_pages(page, user_server)
    assert {"case-study", "influence", "method"} <= set(pages), pages
    for name, href in pages.items():
        page.goto(href)
        _settle(page)
        _assert_shell(page)
        errors = page.locator('[data-testid="stException"]')
        assert errors.count() == 0, f"{name}: {errors.first.inner_text()}"
        if name in ("case-study", "influence"):
            assert _count(page, "stImage") > 0 and _count(page, "stVegaLiteChart") > 0, name
        _screenshot(page, SHOTS / f"user-{name}.png")
    page.goto(pages["influence"])
    _settle(page)
    assert page.locator("h2", has_text="Experts of conv1 for class circle").count() == 1
    assert page.get_by_text("threshold", exact=False).count() >= 1
    assert "case=shapes" in page.url


def test_a_reader_explains_an_image_of_their_own(user_server, page):
    import numpy as np

    page.goto(f"{user_server}/influence")
    _settle(page)
    page.locator("h2", has_text="Experts of conv1 for class circle").wait_for(timeout=120_000)
    page.locator('[data-testid="stImage"]').first.wait_for(timeout=120_000)
    _settle(page)
    before = _count(page, "stImage")
    assert before > 0
    rgb = np.zeros((60, 80, 3), np.uint8)
    rgb[15:45, 25:55] = (40, 200, 60)  # any size and shape: converted to the case's 48×48 RGB
    uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
    uploader.set_input_files(files=[{"name": "mine.png", "mimeType": "image/png", "buffer": _png(rgb)}])
    page.get_by_text("answers", exact=False).first.wait_for(timeout=120_000)
    _settle(page)
    assert _count(page, "stException") == 0
    assert _count(page, "stImage") == before + 1  # one more row: the image, its map and its experts
    assert page.get_by_text("your image, as the model sees it").count() >= 1
    _screenshot(page, SHOTS / "user-influence-own-image.png")

    # Something that is not an image: one plain line, the page goes on.
    uploader.set_input_files(files=[{"name": "bad.png", "mimeType": "image/png", "buffer": b"not a png"}])
    page.get_by_text("Could not use this file", exact=False).first.wait_for(timeout=60_000)
    _settle(page)
    assert _count(page, "stException") == 0
    assert page.locator('[data-testid="stAlert"]', has_text="not a readable PNG or JPEG").count() == 1


# ------------------------------------------------------------------------------------ the HTML report


def test_the_html_report_downloads_and_opens_offline(server, page, study, tmp_path):
    """The sidebar's report download (issue 13): a self-contained file that draws every picture
    and table with the network off."""
    page.goto(server)
    _settle(page)
    button = page.locator('[data-testid="stSidebar"] [data-testid="stDownloadButton"]').filter(
        has_text="Download the report (HTML)")
    button.first.wait_for(timeout=120_000)  # the sidebar's last element: a rerun may still draw it
    assert button.count() == 1
    with page.expect_download(timeout=180_000) as info:
        button.get_by_role("button", name="Download the report (HTML)").click()
    download = info.value
    assert download.suggested_filename == f"{study.config.name}-report.html"
    path = tmp_path / download.suggested_filename
    download.save_as(str(path))
    text = path.read_text(encoding="utf-8")
    assert "Could not make the report" not in text, text[:500]
    assert "http://" not in text and "https://" not in text  # nothing to fetch

    # Offline: every http(s) request is aborted, and the flags keep Chromium's own traffic off.
    offline = page.context.browser.new_context(offline=True)
    blocked: list[str] = []

    def abort(route):
        blocked.append(route.request.url)
        route.abort()

    offline.route("http://*/**", abort)
    offline.route("https://*/**", abort)
    try:
        report = offline.new_page()
        report.goto(path.as_uri())
        report.wait_for_load_state("load")
        report.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=30_000)
        widths = report.evaluate("() => [...document.images].map(i => i.naturalWidth)")
        assert widths and all(w > 0 for w in widths), widths
        assert report.locator("table").count() >= 1
        assert blocked == []
    finally:
        offline.close()


# ---------------------------------------------------------------------------------------- accessibility
# WCAG 2.x AA: normal text needs a contrast ratio of at least 4.5:1 against its background. Streamlit
# draws captions (st.caption, image captions, widget help) in a faded, semi-transparent version of the
# theme's textColor; the theme in .streamlit/config.toml must keep them above that line, on the white
# page and on the sidebar's secondary background alike.

AA = 4.5
FADED = ('[data-testid="stCaptionContainer"], [data-testid="stImageCaption"], '
         '[data-testid="stMarkdownContainer"] small, [data-testid="stTooltipContent"]')
_COLOURS_JS = """(sel) => {
  const els = new Set();
  for (const root of document.querySelectorAll(sel)) {
    if (!root.getClientRects().length) continue;
    for (const el of [root, ...root.querySelectorAll('*')]) {
      if ([...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) els.add(el);
    }
  }
  return [...els].filter(el => el.getClientRects().length).map(el => {
    let opacity = 1;
    const backgrounds = [];
    for (let a = el; a; a = a.parentElement) {
      const s = getComputedStyle(a);
      opacity *= parseFloat(s.opacity);
      backgrounds.push(s.backgroundColor);
    }
    return {text: el.textContent.trim().slice(0, 60), color: getComputedStyle(el).color, opacity,
            backgrounds, sidebar: !!el.closest('[data-testid="stSidebar"]')};
  });
}"""


def _rgba(css: str) -> tuple[float, float, float, float]:
    """A computed CSS colour (``rgb()``, ``rgba()`` or ``color(srgb …)``) → (r, g, b, a), 0–255."""
    import re

    nums = [float(n) for n in re.findall(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", css)]
    if css.startswith("color(srgb"):
        r, g, b = (255 * v for v in nums[:3])
        return r, g, b, nums[3] if len(nums) > 3 else 1.0
    if css.startswith("rgb"):
        return nums[0], nums[1], nums[2], nums[3] if len(nums) > 3 else 1.0
    raise AssertionError(f"cannot read the colour {css!r}")


def _over(top, below) -> tuple[float, float, float]:
    a = top[3]
    return tuple(a * t + (1 - a) * b for t, b in zip(top[:3], below[:3], strict=True))


def _luminance(rgb) -> float:
    def lin(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(fg, bg) -> float:
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _ratios(page) -> list[tuple[float, str, str, bool]]:
    """(contrast ratio, text, colour, in the sidebar) of every faded text element drawn now: the text
    colour (its alpha times the ancestors' opacity) composited over the stacked backgrounds of its
    ancestors, down to the first opaque one (the white page when none is)."""
    out = []
    for e in page.evaluate(_COLOURS_JS, FADED):
        bg = (255.0, 255.0, 255.0)
        for css in reversed(e["backgrounds"]):  # from the document down to the element
            layer = _rgba(css)
            bg = layer[:3] if layer[3] >= 1 else _over(layer, bg)
        r, g, b, a = _rgba(e["color"])
        fg = _over((r, g, b, a * e["opacity"]), bg)
        out.append((contrast(fg, bg), e["text"], e["color"], e["sidebar"]))
    return out


def test_captions_reach_wcag_aa_contrast(server, page):
    """Every caption-like text on the case-study, influence and one-image chapters, in the main area
    and in the sidebar (and a widget's help tooltip), reaches 4.5:1 against what it is drawn on."""
    found = []
    for path in ("case-study", "influence", "one-image"):
        page.goto(f"{server}/{path}")
        _settle(page)
        got = _ratios(page)
        assert any(not s for *_, s in got), f"{path}: no caption in the main area"
        assert any(s for *_, s in got), f"{path}: no caption in the sidebar"
        found += [(r, f"{path}: {t!r} ({c})") for r, t, c, _ in got]
    # A widget's help: hover the sidebar's first help icon and read its tooltip.
    icon = page.locator('[data-testid="stSidebar"] [data-testid="stTooltipIcon"]').first
    icon.hover()
    page.locator('[data-testid="stTooltipContent"]').first.wait_for(timeout=10_000)
    page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="stTooltipContent"]')]
        .some(t => getComputedStyle(t).opacity === '1')""", timeout=10_000)  # it fades in
    tips = _ratios(page)
    assert any("Built-in cases" in t or len(t) > 10 for _, t, *_ in tips)
    found += [(r, f"tooltip: {t!r} ({c})") for r, t, c, _ in tips]
    worst = min(found)
    print(f"\nminimum caption contrast: {worst[0]:.2f}:1 ({len(found)} texts; the lowest: {worst[1]})")
    bad = sorted(f for f in found if f[0] < AA)
    assert not bad, f"{len(bad)} texts below {AA}:1, e.g. " + "; ".join(f"{r:.2f} {w}" for r, w in bad[:5])


def test_contrast_arithmetic():
    """The WCAG formula: black on white is 21:1, a colour on itself 1:1, #767676 on white ≈ 4.54."""
    assert abs(contrast((0, 0, 0), (255, 255, 255)) - 21) < 1e-9
    assert abs(contrast((90, 90, 90), (90, 90, 90)) - 1) < 1e-9
    assert abs(contrast((118, 118, 118), (255, 255, 255)) - 4.54) < 0.01
    assert _rgba("rgba(31, 35, 40, 0.6)") == (31, 35, 40, 0.6)
    assert _over((0, 0, 0, 0.5), (255, 255, 255)) == (127.5, 127.5, 127.5)


def test_the_one_image_chapter_draws_and_its_link_reopens_the_image(server, page):
    page.goto(f"{server}/one-image?image=3")
    _settle(page)
    assert _count(page, "stException") == 0
    _assert_shell(page)
    assert page.locator("h2", has_text="Test image 3:").count() == 1
    assert _count(page, "stImage") >= 3
    assert "image=3" in page.url
    _screenshot(page, SHOTS / "one-image.png")
    page.goto(f"{server}/one-image?image=nope")
    _settle(page)
    assert page.locator('[data-testid="stAlert"]', has_text="No test image").count() == 1
    assert _count(page, "stException") == 0
