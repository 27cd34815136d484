"""The detection stage's evaluation (issue 18): several views and attacks per held-out image, the
image-level bootstrap, ranking only where intervals separate, attacks adaptive to the Mahalanobis
baseline, and the adaptive attacks' ROC curves (issue 22). Tiny models: seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import core.stages.detection as stage
from core.cases.seam import CaseData, Split
from core.methods.detection import (
    SATURATED,
    Mahalanobis,
    _weighted_roc,
    benign_views,
    image_bootstrap,
    interval,
    mahalanobis_penalty,
    patch_attack,
    patch_masks,
    rank_detectors,
    roc,
)
from core.stages.base import StageContext


def test_patch_masks_take_one_side_per_image_and_keep_the_single_side_draw():
    sides = torch.tensor([3, 5, 8, 3, 5, 8])
    m = patch_masks(6, sides, (12, 10), seed=4)
    assert m.shape == (6, 1, 12, 10)
    assert (m.flatten(1).sum(1) == sides ** 2).tolist() == [True] * 6   # whole squares inside
    assert torch.equal(m, patch_masks(6, sides, (12, 10), seed=4))
    # one side for all: the draw earlier versions made (the decoy case's numbers hold)
    g = torch.Generator().manual_seed(2)
    rows, cols = torch.randint(0, 8, (5,), generator=g), torch.randint(0, 6, (5,), generator=g)
    one = patch_masks(5, 5, (12, 10), seed=2)
    for i in range(5):
        assert one[i, 0, rows[i]:rows[i] + 5, cols[i]:cols[i] + 5].all()
    with pytest.raises(ValueError):
        patch_masks(2, torch.tensor([3, 11]), (12, 10))
    with pytest.raises(ValueError):
        patch_masks(3, torch.tensor([3, 4]), (12, 10))


def test_benign_views_keep_the_image_first_and_name_their_source():
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    xv, src = benign_views(x, 4, max_shift=2, flip=True, seed=1)
    assert xv.shape == (12, 2, 8, 8) and src.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(xv[::4], x)                        # view 0 is the image itself
    assert not torch.equal(xv[1::4], x)                   # the others move
    same, _ = benign_views(x, 1)
    assert torch.equal(same, x)


def test_weighted_roc_with_unit_weights_is_roc_and_the_bootstrap_resamples_images():
    rng = np.random.default_rng(0)
    c = np.round(rng.normal(size=40), 1)                   # ties on purpose
    a = np.round(rng.normal(0.8, 1, size=30), 1)
    r = roc(c, a)
    auc, tpr = _weighted_roc(c, a, np.ones((1, 40)), np.ones((1, 30)))
    assert auc[0] == r["auc"]
    assert all(tpr[b][0] == r["tpr_at"][b] for b in (0.01, 0.05, 0.25))
    # integer weights = repeating the scores
    wc, wa = rng.integers(0, 3, size=40), rng.integers(0, 3, size=30)
    rep = roc(np.repeat(c, wc), np.repeat(a, wa))
    auc_w, tpr_w = _weighted_roc(c, a, wc[None], wa[None])
    assert auc_w[0] == pytest.approx(rep["auc"], abs=1e-12)
    assert tpr_w[0.25][0] == pytest.approx(rep["tpr_at"][0.25], abs=1e-12)
    # image-level: 20 images, 2 clean views and 1–2 attacks each
    cs, as_ = np.repeat(np.arange(20), 2), np.r_[np.arange(20), np.arange(10)]
    boot = image_bootstrap({"d": c}, {"d": a}, torch.as_tensor(cs), torch.as_tensor(as_), 20,
                           replicates=300, seed=0)
    lo, hi = interval(boot["d"]["auc"])
    assert boot["d"]["auc"].shape == (300,) and lo < r["auc"] < hi and hi - lo > 0.05


def test_rank_detectors_separates_only_what_the_bootstrap_separates():
    rng = np.random.default_rng(1)
    n = 60
    src = torch.arange(n)
    clean = {"good": rng.normal(size=n), "twin": rng.normal(size=n), "weak": rng.normal(size=n)}
    att = {"good": rng.normal(2.5, 1, size=n), "weak": rng.normal(0.2, 1, size=n)}
    att["twin"] = att["good"] + rng.normal(0, 0.01, size=n)  # a near copy: cannot be told apart
    auc = {d: roc(clean[d], att[d])["auc"] for d in clean}
    boot = image_bootstrap(clean, att, src, src, n, replicates=400, seed=0)
    rk = rank_detectors(auc, boot, baselines=["weak"])
    assert rk["rank"]["weak"] == 3 and rk["rank"]["good"] == rk["rank"]["twin"] == 1
    assert "twin" in rk["tied_with"]["good"] and "weak" not in rk["tied_with"]["good"]
    assert rk["verdict"].startswith("cannot be told apart") and rk["saturated"] == []
    assert rk["influence_vs_baselines"]["verdict"] == "influence ahead"
    # a baseline at AUC 1: saturated, whatever else
    att["weak"] = clean["weak"] + 100
    auc["weak"] = roc(clean["weak"], att["weak"])["auc"]
    boot = image_bootstrap(clean, att, src, src, n, replicates=200, seed=0)
    rk = rank_detectors(auc, boot, baselines=["weak"])
    assert auc["weak"] >= SATURATED and rk["saturated"] == ["weak"]
    assert rk["verdict"].startswith("saturated: cannot rank")
    assert rk["influence_vs_baselines"]["verdict"] == "saturated: cannot rank"
    # one clear winner
    clean2 = {"a": clean["good"], "b": clean["weak"]}
    att2 = {"a": clean["good"] + 5, "b": rng.normal(0.1, 1, size=n)}
    auc2 = {d: roc(clean2[d], att2[d])["auc"] for d in clean2}
    rk = rank_detectors(auc2, image_bootstrap(clean2, att2, src, src, n, replicates=200), ())
    assert rk["top"] == ["a"] and rk["verdict"].startswith("a ranks first")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.fc1 = nn.Linear(4 * 12 * 12, 8)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.act1(self.conv1(x)).flatten(1)
        return self.out(self.act2(self.fc1(h)))


def _tiny_data():
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(n) % 2
        x = torch.rand(n, 1, 12, 12, generator=g) * 0.5
        x[y == 1, :, 3:9, 3:9] += 0.5       # class 1: a bright centre
        return Split(x=x, y=y)

    return CaseData(train=split(80), val=split(10), test=split(12), class_names=("a", "b"),
                    source="tiny")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    data = _tiny_data()
    net = _Tiny()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(data.train.x), data.train.y).backward()
        opt.step()
    return data, net.eval()


def test_the_mahalanobis_penalty_pulls_the_attack_toward_the_target_class(tiny):
    data, net = tiny
    maha = Mahalanobis(net, "act2", data.train.x, data.train.y)
    x, y = data.test.x, data.test.y
    scale = float(maha.score(data.train.x).median())
    pen = mahalanobis_penalty(net, "act2", maha.gauss, scale=scale)
    target = 1 - y
    plain, _ = patch_attack(net, x, target, size=5, steps=30, seed=0)
    knows, _ = patch_attack(net, x, target, size=5, steps=30, seed=0, penalty=pen,
                            penalty_weight=5.0)
    # the penalty is the baseline's own distance to the target class (scaled)
    with torch.no_grad():
        d = pen(net, knows, target)
    gauss_d = maha.gauss.distance(_acts(net, knows), target)
    assert torch.allclose(d, gauss_d / scale, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        assert pen(net, knows, target).mean() < pen(net, plain, target).mean()


def _acts(net, x):
    from core.engine.influence import activations
    return activations(net, x, "act2").flatten(1).double()


def test_build_evaluates_views_sides_and_places_with_intervals_and_adaptive_rocs(tiny):
    data, net = tiny
    section = {"layers": ["act1", "act2"], "layer": "act2", "steps": 10, "n_fit": 30,
               "n_attack_fit": 20, "resolution": 2, "k": 2, "n_examples": 2, "views": 3,
               "view_shift": 1, "patch_sizes": [4, 6], "positions": 2, "bootstrap": 50,
               "adaptive_to": ["influence", "mahalanobis", "both"]}
    ctx = StageContext.standalone("detection", data, {"net": net}, section=section,
                                  device=torch.device("cpu"))
    out = stage.build(ctx)
    ev = out["evaluation"]
    assert ev["n_images"] == 12 and ev["n_clean"] == 36 and ev["n_attempts"] == 36 * 4
    assert out["attack"]["n_attempts"] == 144 and out["attack"]["size"] == [4, 6]
    assert out["rows"], "some attack succeeds"
    for r in out["rows"]:
        assert r["n_clean"] == 36 and r["n_images"] == 12 and r["n_attacked"] <= 144
        assert r["auc_low"] <= r["auc"] <= r["auc_high"] or np.isnan(r["auc_low"])
        assert r["tpr_at_5_low"] <= r["tpr_at_5_high"] and isinstance(r["tied_with"], list)
        assert r["rank"] >= 1 and r["saturated"] == (r["auc"] >= SATURATED)
    assert out["ranking"]["verdict"] and set(out["ranking"]["order"]) == set(stage.DESCRIPTIONS)
    kinds = [a["against"] for a in out["adaptive_attacks"]]
    assert kinds == ["influence", "mahalanobis", "both"]
    assert out["adaptive"]["against"] == "influence"
    for a in out["adaptive_attacks"]:
        assert 0 <= a["success"] <= 1
        for r in a["rows"]:                     # issue 22: the adaptive rows carry their ROC
            assert r["roc"]["fpr"][0] == 0 and r["roc"]["tpr"][-1] == 1
    # the report part is plain and carries no curves
    rep = out["report"]
    assert rep["ranking"] == out["ranking"] and len(rep["adaptive"]) == 3
    assert all("roc" not in r for a in rep["adaptive"] for r in a["rows"])


def test_one_view_one_side_one_place_is_the_earlier_design(tiny):
    """views = 1, one side, one place: the attempts are the held-out images themselves, their
    targets and patches as earlier versions drew them."""
    data, net = tiny
    section = {"layers": ["act2"], "steps": 4, "n_fit": 20, "n_attack_fit": 10, "resolution": 2,
               "k": 2, "adaptive": False, "bootstrap": 20, "patch_size": 5}
    cfg = stage.check_config(section)
    plan = stage._Plan(cfg, data.test, 5, 2, 0)
    assert torch.equal(plan.x_in, data.test.x) and plan.side == 5
    assert torch.equal(plan.target, stage._targets(data.test.y, 2, 1))
    out = stage.build(StageContext.standalone("detection", data, {"net": net}, section=section))
    assert out["adaptive"] == {} and out["adaptive_attacks"] == []
    assert out["evaluation"]["n_clean"] == data.test.n


def test_check_config_of_the_new_keys():
    cfg = stage.check_config({"patch_sizes": [6, 8], "views": 4, "adaptive_to": ["both"]})
    assert cfg["patch_sizes"] == [6, 8] and cfg["adaptive_to"] == ["both"]
    for bad in ({"patch_sizes": []}, {"patch_sizes": [0]}, {"views": 0}, {"positions": True},
                {"adaptive_to": ["nobody"]}, {"adaptive_to": ["both", "both"]},
                {"view_flip": 1}, {"bootstrap": 5}, {"adaptive_mahalanobis_weight": -1}):
        with pytest.raises(ValueError, match=r"^\[detection\]"):
            stage.check_config(bad)


# ---------------------------------------------------------------------------------------------- the chapter


class _StubStudy:
    def __init__(self, payload):
        from types import SimpleNamespace
        self.payload = payload
        self.config = SimpleNamespace(name="stub-case", title="stub", experts={"layers": ["act2"]})

    def status(self):
        import ui
        return {s: True for s in ui.STAGES}

    def artifact(self, stage):
        return self.payload if stage == "detection" else None

    def report(self):
        return {"models": {"net": {"test_acc": 0.9}}}

    def case_facts(self):
        return {"classes": ["a", "b"], "region": None, "channels": 1, "size": [12, 12],
                "headline": "test", "evaluation_sets": ["test"], "training_sets": ["train"],
                "chance": 0.5, "region_alias": None, "subject": "net", "reference": None,
                "models": ["net"], "layers": ["act2"], "title": "stub"}


def test_the_chapter_draws_every_adaptive_attack_with_its_roc_and_the_ranking(tiny, monkeypatch):
    """Issue 22: the adaptive-attack view had no ROC; issue 18: intervals and the ranking (or
    'cannot be told apart' / 'saturated') on the page, from a payload as the stage writes it."""
    from pathlib import Path

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import ui
    data, net = tiny
    section = {"layers": ["act1", "act2"], "layer": "act2", "steps": 8, "n_fit": 30,
               "n_attack_fit": 20, "resolution": 2, "k": 2, "n_examples": 2, "views": 2,
               "view_shift": 1, "patch_sizes": [4, 6], "bootstrap": 50}
    out = stage.build(StageContext.standalone("detection", data, {"net": net}, section=section))
    study = _StubStudy(out)
    monkeypatch.setattr(ui, "current_study", lambda: study)
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()
    page = str(Path(__file__).resolve().parents[1] / "chapters" / "detection.py")
    at = AppTest.from_file(page, default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    options = at.radio(key="qp-attack").options
    assert options == ["patch attack", "adaptive: influence", "adaptive: mahalanobis"]
    table = next(d.value for d in at.dataframe if "AUC" in d.value.columns)
    assert "AUC 95% interval" in table.columns and "rank" in table.columns
    assert table["AUC"].tolist() == pytest.approx([r["auc"] for r in out["rows"]])
    said = "\n".join(m.value for m in at.markdown) + "\n".join(w.value for w in at.warning)
    assert out["ranking"]["verdict"] in said.replace("\\", "")   # Markdown escapes aside
    for label, attack in zip(options[1:], out["adaptive_attacks"], strict=True):
        at.radio(key="qp-attack").set_value(label).run()
        assert not at.exception, [e.value for e in at.exception]
        heads = [h.value for h in at.header]
        if attack["rows"]:
            assert "ROC curves" in heads and len(at.get("vega_lite_chart")) == 1
            table = next(d.value for d in at.dataframe if "AUC" in d.value.columns)
            assert table["AUC"].tolist() == pytest.approx([r["auc"] for r in attack["rows"]])
        assert "Attacked images" not in heads                 # nothing of the patch attack
        assert not any("carries no ROC" in i.value for i in at.info)


def test_the_stage_module_holds_the_stage_and_every_earlier_name_still_imports():
    """Issue 19: the measurements live in core/methods/detection.py; the stage module re-exports
    every name earlier versions offered (the very objects), and the old flat name imports."""
    import core.detection

    import core.methods.detection as methods
    for name in ("patch_attack", "patch_masks", "roc", "Detectors", "InfluenceFeatures",
                 "adaptive_penalty", "expert_maps", "mahalanobis_scores", "mask_experts_region",
                 "max_softmax_scores", "window_concentration", "fit_logistic", "_bounds"):
        assert getattr(stage, name) is getattr(methods, name), name
    assert stage._targets is methods.attack_targets and core.detection.build is stage.build
    own = {n for n, v in vars(stage).items() if callable(v) and getattr(v, "__module__", "") ==
           stage.__name__ and not isinstance(v, type)}
    assert own >= {"build", "check_config", "input_bounds"}
    assert not any(n in own for n in ("patch_attack", "roc", "expert_maps", "image_bootstrap"))
