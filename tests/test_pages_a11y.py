"""Accessibility of the report's pages (issue 22): every image has a descriptive alt text, on the
small prebuilt case under AppTest."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import ui

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TIMEOUT = 180
# The chapters that draw images from the data, models and experts stages (what the small case has).
DRAWING = ["chapters/case_study.py", "chapters/influence.py", "chapters/one_image.py"]


def _clear() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()


@pytest.fixture
def run(small_study, monkeypatch):
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()

    def make(page: str) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.run()
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield make
    _clear()


@pytest.mark.parametrize("page", DRAWING)
def test_every_image_has_a_descriptive_alt(run, page):
    at = run(page)
    imgs = [img for element in at.image for img in element.proto.imgs]
    assert imgs, "the chapter draws images"
    alts = [img.alt if img.HasField("alt") else None for img in imgs]
    assert all(a and a.strip() and a != "image" for a in alts), alts
    assert not any("**" in a or "`" in a for a in alts), alts  # words, not Markdown


def test_alt_text_joins_its_parts_as_plain_words():
    assert ui.alt_text("vanilla, conv1", "unit **3** on test image 2") == \
        "vanilla, conv1: unit 3 on test image 2"
    assert ui.alt_text(None, "") == "image"
    assert ui.alt_text("`conv1`", "a\u2060:b") == "conv1: a\u2060:b"  # joiners keep names inert


CHARTING = ["chapters/case_study.py", "chapters/influence.py"]


@pytest.mark.parametrize("page", CHARTING)
def test_every_chart_has_a_title_a_table_and_readable_text(run, page):
    import json

    at = run(page)
    charts = at.get("vega_lite_chart")
    assert charts, "the chapter draws charts"
    tables = [e.label for e in at.expander if e.label.startswith("Table: ")]
    for c in charts:
        spec = json.loads(c.proto.spec)
        assert spec.get("description"), "an accessible title (Vega's ARIA label)"
        assert f"Table: {spec['description']}" in tables, (spec["description"], tables)
        config = spec.get("config") or {}
        for part, keys in (("axis", ("labelColor", "titleColor")), ("legend", ("labelColor", "titleColor"))):
            for key in keys:
                colour = (config.get(part) or {}).get(key)
                assert colour and ui.contrast(colour) >= 4.5, (part, key, colour)
    for e in at.expander:
        if e.label.startswith("Table: "):
            assert e.get("table"), e.label  # the table alternative holds the chart's data


def test_contrast_is_the_wcag_ratio():
    assert ui.contrast("#000000") == pytest.approx(21.0)
    assert ui.contrast("#FFFFFF") == pytest.approx(1.0)
    assert ui.contrast("#767676") == pytest.approx(4.54, abs=0.01)  # the AA grey on white

