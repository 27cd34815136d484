"""No two widgets on a page share a label (issue 22: the sidebar's model and a chapter's own model
choice were both labelled "Model"), under AppTest on the small case with
essence and representations built."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import streamlit as st
from streamlit.testing.v1 import AppTest

import ui

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _clear() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()


def _labels(at: AppTest) -> list[str]:
    return [w.label for kind in ("selectbox", "radio", "multiselect", "number_input", "slider")
            for w in at.get(kind)]


def test_widget_labels_are_distinct_on_every_chapter(small_study, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(small_study.cache_dir, cache)  # built in a copy only
    monkeypatch.setenv("CASEBOOK_CACHE", str(cache))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()
    try:
        at = AppTest.from_file(APP, default_timeout=600).run()
        for stage in ("essence", "representations"):  # chapters with a model choice of their own
            at.switch_page(f"chapters/{stage}.py").run()
            if any(b.key == f"build-{stage}" for b in at.button):
                at.button(key=f"build-{stage}").click().run()
            assert not at.exception and at.get("vega_lite_chart"), [e.value for e in at.exception]
        for page in ("chapters/representations.py", "chapters/essence.py", "chapters/influence.py",
                     "chapters/one_image.py", "chapters/case_study.py", "chapters/overview.py"):
            at.switch_page(page).run()
            assert not at.exception, (page, [e.value for e in at.exception])
            twice = [label for label, n in Counter(_labels(at)).items() if n > 1]
            assert not twice, (page, twice)
    finally:
        _clear()
