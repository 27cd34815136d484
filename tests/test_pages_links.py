"""Links the report's pages draw resolve to a page the navigation serves (issue 22: the first
chapter's own path, ``/case-study``, popped "Page not found")."""

from __future__ import annotations

import re
from pathlib import Path

import streamlit as st
from streamlit.testing.v1 import AppTest

import ui

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"


def _served_paths() -> set[str]:
    """Every url_path app.py registers except the default page's (served at the root, ``./``)."""
    src = APP.read_text()
    paths = set(re.findall(r'_page\("[^"]+", "[^"]+", ":material/[a-z_]+:", "([a-z-]+)"', src))
    paths |= set(re.findall(r'"[a-z_]+\.py", "[^"]+", ":material/[a-z_]+:",\s*"([a-z-]+)"\)', src))
    return paths | {"./"}


def test_the_default_chapter_is_linked_at_the_root_and_others_by_path():
    assert ui.page_url(ui.HOME_PAGE) == "./"
    assert ui.page_url("influence") == "influence"


def test_findings_links_resolve(small_study, monkeypatch):
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()
    try:
        at = AppTest.from_file(str(APP), default_timeout=180).run()
        assert not at.exception, [e.value for e in at.exception]
        links = [u for m in at.markdown for u in re.findall(r"\[→ open\]\(([^)]*)\)", m.value)]
        assert links, "the findings box links each finding"
        served = _served_paths()
        for url in links:
            path = url.split("?")[0].split("#")[0]
            assert path != ui.HOME_PAGE, url  # Streamlit answers the default page's path "Page not found"
            assert path in served, (url, served)
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()
        ui._GENERATION.clear()


def test_the_first_chapters_own_path_is_served(small_study, monkeypatch):
    """A browser opening ``/case-study`` asks Streamlit for the page whose url_pathname is
    "case-study" (``PagesManager`` matches ``intended_page_name`` on it); the default page's is ""
    (served at the root), so without the hidden alias that URL popped "Page not found"."""
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()
    try:
        at = AppTest.from_file(str(APP), default_timeout=180).run()
        assert not at.exception, [e.value for e in at.exception]
        pages = at._registered_pages  # hash → {"url_pathname", "script_path", …}: what st.navigation set
        by_path = {info.get("url_pathname"): info for info in pages.values()}
        assert Path(by_path[""]["script_path"]).name == "case_study.py"  # the root
        assert Path(by_path[ui.HOME_PAGE]["script_path"]).name == "case_study.py"
        nav = [a.label for a in at.sidebar.get("page_link")] if at.sidebar.get("page_link") else []
        assert nav.count("The shortcut") <= 1  # the alias is hidden from the navigation
        # switching to the chapter's file still opens the root page (registered first)
        at.switch_page("chapters/case_study.py").run()
        assert not at.exception and at.title[0].value
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()
        ui._GENERATION.clear()
