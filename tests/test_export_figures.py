"""The HTML export carries every chapter's figures, each labelled (issue 22): the accuracy chart,
the overview matrix (rows naming the layers), the experts of every class, the corrections chart,
each with a caption and a legend, the heatmaps' colour scale; every picture has an alt text or a
title, and nothing is fetched from anywhere."""

from __future__ import annotations

import re
import shutil

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


def test_the_curves_chart_draws_every_point_the_band_and_the_target():
    chart = svg.curves([1, 2, 4], [{"label": "top k", "values": [0.5, None, 0.9], "color": "#000"}],
                       band={"label": "random", "low": [0.2, 0.3, 0.9], "high": [0.6, 0.7, 0.9],
                             "color": "#ccc"}, target=(0.855, "95% of the whole layer"),
                       title="Essence <of> A vs B", desc="d", x_label="k", y_label="accuracy")
    assert chart.startswith('<svg role="img"') and "<title>Essence &lt;of&gt; A vs B</title>" in chart
    assert chart.count("<circle") == 2  # the missing value leaves a gap, not a point at 0
    assert "<title>top k, k = 4: 90.0%</title>" in chart and "<polygon" in chart
    assert "stroke-dasharray" in chart and "95% of the whole layer: 85.5%" in chart


def test_essence_has_a_curve_per_layer_with_its_legend_and_reading(small_study, tmp_path):
    from core.casestudy import CaseStudy

    cache = tmp_path / "cache"
    shutil.copytree(small_study.cache_dir, cache)  # the shared cache keeps essence unbuilt
    study = CaseStudy.open(small_study.config.name, cache_dir=cache, device="cpu")
    study.build(stages=["essence"])
    text, rep = html_report(study), study.report()
    assert "<h3>Essence</h3>" in text
    curves = rep["essence_summary"]["curves"]
    for layer in dict.fromkeys(c["layer"] for c in curves):
        fig = next(f for f in re.findall(r"<figure>.*?</figure>", text, re.S)
                   if "<title>Essence of " in f and f" at {layer} (" in f)
        assert "top k by comparative influence" in fig and "bottom k" in fig  # the legend
        assert "<figcaption>" in fig and "held-out images of the two classes" in fig
        row = next(r for r in rep["essence"] if r["layer"] == layer and r["model"] == rep["subject"])
        if row.get("degenerate"):
            assert "Cannot tell" in fig  # a degenerate row is named where its curve is drawn
        else:
            assert f"top {row['k_top']}, random {row['k_random']}" in fig
