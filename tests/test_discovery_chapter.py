"""The Suspects chapter (chapters/suspects.py, issue 20 §6) on stand-in payloads: the common
opening, the verdict with its rule and thresholds, the three controls' bars, alt text on every
image, the grid grouped by prediction, a deep link and the TOML lines per candidate; a candidate
that only lacked images reads "too few images to decide" (with "quick build:" on a quick build),
never a bare "not suspected"; bad input (one class, a constant model, a class with too few test
images) gets its own line, never the clean bill "no suspected shortcut"."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.stages.discovery import _headline

PAGE = str(Path(__file__).resolve().parents[1] / "chapters" / "suspects.py")
TITLE = "Suspects: shortcuts no one marked"
RULE = "suspected when necessity and sufficiency exceed their same-shape random-place control"
THRESHOLDS = {"alpha": 0.05, "min_effect": 0.15, "min_sufficiency": 0.1, "max_share": 0.25,
              "max_components": 3, "min_consistency": 0.75, "min_tested": 8}


def _candidate(rank: int, **kw) -> dict:
    row = {"kind": "candidate", "model": "vanilla", "rank": rank, "masks": str(rank),
           "class": "cat", "class_index": 0, "group": "pooled: cluster 1 of 4 + cluster 2 of 4",
           "mode": "pooled", "layer": "conv2", "units": [1, 2], "n_images": 40, "n_fit": 30,
           "share_of_image": 0.02, "components": 1, "consistency": 0.95,
           "necessity": 0.6, "necessity_ci": [0.45, 0.73], "necessity_n": 40, "necessity_p": 1e-6,
           "control_necessity": 0.05, "control_necessity_ci": [0.01, 0.16],
           "sufficiency": 0.4, "sufficiency_ci": [0.3, 0.5], "sufficiency_n": 60,
           "sufficiency_p": 1e-5, "control_sufficiency": 0.02, "control_sufficiency_ci": [0, 0.1],
           "control_same_place": 0.03, "control_same_place_ci": [0.01, 0.11],
           "same_place_p": 1e-5, "p_value": 1e-5, "verdict": "suspected",
           "reason": "both effects beat the control, the region is compact and its content recurs",
           "reason_kind": "suspected", "rule": RULE, "thresholds": THRESHOLDS,
           "alpha_corrected": 0.005}
    row.update(kw)
    return row


def _gallery(preds: list[int]) -> dict:
    n = len(preds)
    mask = torch.zeros(n, 8, 8, dtype=torch.bool)
    mask[:, :2, :2] = True
    return {"split": ["test"] * n, "index": list(range(n)), "label": [0] * n, "pred": preds,
            "image": torch.full((n, 8, 8), 120, dtype=torch.uint8), "mask": mask}


def _payload(rows: list[dict], n_tested: int | None = None) -> dict:
    cands = [r for r in rows if r.get("kind") == "candidate"]
    sus = [r for r in cands if r["verdict"] == "suspected"]
    undecided = [r for r in cands if r.get("reason_kind") == "power"]
    notes = [r for r in rows if r.get("kind") == "note"]
    tested = len(cands) if n_tested is None else n_tested
    summary = {"vanilla": {"n_candidates": len(cands), "n_suspected": len(sus),
                           "n_undecided": len(undecided), "n_tested": tested,
                           "headline": _headline(sus, undecided, tested, notes)}}
    return {"rows": rows, "gallery": {f"vanilla/{r['rank']}": _gallery([0, 0, 1])
                                      for r in cands},
            "report": {"rule": RULE, "layer": "conv2", "subject": "vanilla", "models": summary,
                       "false_alarms": {"models": [], "n_flagged": 0}}}


class _Study:
    def __init__(self, payload: dict, preset: str = "full", classes=("cat", "dog")):
        self.payload, self.classes = payload, list(classes)
        self.config = SimpleNamespace(name="stub-case", title="stub", experts={})
        self.budget = {"preset": preset, "applied": {"discovery": {"max_heldout": 64}}
                       if preset == "quick" else {}}
        self._casebook_key = ("stub-case-" + preset + str(id(payload)), None, "cpu")

    def status(self):
        return {"data": True, "models": True, "discovery": True}

    def artifact(self, stage):
        return self.payload if stage == "discovery" else None

    def report(self):
        return {"models": {"vanilla": {}}, "subject": "vanilla"}

    def case_facts(self):
        return {"classes": self.classes, "size": [8, 8], "models": ["vanilla"],
                "subject": "vanilla", "channels": 1}


def _open(monkeypatch, payload: dict, preset: str = "full", classes=("cat", "dog")) -> AppTest:
    import streamlit as st

    import ui

    study = _Study(payload, preset, classes)
    monkeypatch.setattr(ui, "current_study", lambda: study)
    monkeypatch.setenv("CASEBOOK_CASE", "stub-case")
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _text(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "header", "success", "info", "warning")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def test_the_chapter_draws_every_item_of_its_section(monkeypatch):
    undecided = _candidate(2, group="cluster 3 of 4", mode="fixed", n_images=13,
                           necessity_p=0.0078, verdict="not suspected", reason_kind="power",
                           control_same_place=None, control_same_place_ci=[None, None],
                           same_place_p=None,
                           reason="too few images to decide: necessity beats its control by "
                                  "0.54 but p = 0.0078 ≥ 0.0014 on 13 images")
    at = _open(monkeypatch, _payload([_candidate(1), undecided]))
    assert at.title[0].value == TITLE
    text = _text(at)
    # the verdict with its rule and thresholds beside it, per candidate
    assert "#1 · class cat: suspected" in [h.value for h in at.header]
    assert "#2 · class cat: too few images to decide" in [h.value for h in at.header]
    assert "quick build" not in text
    assert text.count("The rule beside it:") == 2 and "min consistency = 0.75" in text
    assert "Verdict: suspected." in text
    # the bars: region, random-place control and, for the pooled region, the specificity control
    charts = at.get("vega_lite_chart")
    assert len(charts) == 2
    tables = [t.value for t in at.table]
    whos = [set(t["who"]) for t in tables if "who" in t]
    assert {"region", "random place", "same place, other image"} in whos
    assert {"region", "random place"} in whos
    # alt text on every image; the grid grouped by the model's prediction
    assert len(at.image) == 2
    alts = [i.alt for img in at.image for i in img.proto.imgs]
    assert len(alts) == 2 and all(alts), alts
    assert all("grouped by the model's prediction" in a for a in alts)
    assert all("rows: predicted cat (2), predicted dog (1)" in a for a in alts), alts
    # a deep link and the TOML lines per candidate
    links = [m.value for m in at.markdown if "Link to this candidate" in m.value]
    assert len(links) == 2 and "suspect=2" in links[1] and "smodel=vanilla" in links[0]
    toml = [c.value for c in at.code if c.value.startswith("[region]")]
    assert len(toml) == 2 and 'masks = "suspects/1"' in toml[0]
    # the table says "too few images to decide", not a bare "not suspected"
    table = at.dataframe[0].value
    assert list(table["verdict"]) == ["suspected", "too few images to decide"]
    assert "specificity control" in table.columns


def test_a_quick_build_says_so_for_undecided_candidates(monkeypatch):
    row = _candidate(1, verdict="not suspected", reason_kind="power",
                     reason="too few images to decide: necessity beats its control by 0.54 but "
                            "p = 0.0078 ≥ 0.0014 on 13 images")
    at = _open(monkeypatch, _payload([row]), preset="quick")
    assert "#1 · class cat: quick build: too few images to decide" in [h.value for h in at.header]
    heads = [w.value for w in at.warning]
    # the headline is a warning (no clean bill) that counts the undecided candidate
    assert any("no suspected shortcut; 1 candidate with too few images to decide" in
               w.replace("\\", "") for w in heads), heads
    assert not at.success and not [i for i in at.info if "no suspected shortcut" in i.value]
    assert list(at.dataframe[0].value["verdict"]) == ["quick build: too few images to decide"]


@pytest.mark.parametrize("reason", [
    "the case has one class: there is no other class to test a shortcut against",
    "the model predicts one class for every test image (40 images): a constant model has no "
    "shortcut to test",
])
def test_bad_input_is_a_clear_line_not_a_clean_bill(monkeypatch, reason):
    note = {"kind": "note", "model": "vanilla", "class": None, "class_index": None,
            "verdict": "not suspected", "reason": reason}
    at = _open(monkeypatch, _payload([note], n_tested=0))
    warnings = [w.value.replace("\\", "") for w in at.warning]  # Markdown escapes removed
    assert any(w.startswith("**vanilla (under study)**: nothing could be tested: " + reason[:30])
               for w in warnings), warnings
    assert any(w.startswith("Not tested (model): " + reason[:30]) for w in warnings)
    assert "no suspected shortcut" not in _text(at)
    assert not at.header and not at.dataframe


def test_a_class_with_too_few_test_images_is_named(monkeypatch):
    note = {"kind": "note", "model": "vanilla", "class": "dog", "class_index": 1,
            "verdict": "not suspected", "n_images": 4,
            "reason": "too few images to test: the model predicts 'dog' for 4 test images "
                      "(need 10)"}
    at = _open(monkeypatch, _payload([_candidate(1), note]))
    warnings = [w.value.replace("\\", "") for w in at.warning]
    assert any(w.startswith("Not tested (class dog): too few images to test") for w in warnings), \
        warnings


def test_headline_never_a_clean_bill_without_evidence():
    assert _headline([], [], 0, [{"reason": "the case has one class"}]) == \
        "nothing could be tested: the case has one class"
    assert _headline([], [{"rank": 1}], 3, []) == \
        "no suspected shortcut; 1 candidate with too few images to decide"
    assert _headline([], [], 3, []) == "no suspected shortcut"


def test_a_row_names_its_class_even_when_names_are_digits(monkeypatch):
    """Rows carry the class's *name*: a case whose names are digits in another order (class
    "1" is index 0) shows "1", never the name at index 1."""
    at = _open(monkeypatch, _payload([_candidate(1, **{"class": "1"})]), classes=("1", "0"))
    assert "#1 · class 1: suspected" in [h.value for h in at.header]
    assert list(at.dataframe[0].value["class"]) == ["1"]
