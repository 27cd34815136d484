# ruff: noqa: F811  (the fixtures of test_browser are imported, then named as test arguments)
"""The report's layout at 1400 px in a real browser (issue 22): Debian's chromium through Playwright.

- Every column a chapter's text quotes lies inside its table's visible box, unscrolled: detection's
  AUC and TPR at 25% FPR, the corrections' "Δ vs <reference>", the representations' MPRT and
  sparseness. An ``st.dataframe`` is drawn on a canvas: its columns' boxes are read from the grid's
  own column widths (the React props of its canvas), else the whole table must fit unscrolled.
- The influence chapter is a compact grid: the page stays under :data:`INFLUENCE_MAX_PX` tall.
- The overview's "Open a cell" link tables do not overlap (their boxes are disjoint), and no table
  runs past the page.
- No element takes a positive ``tabindex`` (the tab order is the DOM's, which is the visual order).

On the small prebuilt case (the server and page fixtures of ``test_browser``); the checks that
need a fully built case (faces' five layers overlapped; detection is not in the small build) run
on the repo's ``.cache`` when the frozen tree finds it built, and skip otherwise (nothing is built).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.e2e.test_browser import (  # noqa: F401 — fixtures, reused as they are
    CHROMIUM,
    FLAGS,
    ROOT,
    _freeze,
    _require_browser,
    _serve,
    _settle,
    browser,
    page,
    server,
    study,
    tree,
)

pytestmark = pytest.mark.e2e

WIDTH = 1400
INFLUENCE_MAX_PX = 5000  # decoy-mnist's influence chapter was 13,168 px tall, faces' 19,054

# Every table drawn and visible on the page: its kind, the box it is seen through (the table
# clipped by every ancestor that clips: a scroller, the page) and each column header's box.
TABLES = """() => {
  const seen = el => {
    const r = el.getBoundingClientRect(); let left = r.left, right = r.right;
    for (let a = el.parentElement; a; a = a.parentElement) {
      if (getComputedStyle(a).overflowX !== 'visible') {
        const b = a.getBoundingClientRect(); left = Math.max(left, b.left); right = Math.min(right, b.right);
      }
    }
    return [left, Math.min(right, document.documentElement.clientWidth)];
  };
  const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const out = [];
  document.querySelectorAll('[data-testid="stDataFrame"]').forEach(e => {
    const canvas = e.querySelector('canvas[data-testid="data-grid-canvas"]');
    if (!canvas || !e.checkVisibility()) return;
    const scroller = e.querySelector('.dvn-scroller');
    const [left, right] = seen(scroller);
    const titles = [...e.querySelectorAll('th[role="columnheader"]')].map(t => t.textContent);
    // the grid's column widths: the props of the component that draws the canvas
    const key = Object.keys(canvas).find(k => k.startsWith('__reactFiber'));
    let f = key ? canvas[key] : null, cols = null;
    for (; f; f = f.return) {
      const p = f.memoizedProps;
      if (p && Array.isArray(p.columns) && p.columns.length && typeof p.columns[0].width === 'number') {
        cols = p.columns; break;
      }
    }
    const x0 = scroller.getBoundingClientRect().left - scroller.scrollLeft;
    let x = x0;
    const heads = cols ? cols.map(c => { const h = {title: String(c.title), left: x, right: x + c.width};
                                         x += c.width; return h; })
                       : null;
    out.push({kind: 'dataframe', visible: [left, right], box: box(e), titles,
              heads, fits: scroller.scrollWidth <= scroller.clientWidth + 1});
  });
  document.querySelectorAll('[data-testid="stMarkdownContainer"] table, [data-testid="stTable"] table')
    .forEach(t => {
      if (!t.checkVisibility() || !t.getBoundingClientRect().height) return;
      const heads = [...t.querySelectorAll('thead th')].map(th => {
        const r = th.getBoundingClientRect();
        return {title: th.textContent, left: r.left, right: r.right};
      });
      out.push({kind: t.closest('[data-testid="stTable"]') ? 'table' : 'markdown', visible: seen(t),
                box: box(t), titles: heads.map(h => h.title), heads, fits: true});
    });
  return out;
}"""
HEIGHT = """() => Math.max(...[...document.querySelectorAll(
    '[data-testid="stMain"], [data-testid="stMainBlockContainer"], [data-testid="stAppViewContainer"]')]
    .map(e => e.scrollHeight))"""


def _open(page, url: str) -> None:
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    page.goto(url)
    _settle(page)
    page.wait_for_function(  # every grid drawn (a dataframe mounts after the script's run)
        """() => [...document.querySelectorAll('[data-testid="stDataFrame"]')]
                   .filter(e => e.checkVisibility())
                   .every(e => e.querySelector('canvas[data-testid="data-grid-canvas"]'))""",
        timeout=60_000)
    page.wait_for_timeout(500)


def _tables(page) -> list[dict]:
    return page.evaluate(TABLES)


def _header_visible(table: dict, match) -> tuple[bool, str]:
    """Whether the first column whose header ``match`` accepts lies inside the table's visible box."""
    left, right = table["visible"]
    if table["heads"] is None:  # no column boxes: only a table that needs no scrolling shows it all
        return table["fits"], f"fits={table['fits']}"
    head = next((h for h in table["heads"] if match(h["title"])), None)
    assert head is not None, [h["title"] for h in table["heads"]]
    inside = head["left"] >= left - 1 and head["right"] <= right + 1
    return inside, (f"{head['title']!r} at {head['left']:.0f}–{head['right']:.0f}, "
                    f"visible {left:.0f}–{right:.0f}")


