"""The HTML export carries every chapter's figures, each labelled (issue 22): the accuracy chart,
the overview matrix (rows naming the layers), the experts of every class, the corrections chart,
each with a caption and a legend, the heatmaps' colour scale; every picture has an alt text or a
title, and nothing is fetched from anywhere."""

from __future__ import annotations

import re

import pytest

from core.report import svg
from core.report.html import html_report


@pytest.fixture(scope="module")
def exported(small_study):
    """The small study's export with its corrections built, and its report."""
    small_study.build(stages=["corrections"])
    return html_report(small_study), small_study.report()


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", text, re.S)


def _svg_titled(text: str, start: str) -> str:
    found = [s for s in _svgs(text) if re.search(r"<title>" + re.escape(start), s)]
    assert found, f"no <svg> titled {start!r}"
    return found[0]


def _figure_of(text: str, part: str) -> str:
    found = [f for f in re.findall(r"<figure>.*?</figure>", text, re.S) if part in f]
    assert found, f"no <figure> holding {part!r}"
    return found[0]


def test_experts_of_every_class_with_row_and_column_labels(exported):
    text, rep = exported
    classes = rep["case_facts"]["classes"]
    e = rep["experts"]
    for c in e["classes"]:
        fig = _figure_of(text, f"<h4>Class {classes[c]}</h4>")
        assert "<figcaption>" in fig and "Colour scale of the heatmaps" in fig  # caption, legend
        assert f"expert at {e['layer']}" in fig and "test #" in fig  # row and column heads
        for model in (rep["subject"], rep["reference"]):
            assert re.search(rf"<th scope='row'>{model}: unit \d+ \(rank 1\)</th>", fig)


def test_overview_matrix_names_the_layers_and_has_a_legend(exported):
    text, rep = exported
    matrix = _svg_titled(text, f"Experts carrying the shortcut in {rep['subject']}")
    for layer in rep["experts"]["layers"]:
        assert re.search(rf">{re.escape(layer)}( \(&gt; [\d.]+%\))?</text>", matrix)
    fig = _figure_of(text, f"Experts carrying the shortcut in {rep['subject']}")
    assert "Colour scale of the matrix" in fig and "<figcaption>" in fig
    # every class together, with its Wilson interval, drawn from the report's summary
    s = rep["experts"]["summary"][rep["subject"]][rep["experts"]["layers"][0]]
    assert f">{s['n_shortcut']}/{s['n']} (" in matrix


def test_accuracy_chart_has_every_model_in_its_legend(exported):
    text, rep = exported
    chart = _svg_titled(text, "Accuracy of every model on each set")
    for model in rep["models"]:
        assert f">{model}" in chart
    headline = rep["case_facts"]["headline"].replace("_", " ")
    assert headline in chart and "accuracy" in chart
    n_seeds = max(m.get("n_seeds", 1) for m in rep["models"].values())
    assert ("sd over" in chart) == (n_seeds > 1)  # an interval is drawn when there is one
    assert "<figcaption>" in _figure_of(text, "Accuracy of every model on each set")


def test_corrections_chart_has_every_correction_and_its_legend(exported):
    text, rep = exported
    chart = _svg_titled(text, "Accuracy of every corrected model")
    for row in rep["corrections"]:
        assert f">{row.get('label') or row['method']}</text>" in chart
        if row.get("gap_closed") is not None:
            assert f"gap closed {row['gap_closed']:.2f}" in chart
    assert "under study" in chart and "reference" in chart  # the legend's colours
    assert "stroke-dasharray" in chart  # the reference's accuracy, dashed
    assert "<figcaption>" in _figure_of(text, "Accuracy of every corrected model")


def test_every_picture_is_described_and_nothing_is_fetched(exported):
    text, _ = exported
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<script" not in text and "<link" not in text
    imgs = re.findall(r"<img\b[^>]*>", text)
    assert len(imgs) > 20
    for tag in imgs:
        assert re.search(r'src="data:image/png;base64,', tag)
        assert re.search(r'alt="[^"]*\S[^"]*"', tag), tag
    svgs = _svgs(text)
    assert len(svgs) >= 4
    for s in svgs:
        assert re.match(r"<svg\b[^>]*><title>[^<]*\S[^<]*</title>", s), s[:200]
    for fig in re.findall(r"<figure>.*?</figure>", text, re.S):
        assert re.search(r"<figcaption>[^<]*\S", fig)


def test_svg_helpers_escape_and_draw_intervals():
    chart = svg.interval_bars([{"label": "a<b", "value": 0.5, "low": 0.4, "high": 0.6,
                                "color": "#000000", "note": "n&m"}],
                              title="t", desc="d", x_label="x", interval="± 1 sd")
    assert "a&lt;b" in chart and "n&amp;m" in chart and "40.0%–60.0%" in chart
    assert svg.share_color(0) == "#F4F1EA" and svg.share_color(1) == "#B4412E"
    assert svg.share_color(None) != svg.share_color(0)
