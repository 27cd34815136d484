"""The chapter "One image, end to end" (issue 13) under Streamlit's AppTest on the small DecoyMNIST
case: it draws the chosen test image, the prediction and every expert layer; a bad ``?image=`` gives
one error line (not an exception) and the default image; the deep link reopens the chosen image."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import ui

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "chapters/one_image.py"
TIMEOUT = 180


def _clear() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()


@pytest.fixture
def app(small_study, casebook_cache, monkeypatch):
    monkeypatch.setenv("CASEBOOK_CACHE", str(casebook_cache))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()

    def make(**params) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        for key, value in params.items():
            at.query_params[key] = str(value)
        at.run()
        at.switch_page(PAGE).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield make
    _clear()


@pytest.fixture(scope="module")
def wrong(small_study):
    from core.queries.explain import predict_split

    return predict_split(small_study, small_study.subject)


def _param(at: AppTest, key: str = "image") -> str:
    value = at.query_params[key]
    return str(value[0] if isinstance(value, list) else value)


def _headers(at: AppTest) -> list[str]:
    return [h.value for h in at.header]


def test_the_page_follows_the_first_wrong_image_through_every_layer(app, small_study, wrong):
    at = app()
    default = (wrong["wrong"][0] if wrong["wrong"] else 0) + 1  # images are numbered from 1
    assert at.number_input(key="one-image-index").value == default
    assert _param(at) == str(default)
    assert any(h.startswith(f"Test image {default}:") for h in _headers(at))
    subs = [s.value for s in at.subheader]
    assert subs[:len(small_study.config.experts["layers"])] == list(small_study.config.experts["layers"])
    assert not at.error
    assert len(at.dataframe) >= 1


def test_a_bad_image_param_is_one_error_line_and_the_default_image(app, wrong):
    default = (wrong["wrong"][0] if wrong["wrong"] else 0) + 1
    for bad in ("99999", "0", "-3", "abc", "1.5"):
        at = app(image=bad)
        assert len(at.error) == 1, bad
        assert "No test image" in at.error[0].value and "\n" not in at.error[0].value
        assert at.number_input(key="one-image-index").value == default


def test_the_deep_link_reopens_the_chosen_image_and_next_wrong_moves_on(app, wrong):
    at = app(image=7)
    assert at.number_input(key="one-image-index").value == 7
    assert any(h.startswith("Test image 7:") for h in _headers(at))
    assert not at.error
    later = [i + 1 for i in wrong["wrong"] if i + 1 > 7] or [i + 1 for i in wrong["wrong"]]
    buttons = [b for b in at.button if b.label == "Next wrong image"]
    assert len(buttons) == 1
    if later:
        buttons[0].click().run()
        assert not at.exception
        assert at.number_input(key="one-image-index").value == later[0]
        assert any(h.startswith(f"Test image {later[0]}:") for h in _headers(at))
        assert _param(at) == str(later[0])


def test_images_are_numbered_from_one_as_in_every_chapter(app, small_study, wrong):
    # issue 22: the one-image chapter counted from 0 where the others count from 1
    n = len(wrong["label"])
    at = app(image=n)  # the last image
    assert not at.error, [e.value for e in at.error]
    assert at.number_input(key="one-image-index").value == n
    last = ui.class_name(int(wrong["label"][n - 1]), small_study.case_facts())
    assert any(h == f"Test image {n}: labelled {last}" for h in _headers(at)), _headers(at)


def test_the_probability_table_shows_every_class_without_scrolling(app, small_study, monkeypatch):
    # issue 22: a fixed 220 px box showed five of the classes and scrolled the rest
    import streamlit as st

    calls = []
    original = st.dataframe

    def recording(data=None, *args, **kwargs):
        calls.append((data, kwargs))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(st, "dataframe", recording)
    app()
    n = len(small_study.case_facts()["classes"])
    probs = [kw for data, kw in calls if hasattr(data, "columns") and "class" in data.columns]
    assert probs and all(len(data) == n for data, _ in calls if hasattr(data, "columns")
                         and "class" in data.columns)
    for kw in probs:
        height = kw.get("height", "auto")
        assert height == "content" or (isinstance(height, int) and height >= 35 * (n + 1)), height


def test_a_colour_case_and_a_case_without_region_or_reference_draw(tmp_path_factory, casebook_cache,
                                                                     monkeypatch):
    """The user cases of tests/test_pages.py: ``shapes`` (RGB, a region, a reference) and ``plain``
    (no region, one model): the page draws for both, region mass only where there is a region."""
    from core.casestudy import CaseStudy
    from tests.test_pages import write_user_cases

    root = tmp_path_factory.mktemp("one-image-user-cases")
    write_user_cases(root)
    monkeypatch.setenv("CASEBOOK_CASES", str(root))
    monkeypatch.setenv("CASEBOOK_CACHE", str(casebook_cache))
    for case in ("shapes", "plain"):
        CaseStudy.open(case, cache_dir=casebook_cache, device="cpu", allow_path=False).build(
            stages=["data", "models", "experts"])
        monkeypatch.setenv("CASEBOOK_CASE", case)
        _clear()
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.run()
        at.switch_page(PAGE).run()
        assert not at.exception, (case, [e.value for e in at.exception])
        assert not at.error, case
        assert len(at.subheader) >= 1
        captions = "\n".join(c.value for c in at.caption)
        assert ("mass" in captions) == (case == "shapes"), case
    _clear()