def _table_with(page, match, wait_s: float = 60) -> dict:
    """The first table with a column ``match`` accepts (a chapter can rerun once more after its
    first run, and a grid mounts after the script: waited for up to ``wait_s`` seconds)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        tables = _tables(page)
        found = [t for t in tables
                 if any(match(x) for x in (t["titles"] + [h["title"] for h in t["heads"] or []]))]
        if found or time.monotonic() > deadline:
            break
        page.wait_for_timeout(500)
    assert found, [t["titles"] for t in tables]
    return found[0]


def _assert_quoted_visible(page, url: str, quoted: dict) -> None:
    """``quoted``: name → a test on a column's header; each one lies in its table's visible box."""
    _open(page, url)
    bad = []
    for name, match in quoted.items():
        ok, where = _header_visible(_table_with(page, match), match)
        if not ok:
            bad.append(f"{name}: {where}")
    assert not bad, f"{url}: quoted columns outside their table's visible box at {WIDTH} px: {bad}"


def _disjoint(a: list[float], b: list[float]) -> bool:
    return a[2] <= b[0] + 0.5 or b[2] <= a[0] + 0.5 or a[3] <= b[1] + 0.5 or b[3] <= a[1] + 0.5


def _assert_link_tables_apart(page, url: str) -> None:
    _open(page, url)
    tables = [t for t in _tables(page) if t["kind"] == "markdown" and t["titles"][:1] == ["class"]]
    assert tables, "the overview draws its link tables"
    page_right = page.evaluate("() => document.documentElement.clientWidth")
    for t in tables:
        assert t["box"][2] <= page_right + 1, f"a link table runs past the page: {t['box']}"
        for h in t["heads"]:
            assert h["right"] <= t["visible"][1] + 1, f"{h['title']!r} is cut off: {t}"
    for i, a in enumerate(tables):
        for b in tables[i + 1:]:
            assert _disjoint(a["box"], b["box"]), f"the link tables overlap: {a['box']} and {b['box']}"


def _tpr25(title: str) -> bool:
    return "TPR" in title and "25%" in title and not re.search(r"CI|interval", title)


def _is(word: str):
    return lambda title: title.startswith(word)


# ---------------------------------------------------------------------------------------------- small case


def test_the_columns_the_text_quotes_are_visible_unscrolled(server, page, study):
    reference = study.case_facts().get("reference")
    assert reference, "the small case has a reference model"
    _assert_quoted_visible(page, f"{server}/corrections",
                           {f"Δ vs {reference}": lambda t: t == f"Δ vs {reference}"})
    _assert_quoted_visible(page, f"{server}/representations",
                           {"MPRT": _is("MPRT"), "sparseness": _is("Sparseness")})


def test_the_influence_chapter_is_a_compact_grid(server, page):
    _open(page, f"{server}/influence")
    height = page.evaluate(HEIGHT)
    assert height < INFLUENCE_MAX_PX, f"the influence chapter is {height} px tall at {WIDTH} px"
    # tiles of about 84–128 px, not stretched to a third of the page
    widths = page.locator('[data-testid="stImage"] img').evaluate_all(
        "els => els.filter(e => e.checkVisibility()).map(e => e.getBoundingClientRect().width)")
    assert widths and max(widths) <= 260, widths  # the heat legend is 240 px wide
    tiles = [w for w in widths if abs(w - 240) > 1]
    assert tiles and all(60 <= w <= 130 for w in tiles), tiles


def test_the_overview_link_tables_do_not_overlap(server, page):
    _assert_link_tables_apart(page, f"{server}/overview")


def test_no_positive_tabindex_on_any_chapter(server, page):
    from tests.e2e.test_browser import _nav_pages

    _open(page, server)
    for name, href in _nav_pages(page, server).items():
        _open(page, href)
        positive = page.evaluate(
            "() => [...document.querySelectorAll('[tabindex]')].filter(e => e.tabIndex > 0)"
            ".map(e => e.outerHTML.slice(0, 120))")
        assert not positive, f"{name}: {positive}"


# ---------------------------------------------------------------------------------------------- built cases


def _built(case: str, tree, stages: tuple[str, ...]) -> bool:
    """Whether the repo's .cache holds ``stages`` of ``case`` as the frozen tree keys them (read
    only: nothing is built)."""
    if not (ROOT / ".cache").is_dir():
        return False
    code = ("import json, sys; from core.casestudy import CaseStudy; "
            "print(json.dumps(CaseStudy.open(sys.argv[1], cache_dir=sys.argv[2]).status()))")
    out = subprocess.run([sys.executable, "-c", code, case, str(ROOT / ".cache")], cwd=tree,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return False
    status = json.loads(out.stdout.strip().splitlines()[-1])
    return all(status.get(s) for s in stages)


@pytest.fixture(scope="module")
def built_server(tree, tmp_path_factory):
    """A server on the repo's fully built .cache for a case (read only: background builds off),
    from the frozen tree; skips when the cache does not hold the stages the checks read."""
    _require_browser()
    servers = {}
    stack = []

    def serve(case: str, stages: tuple[str, ...]) -> str:
        if case not in servers:
            if not _built(case, tree, stages):
                pytest.skip(f"{case} is not built in {ROOT / '.cache'} for this code "
                            f"(needs {', '.join(stages)}); nothing is built here")
            log = tmp_path_factory.mktemp(f"streamlit-{case}") / "server.log"
            cm = _serve({"CASEBOOK_CACHE": str(ROOT / ".cache"), "CASEBOOK_CASE": case,
                         "CASEBOOK_BACKGROUND": "0"}, log, cwd=tree)
            servers[case] = cm.__enter__()
            stack.append(cm)
        return servers[case]

    try:
        yield serve
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)


@pytest.fixture
def wide_page(built_server, browser):
    context = browser.new_context(viewport={"width": WIDTH, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(120_000)
    try:
        yield pg
    finally:
        context.close()


ALL = ("data", "models", "experts", "representations", "corrections", "detection")


@pytest.mark.parametrize("case", ["decoy-mnist", "faces"])
def test_built_cases_show_every_quoted_column_unscrolled(built_server, wide_page, case):
    url = built_server(case, ALL)
    _assert_quoted_visible(wide_page, f"{url}/detection", {"AUC": lambda t: t == "AUC", "TPR@25": _tpr25})
    _assert_quoted_visible(wide_page, f"{url}/representations",
                           {"MPRT": _is("MPRT"), "sparseness": _is("Sparseness")})
    _assert_quoted_visible(wide_page, f"{url}/corrections",
                           {"Δ vs reference": lambda t: t == "Δ vs reference" or t == "Δ vs clean"})


@pytest.mark.parametrize("case", ["decoy-mnist", "faces"])
def test_built_cases_influence_chapter_is_short(built_server, wide_page, case):
    url = built_server(case, ("data", "models", "experts"))
    _open(wide_page, f"{url}/influence")
    height = wide_page.evaluate(HEIGHT)
    limit = INFLUENCE_MAX_PX if case == "decoy-mnist" else INFLUENCE_MAX_PX + 500
    assert height < limit, f"{case}: the influence chapter is {height} px tall at {WIDTH} px"


def test_faces_open_a_cell_tables_do_not_overlap(built_server, wide_page):
    url = built_server("faces", ("data", "models", "experts"))
    _assert_link_tables_apart(wide_page, f"{url}/overview")
    # the headline layer's column is visible in every table
    tables = [t for t in _tables(wide_page) if t["kind"] == "markdown" and t["titles"][:1] == ["class"]]
    assert all("onet.dense5" in t["titles"] for t in tables)
