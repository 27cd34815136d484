"""The pages say "cannot tell" where a test cannot discriminate (issues 18 and 22), under AppTest on
the small prebuilt case with the stage's payload stood in (the flags are core's: the essence rows'
``degenerate`` and ``core.report.degenerate.annotate_corrections``; the pages only draw them)."""

from __future__ import annotations

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import ui
from core.report.degenerate import annotate_corrections
from tests.test_pages import APP, TIMEOUT, _cache_dir, _clear, _texts

WHY = "k = 1 for every rule; the whole layer's binary accuracy 52% on 40 images is near chance (50%)"


def _essence_payload(degenerate: str | None) -> dict:
    ks = [1, 2, 4, 8]
    rows, curves = [], []
    for fill in ("mean", "zero"):
        rows.append({"model": "vanilla", "layer": "conv1", "a": 4, "b": 9, "a_name": "4",
                     "b_name": "9", "pair_source": "case", "fill": fill, "width": 8,
                     "full_acc": 0.52 if degenerate else 0.97, "share": 0.95, "k_top": 1,
                     "k_random": 1 if degenerate else 4, "k_bottom": 1 if degenerate else 8,
                     "k_random_high": 1, "top1_acc": 0.52, "random1_acc": 0.5, "n_eval": 40,
                     "seed": 0, "eval_set": "decoy_test", "degenerate": degenerate})
        curves.append({"model": "vanilla", "layer": "conv1", "fill": fill, "a": 4, "b": 9,
                       "a_name": "4", "b_name": "9", "ks": ks, "top": [0.52] * 4,
                       "random": {"median": [0.5] * 4, "low": [0.45] * 4, "high": [0.55] * 4},
                       "bottom": [0.5] * 4, "full": 0.52, "n_eval": 40, "width": 8,
                       "random_draws": 4, "confidence": 0.9, "eval_set": "decoy_test"})
    return {"rows": rows, "curves": curves, "ablation": [], "summary": [], "region": [],
            "config": {"share": 0.95, "confidence": 0.9}}


def _corrections_payload(flat: bool) -> dict:
    def row(method, label, acc):
        return {"method": method, "label": label, "model": f"vanilla+{method}",
                "decoy_test_acc": acc, "clean_test_acc": 0.5, "gap_closed": 0.02,
                "uses": "pixel mask", "mask_note": "uses the masks", "strength": 0.01,
                "strength_name": "λ", "val_acc": 0.55, "seconds": 1.0, "region_mass": 0.1}
    grid = [{"value": v, "val_acc": 0.55 if flat else 0.5 + v / 4} for v in (0.01, 0.1, 1.0)]
    return {"rows": [row("rrr", "RRR", 0.60)],
            "reference": {"vanilla": {"decoy_test_acc": 0.59, "clean_test_acc": 0.5,
                                      "val_acc": 0.55, "region_mass": 0.3},
                          "clean": {"decoy_test_acc": 0.95, "clean_test_acc": 0.95,
                                    "val_acc": 0.95, "region_mass": 0.02}},
            "records": {"rrr": {"grid": grid}}, "n_seeds": 1, "config": {}}


@pytest.fixture
def stand_in(small_study, monkeypatch):
    """An AppTest factory on the small case whose ``stage`` payload is ``payload`` (the gate open)."""
    monkeypatch.setenv("CASEBOOK_CACHE", _cache_dir(small_study))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()
    real_artifact, real_report = ui.artifact, ui.report

    def make(page: str, stage: str, payload: dict) -> AppTest:
        monkeypatch.setattr("ui.opening.require", lambda *a, **k: True)
        monkeypatch.setattr(ui, "artifact", lambda s, study=None, drop=("models",):
                            payload if s == stage else real_artifact(s, study, drop))

        def report(study=None):
            rep = dict(real_report(study))
            if stage == "corrections":
                rep["corrections"] = payload["rows"]
                rep = annotate_corrections(rep, payload)
            return rep

        monkeypatch.setattr(ui, "report", report)
        monkeypatch.setattr(ui, "has_experts_for", lambda *a, **k: False)
        at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield make
    _clear()
    st.cache_data.clear()


def test_a_degenerate_essence_reads_cannot_tell(stand_in):
    at = stand_in("chapters/essence.py", "essence", _essence_payload(WHY))
    said = " ".join(i.value for i in at.info) + " ".join(w.value for w in at.warning) + _texts(at)
    assert "Cannot tell" in said or "cannot tell (degenerate: k = 1 for every rule" in said
    assert "cannot tell (degenerate: k = 1 for every rule" in " ".join(i.value for i in at.info)
    assert "not concentrated" not in said and "do **not** beat random" not in said
    table = at.dataframe[0].value
    assert all(v.startswith("cannot tell (degenerate: k = 1 for every rule") for v in table["reading"])


def test_an_essence_that_discriminates_is_read_as_before(stand_in):
    at = stand_in("chapters/essence.py", "essence", _essence_payload(None))
    said = " ".join(i.value for i in at.info) + _texts(at)
    assert "cannot tell" not in said
    assert "For **1 of 1** pairs, fewer top experts than random units reach" in said
    assert list(at.dataframe[0].value["reading"]) == ["top < random"]


def test_a_flat_validation_grid_reads_cannot_tell_not_did_not_help(stand_in):
    at = stand_in("chapters/corrections.py", "corrections", _corrections_payload(flat=True))
    said = _texts(at)
    assert "**RRR**: whether it helps — **cannot tell (flat validation grid" in said
    assert "3 strengths all at 55% on" in said
    assert "did not help" not in said and "helped little" not in said
    assert "cannot tell (flat validation grid)" in at.dataframe[0].value["tuned on validation"][0]


