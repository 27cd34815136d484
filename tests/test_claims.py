"""The README check compares claims within their tolerances, not float bits.

Hand-worked values for the intervals; each kind of claim held and broken; a perturbed build
(tiny weight noise after training, before every downstream stage) standing in for another CPU
makes the same claims, while a flipped verdict, a moved accuracy or a lost row does not; and the
``readme`` command end to end on a README with a block of the small case.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from core.report.claims import claims, compare, threshold_boot, wilson


def test_wilson_by_hand():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half-width 1.96·√(0.0025 + z²/40000) / (1 + z²/100)
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.40383, abs=1e-4) and hi == pytest.approx(0.59617, abs=1e-4)
    # a perfect score on 60 images still has an interval: (z²/n) / (1 + z²/n) below 1
    lo, hi = wilson(1.0, 60)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 / (1 + 1.959964**2 / 60), abs=1e-6)
    assert wilson(0.3, 0) == (0.0, 1.0)


def test_threshold_bootstrap_brackets_the_estimate():
    ref = [0.01 * i for i in range(50)]
    boots = threshold_boot(ref, floor=0.1, q=0.95, seed=0, n_boot=500)
    assert min(boots) >= 0.1 and min(boots) < 0.465 < max(boots)  # the 95% quantile is 0.4655
    assert threshold_boot([0.2] * 10, floor=0.1, q=0.95, n_boot=50) == [0.2] * 50
    assert threshold_boot(ref, floor=0.1, q=0.95, seed=3, n_boot=50) == \
        threshold_boot(ref, floor=0.1, q=0.95, seed=3, n_boot=50)  # seeded


def _one(kind, value, **kw):
    return {"key": "k", "kind": kind, "value": value, **kw}


@pytest.mark.parametrize("old,new,ok", [
    (_one("exact", 60), _one("exact", 60), True),
    (_one("exact", 60), _one("exact", 61), False),
    (_one("number", 0.50, tol=0.02), _one("number", 0.515, tol=0.02), True),
    (_one("number", 0.50, tol=0.02), _one("number", 0.53, tol=0.02), False),
    (_one("number", 0.50, tol=0.01), _one("number", 0.53, tol=0.04), True),  # the wider side
    (_one("interval", 8, low=3, high=14), _one("interval", 7, low=2, high=13), True),
    (_one("interval", 8, low=7, high=9), _one("interval", 12, low=11, high=13), False),
    (_one("verdict", "tie", fragile=None), _one("verdict", "tie", fragile=None), True),
    (_one("verdict", "tie", fragile=None), _one("verdict", "better", fragile=None), False),
    (_one("verdict", "tie", fragile="p 0.2 near α"), _one("verdict", "better", fragile=None), True),
    (_one("grid", 4), _one("grid", 8), True),
    (_one("grid", 4), _one("grid", 16), False),
    (_one("grid", None), _one("grid", 128), False),
])
def test_each_kind_of_claim(old, new, ok):
    problems, counts = compare([old], [new])
    assert (problems == []) is ok, problems
    assert counts["compared"] == 1


def test_a_row_that_comes_or_goes_is_a_change():
    a = [_one("exact", 1)]
    b = [{**_one("exact", 1), "key": "other"}]
    problems, _ = compare(a, b)
    assert any("gone" in p for p in problems) and any("new" in p for p in problems)
    driven = [{**a[0], "data_driven": "picked from the confusions"}]
    assert compare(driven, [])[0] == []


def _perturbing_train(real, scale: float = 1e-3):
    import torch

    def train(model, *args, **kwargs):
        hist = real(model, *args, **kwargs)
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() + 1e-8))
        return hist

    return train


@pytest.fixture(scope="module")
def full_study(small_study, tmp_path_factory):
    """The small case with every stage built, in a copy of the shared cache (other tests rely on
    the shared one keeping corrections and essence unbuilt)."""
    import shutil

    from core.casestudy import CaseStudy

    cache = tmp_path_factory.mktemp("full-cache") / "cache"
    shutil.copytree(small_study.cache_dir, cache)
    study = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    study.build()
    return study


@pytest.fixture(scope="module")
def two_builds(full_study, tmp_path_factory):
    """The small case's report built twice: as is, and with tiny weight noise added to every
    trained model before the downstream stages (a stand-in for another CPU's float bits)."""
    import core.methods.training
    from core.casestudy import CaseStudy

    base = full_study.report()
    cache = tmp_path_factory.mktemp("perturbed-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core.methods.training, "train_model", _perturbing_train(core.methods.training.train_model))
        other = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
        other.build()
        perturbed = other.report()
    return base, perturbed


def test_a_perturbed_build_makes_the_same_claims(two_builds):
    base, perturbed = two_builds
    assert base["models"]["vanilla"]["digest"] != perturbed["models"]["vanilla"]["digest"]
    old, new = claims(base), claims(perturbed)
    assert len(old) > 100
    bits = sum(1 for a, b in zip(old, new, strict=False) if a.get("value") != b.get("value"))
    assert bits > 0  # the perturbation moved numbers ...
    problems, counts = compare(old, new)
    assert problems == []  # ... within their tolerances
    assert counts["compared"] == len(old)


def test_a_flipped_verdict_or_a_moved_accuracy_fails(two_builds):
    base, perturbed = two_builds
    flipped = copy.deepcopy(perturbed)
    row = next(r for r in flipped["corrections"] if r.get("paired_p_value") is not None
               and (r["paired_p_value"] > 0.5 or r["paired_p_value"] < 0.005))
    row["paired_verdict"] = "better" if row["paired_verdict"] != "better" else "worse"
    problems, _ = compare(claims(base), claims(flipped))
    assert any(f"corrections.{row['method']}.paired_verdict" in p for p in problems)

    moved = copy.deepcopy(perturbed)
    acc = moved["models"]["vanilla"]["decoy_test_acc"]
    moved["models"]["vanilla"]["decoy_test_acc"] = acc - 0.3 if acc > 0.5 else acc + 0.3
    problems, _ = compare(claims(base), claims(moved))
    assert any("models.vanilla.decoy_test_acc" in p for p in problems)

    lost = copy.deepcopy(perturbed)
    lost["detection"] = lost["detection"][1:]
    problems, _ = compare(claims(base), claims(lost))
    assert any("gone from the build" in p for p in problems)


def test_the_readme_command_end_to_end(full_study, tmp_path, capsys):
    from core.casestudy import CaseStudy
    from core.report.readme import check_readme, claims_path, write_readme

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- report:decoy-mnist-small -->\n<!-- /report:decoy-mnist-small -->\n")
    cache = full_study.cache_dir
    assert write_readme(CaseStudy, cache, path=readme) == 0
    record = json.loads(claims_path(readme).read_text())
    assert record["decoy-mnist-small"]["claims"]
    assert check_readme(CaseStudy, cache, path=readme) == 0
    assert check_readme(CaseStudy, cache, strict=True, path=readme) == 0

    # a hand edit of a number in the block fails the check, whatever its tolerance
    text = readme.read_text()
    edited = text.replace("| vanilla (under study) | 0.", "| vanilla (under study) | 1.", 1)
    assert edited != text
    readme.write_text(edited)
    assert check_readme(CaseStudy, cache, path=readme) == 1
    assert "edited by hand" in capsys.readouterr().err
    readme.write_text(text)

    # a claim recorded as firm that the build contradicts fails it
    rec = copy.deepcopy(record)
    firm = next(c for c in rec["decoy-mnist-small"]["claims"] if c["kind"] == "interval"
                and c["key"].startswith("models."))
    firm["value"], firm["low"], firm["high"] = 2.0, 1.9, 2.1
    claims_path(readme).write_text(json.dumps(rec))
    assert check_readme(CaseStudy, cache, path=readme) == 1
    assert firm["key"] in capsys.readouterr().err
    assert check_readme(CaseStudy, cache, strict=True, path=readme) == 0  # strict reads the text
    assert not math.isnan(firm["value"])
