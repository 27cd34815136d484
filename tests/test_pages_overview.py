"""The overview chapter ("Where the shortcut lives", issue 13) under Streamlit's AppTest: the matrix
class × layer × model on the small DecoyMNIST case, each cell a deep link to the influence chapter;
a case without a region shows only the counts; a case whose experts are not built says so."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import ui

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "chapters" / "overview.py")
TIMEOUT = 120
LINK = re.compile(r"\[([^\]]+)\]\((influence\?[^)]+)\)")


def _clear() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()


def _run(**params) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    for key, value in params.items():
        at.query_params[key] = str(value)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _links(at: AppTest) -> list[tuple[str, dict]]:
    out = []
    for m in at.markdown:
        for label, url in LINK.findall(m.value):
            parsed = urlparse(url)
            assert parsed.path == "influence"
            out.append((label, {k: v[0] for k, v in parse_qs(parsed.query).items()}))
    return out


def _texts(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption]
                     + [i.value for i in at.info])


@pytest.fixture
def small(small_study, casebook_cache, monkeypatch):
    monkeypatch.setenv("CASEBOOK_CACHE", str(casebook_cache))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()
    yield small_study
    _clear()


def test_the_matrix_is_drawn_and_each_cell_opens_the_influence_chapter(small):
    rep = small.report()
    e = rep["experts"]
    at = _run(case=small.config.name)
    assert at.title[0].value == "Where the shortcut lives"
    charts = at.get("vega_lite_chart")
    assert charts, "the heatmap is drawn"
    links = _links(at)
    models = {rep["subject"], rep["reference"]}
    # one link per model × class × layer, each naming the case and the cell's model, class and layer
    want = {(m, str(c), layer) for m in models for c in e["classes"] for layer in e["layers"]}
    got = {(q["model"], q["cls"], q["layer"]) for _, q in links}
    assert got == want
    assert {q["case"] for _, q in links} == {small.config.name}
    # each cell's n/k agrees with the report's rows for that cell
    for label, q in links:
        rows = [r for r in e["top"] if r["model"] == q["model"] and str(r["class"]) == q["cls"]
                and r["layer"] == q["layer"]]
        n = sum(bool(r["shortcut"]) for r in rows)
        assert label.startswith(f"{n}/{len(rows)}"), (label, q)
    # the layer thresholds and the rule are shown beside the matrix
    text = _texts(at)
    assert "The rule:" in text and "decoy patch" in text
    th = at.dataframe[0].value
    assert list(th["layer"]) == e["layers"]
    assert th["threshold"].tolist() == pytest.approx([e["shortcut_thresholds"][x] for x in e["layers"]])
    # the headline per layer: how many experts of each model carry the shortcut
    for layer in e["layers"]:
        s = e["summary"][rep["subject"]][layer]
        assert f"**{rep['subject']}** {s['n_shortcut']} of {s['n']}" in text


@pytest.fixture
def with_control(small_study, casebook_cache, tmp_path, monkeypatch):
    """The small case again, naming its reference as the control model (its flags: false alarms);
    data and models come from the session's cache, only the experts are ranked again."""
    from core.casestudy import CaseStudy

    text = small_study.config.path.read_text()
    assert "\nshortcut_quantile = 0.95\n" in text
    text = text.replace("\nshortcut_quantile = 0.95\n", '\nshortcut_quantile = 0.95\ncontrol = "clean"\n')
    (tmp_path / "small-control.toml").write_text(text)
    monkeypatch.setenv("CASEBOOK_CASES", str(tmp_path))
    monkeypatch.setenv("CASEBOOK_CACHE", str(casebook_cache))
    monkeypatch.setenv("CASEBOOK_CASE", "small-control")
    study = CaseStudy.open("small-control", cache_dir=casebook_cache, device="cpu")
    study.build(["data", "models", "experts"])
    _clear()
    yield study
    _clear()


def test_the_control_models_false_alarm_rate_is_beside_the_thresholds(with_control):
    alarms = with_control.report()["experts"]["false_alarms"]
    at = _run(case="small-control")
    th = at.dataframe[0].value
    assert th["false alarms"].tolist() == pytest.approx([alarms[x]["rate"] for x in th["layer"]])
    assert th["flagged"].tolist() == [f"{alarms[x]['n_flagged']}/{alarms[x]['n']}" for x in th["layer"]]
    text = _texts(at)
    assert "False alarms" in text and "clean (reference, control)" in [h.value for h in at.subheader]
    # the control model is the reference here: one matrix for it, not two
    assert {q["model"] for _, q in _links(at)} == {"vanilla", "clean"}
    assert len(at.subheader) == 2


def test_without_the_experts_stage_the_page_says_so(small, tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBOOK_CACHE", str(tmp_path))  # an empty cache: nothing built
    _clear()
    at = _run(case=small.config.name)
    assert any("not built" in i.value for i in at.info)
    assert not at.get("vega_lite_chart") and not _links(at)


@pytest.fixture
def no_region_case(tmp_path, monkeypatch):
    """The example user case (core.cases.newcase) with its [region] and reference removed, tiny settings."""
    from core.cases.newcase import write_example

    cases = tmp_path / "cases"
    folder = cases / "bare-shapes"
    write_example(folder)
    subprocess.run([sys.executable, "make_images.py"], cwd=folder, check=True, capture_output=True,
                   timeout=120)
    text = (folder / "case.toml").read_text()
    head, rest = text.split("[region]", 1)
    rest = rest.split("[models.vanilla]", 1)[1].split("[models.reference]", 1)[0]
    text = (head + "[models.vanilla]" + rest
            + "[training]\nepochs = 1\nbatch_size = 32\n\n"
              "[experts]\nk = 2\nbootstrap = 4\nn_images = 2\nresolution = 4\n")
    (folder / "case.toml").write_text(text)
    monkeypatch.setenv("CASEBOOK_CASES", str(cases))
    monkeypatch.setenv("CASEBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CASEBOOK_CASE", "bare-shapes")
    from core.casestudy import CaseStudy

    study = CaseStudy.open("bare-shapes", cache_dir=tmp_path / "cache", device="cpu")
    study.build(["data", "models", "experts"])
    _clear()
    yield study
    _clear()


def test_a_case_without_region_shows_only_the_counts(no_region_case):
    rep = no_region_case.report()
    assert rep["case_facts"]["region"] is None
    e = rep["experts"]
    at = _run(case="bare-shapes")
    assert not at.get("vega_lite_chart")
    assert "no shortcut verdicts" in _texts(at)
    links = _links(at)
    assert {(q["model"], q["cls"], q["layer"]) for _, q in links} == {
        ("vanilla", str(c), layer) for c in e["classes"] for layer in e["layers"]}
    assert all(label == f"{e['k']} experts" for label, _ in links)
    assert not any("/" in label for label, _ in links)


def test_a_cells_link_reopens_the_influence_chapter_on_that_cell(small):
    at = _run(case=small.config.name)
    label, q = next((lab, q) for lab, q in _links(at) if q["model"] != small.subject and q["cls"] != "0")
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    for key, value in q.items():
        app.query_params[key] = value
    app.run()
    app.switch_page("chapters/influence.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.sidebar.selectbox(key="qp-model").value == q["model"]
    assert str(app.selectbox(key="qp-cls").value) == q["cls"]
    assert app.selectbox(key="qp-layer").value == q["layer"]
    assert app.header[0].value.startswith(f"Experts of {q['layer']} for class")