def test_a_grid_that_chose_still_says_did_not_help(stand_in):
    at = stand_in("chapters/corrections.py", "corrections", _corrections_payload(flat=False))
    said = _texts(at)
    assert "**RRR** did not help" in said and "cannot tell" not in said


def test_the_not_computed_offer_goes_once_the_experts_are_computed(small_study, monkeypatch, tmp_path):
    """Issue 22's stale box: after Compute, the same run drew the experts under the "not computed
    yet" offer and its button."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(_cache_dir(small_study), cache)  # the shared cache keeps the view uncomputed
    monkeypatch.setenv("CASEBOOK_CACHE", str(cache))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()
    try:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
        at.switch_page("chapters/influence.py").run()
        at.radio(key="qp-quantity").set_value("comparative").run()
        at.selectbox(key="qp-vs").select(7).run()
        assert not at.exception, [e.value for e in at.exception]
        assert any("not computed yet" in i.value for i in at.info)
        at.button(key="compute-experts").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.dataframe, "the computed experts are drawn"
        assert not any("not computed yet" in i.value for i in at.info)
        assert "compute-experts" not in [b.key for b in at.button]
    finally:
        _clear()


def test_essence_drops_are_in_percentage_points_throughout(stand_in):
    """Issue 22: the ablation table showed the experts' drop as "6%" beside the random drop as
    "−2.0 pp"; both are differences of accuracies, in pp."""
    payload = _essence_payload(None)
    payload["ablation"] = [{"model": "vanilla", "layer": "conv1", "fill": fill, "class": 4,
                            "class_name": "4", "k": 2, "units": [1, 2],
                            "experts": {"acc_drop": 0.06, "logit_drop": 1.5},
                            "random": {"acc_drop": {"median": -0.02, "low": -0.05, "high": 0.01},
                                       "logit_drop": {"median": 0.1, "low": 0.0, "high": 0.2}},
                            "other_class": 9, "other": {"acc_drop": 0.01}, "beats_random": True}
                           for fill in ("mean", "zero")]
    at = stand_in("chapters/essence.py", "essence", payload)
    table = at.dataframe[1].value
    assert table["accuracy drop (experts)"].tolist() == pytest.approx([6.0])
    assert table["accuracy drop (other's experts)"].tolist() == pytest.approx([1.0])
    assert table["accuracy drop (random k)"].tolist() == ["-2.0 pp [-5.0 pp, +1.0 pp]"]


def test_threshold_term_says_which_term_won_in_percent():
    e = {"shortcut_thresholds": {"conv1": 0.408, "fc1": 0.102}, "shortcut_threshold": 0.102,
         "shortcut_factor": 5, "shortcut_quantile": 0.95, "chance": 0.0204}
    q = ui.threshold_term(e, "conv1")
    assert q["term"] == "quantile" and q["text"] == (
        "conv1: 40.8%, set by the reference's 95% quantile (above the floor 5 × chance (2.0%) = 10.2%)")
    f = ui.threshold_term(e, "fc1")
    assert f["term"] == "floor" and "quantile is lower" in f["text"] and "0.1" not in f["text"]
    assert ui.threshold_term(e, "conv2") is None and ui.threshold_term({}, "conv1") is None


def test_the_overview_says_which_term_set_each_threshold(small_study, monkeypatch):
    from tests.test_pages import _factory

    make = _factory(small_study, monkeypatch)
    try:
        at = make("chapters/overview.py")
        e = small_study.report()["experts"]
        frame = next(d.value for d in at.dataframe if "set by" in d.value.columns)
        for layer, by in zip(frame["layer"], frame["set by"], strict=True):
            won = ui.threshold_term(e, layer)
            assert by == ("reference's quantile" if won["term"] == "quantile"
                          else "floor (factor × chance)")
        assert any(c.value.startswith("Per layer (percent): ") for c in at.caption)
    finally:
        _clear()


def _case_study_with(small_study, monkeypatch, s_acc: float, r_acc: float, n_test: int) -> AppTest:
    """The first chapter on the small case, its report's headline accuracies and test size set."""
    monkeypatch.setenv("CASEBOOK_CACHE", _cache_dir(small_study))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()
    real = ui.report

    def report(study=None):
        rep = dict(real(study))
        head = rep["case_facts"]["headline"]
        models = {k: dict(v) for k, v in rep["models"].items()}
        models[rep["subject"]][f"{head}_acc"] = s_acc
        models[rep["reference"]][f"{head}_acc"] = r_acc
        return {**rep, "models": models, "data": {**rep["data"], "n_test": n_test}}

    monkeypatch.setattr(ui, "report", report)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_subject_that_leads_its_reference_is_not_said_to_trail(small_study, monkeypatch):
    # issue 22's starter case: the page said vanilla "barely trails" when it led by 4.4 points
    try:
        at = _case_study_with(small_study, monkeypatch, 0.600, 0.556, 5000)
        said = _texts(at)
        assert "barely trails" not in said
        assert "leads clean by **+4.4 pp**" in said and "the reference is not better here" in said
    finally:
        _clear()


def test_a_gap_within_noise_is_a_tie_and_a_small_set_is_named(small_study, monkeypatch):
    try:
        at = _case_study_with(small_study, monkeypatch, 0.60, 0.65, 50)
        said = _texts(at)
        assert "is within noise (two standard errors on 50 images: ±19.3 pp)" in said
        assert "cannot be told apart" in said and "is what relying on" not in said
        assert "the test split has 50 images (small: ±7 points" in said
    finally:
        _clear()
