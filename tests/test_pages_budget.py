"""Build budgets (core.casestudy.budget): the quick preset fills in each stage's declared values
where the case sets none, keys its results apart from a full build, and every page says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import ui
from core.casestudy import CaseError, CaseStudy
from core.casestudy import budget as B
from core.casestudy.registry import BY_NAME, REGISTRY


def test_the_preset_comes_from_the_argument_then_the_environment_then_the_case(monkeypatch):
    monkeypatch.delenv("CASEBOOK_BUDGET", raising=False)
    assert B.preset_of({}) == "full"
    assert B.preset_of({"budget": {"preset": "quick"}}) == "quick"
    monkeypatch.setenv("CASEBOOK_BUDGET", "full")
    assert B.preset_of({"budget": {"preset": "quick"}}) == "full"
    assert B.preset_of({"budget": {"preset": "full"}}, "quick") == "quick"
    for raw, asked in (({}, "fast"), ({"budget": {"preset": 3}}, None),
                       ({"budget": {"preset": "quick", "n": 1}}, None), ({"budget": 1}, None)):
        monkeypatch.delenv("CASEBOOK_BUDGET")
        with pytest.raises(CaseError) as err:
            B.preset_of(raw, asked)
        assert len(str(err.value).splitlines()) == 1
        monkeypatch.setenv("CASEBOOK_BUDGET", "full")


def test_quick_fills_only_what_the_case_leaves_to_the_defaults():
    raw = {"title": "t", "budget": {"preset": "quick"},
           "corrections": {"epochs": 5, "suppression": {"n_units": [8]}},
           "detection": {"steps": 7}}
    before = repr(raw)
    full, applied = B.apply(raw, "full")
    assert "budget" not in full and applied == {} and full["corrections"] == raw["corrections"]
    out, applied = B.apply(raw, "quick")
    assert repr(raw) == before  # the case's own dict is not changed
    quick = BY_NAME["corrections"].quick
    assert out["corrections"]["epochs"] == 5 and "epochs" not in applied["corrections"]
    assert out["corrections"]["seeds"] == quick["seeds"]
    # a nested table is filled key by key: the case's n_units stays, the rest comes from quick
    assert out["corrections"]["suppression"]["n_units"] == [8]
    assert out["corrections"]["suppression"]["candidates"] == quick["suppression"]["candidates"]
    assert out["detection"]["steps"] == 7 and out["detection"]["n_fit"] == \
        BY_NAME["detection"].quick["n_fit"]
    assert set(applied) == {s.sections[0] for s in REGISTRY if s.quick}


def test_every_stage_quick_values_pass_its_own_check(small_study):
    study = CaseStudy.open("decoy-mnist-small", cache_dir=small_study.cache.root, device="cpu",
                           budget="quick")
    assert study.budget["preset"] == "quick"
    for s in REGISTRY:
        if s.delegated and s.quick:  # what the module runs with is the quick values
            section = study.config.section(s.name)
            for key, value in study.budget["applied"].get(s.name, {}).items():
                assert section[key] == value if not isinstance(value, dict) else \
                    all(section[key][k] == v for k, v in value.items())


def test_quick_results_are_keyed_apart_and_reported(small_study):
    full = CaseStudy.open("decoy-mnist-small", cache_dir=small_study.cache.root, device="cpu")
    quick = CaseStudy.open("decoy-mnist-small", cache_dir=small_study.cache.root, device="cpu",
                           budget="quick")
    for stage in ("data", "models"):  # nothing of theirs is budgeted: shared with a full build
        assert quick._key(stage) == full._key(stage)
    for stage in quick.budget["applied"]:
        assert quick._key(stage) != full._key(stage), stage
    assert quick.code_fingerprint() != full.code_fingerprint()
    assert quick.report()["budget"]["preset"] == "quick"
    assert full.report()["budget"] == {"preset": "full", "applied": {}}


def test_every_chapter_says_it_shows_a_quick_build(small_study, monkeypatch):
    monkeypatch.setenv("CASEBOOK_CACHE", str(small_study.cache.root))
    monkeypatch.setenv("CASEBOOK_CASE", "decoy-mnist-small")
    for budget, expected in (("quick", True), ("full", False)):
        monkeypatch.setenv("CASEBOOK_BUDGET", budget)
        st.cache_data.clear()
        st.cache_resource.clear()
        ui._GENERATION.clear()
        at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"),
                               default_timeout=180)
        at.run()
        for page in ("chapters/case_study.py", "chapters/influence.py"):
            at.switch_page(page).run()
            assert not at.exception, [e.value for e in at.exception]
            said = [i.value for i in at.info if "Quick build" in i.value]
            assert bool(said) is expected, (budget, page)
            if expected:  # the value the quick budget applied (the stage declares it)
                applied = CaseStudy.open("decoy-mnist-small", cache_dir=small_study.cache.root,
                                         device="cpu", budget="quick").budget["applied"]
                n = applied["representations"]["n_images"]
                assert f"[representations] n_images = {n}" in said[0].replace("\\", "")
