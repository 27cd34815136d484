"""core.stages.corrections on a reduced DecoyMNIST (300 images, a model trained for a few epochs), and the
corrections page under AppTest on the small case study."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch

from core.cases.decoy_mnist.data import decoy_mnist
from core.cases.decoy_mnist.net import build_model
from core.methods.corrections import common, pclarc
from core.methods.training import set_seed, train_model
from core.stages import corrections as C
from core.stages.base import StageContext


@pytest.fixture(scope="module")
def data():
    return decoy_mnist(seed=0, subset=30)  # 216 train, 24 val, 60 test


@pytest.fixture(scope="module")
def vanilla(data):
    set_seed(0)
    m = build_model("decoy-cnn")
    train_model(m, data.train.x, data.train.y, epochs=3, lr=3e-3, batch_size=32, seed=0,
                device="cpu")
    return m.eval()


@pytest.fixture(scope="module")
def clean(data):
    set_seed(0)
    m = build_model("decoy-cnn")
    train_model(m, data.train.x_clean, data.train.y, epochs=3, lr=3e-3, batch_size=32, seed=0,
                device="cpu")
    return m.eval()


FAST = {
    "suppression": {"layers": ["conv1", "fc1"], "n_units": [1, 2], "damping": [0.0, 0.5],
                    "candidates": 2, "n_images": 10, "resolution": 4},
    "pclarc": {"layers": ["relu1", "relu3"]},
    "rrr": {"lambdas": [0.1, 1.0], "epochs": 1, "batch_size": 64},
    "influence_penalty": {"lambdas": [0.1], "epochs": 1, "batch_size": 64, "n_images": 40},
    "counterexamples": {"fractions": [0.5], "epochs": 1, "batch_size": 64},
    "finetune": {"epochs": 1, "batch_size": 64},
}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------- each method

@pytest.mark.parametrize("method", C.METHODS)
def test_each_correction_runs_records_and_leaves_vanilla_alone(method, vanilla, data):
    before = _state(vanilla)
    corr = C.correct(method, vanilla, data, **FAST[method])
    assert isinstance(corr, C.Correction) and corr.method == method
    with torch.no_grad():
        out = corr.model(data.test.x[:5])
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    rec = corr.record
    assert rec["seconds"] > 0
    assert rec["strength"] is not None and rec["strength_name"]
    assert rec["grid"], "the tuning grid is recorded"
    for g in rec["grid"]:
        assert 0.0 <= g["val_acc"] <= 1.0
    # the chosen value is the grid's best validation accuracy
    assert max(g["val_acc"] for g in rec["grid"]) == pytest.approx(
        common.val_acc(corr.model, data), abs=1e-6)
    after = _state(vanilla)
    assert all(torch.equal(before[k], after[k]) for k in before), "the vanilla model was mutated"


def test_measure_reports_accuracies_and_decoy_mass(vanilla, data):
    m = C.measure(vanilla, data, n_explain=20, resolution=4)
    for k in ("decoy_test_acc", "clean_test_acc", "val_acc"):
        assert 0.0 <= m[k] <= 1.0
    assert 0.0 <= m["decoy_mass"] <= 1.0


# ---------------------------------------------------------------------------------- suppression

@pytest.mark.parametrize("layer,units", [("conv1", [3, 7]), ("conv2", [0, 5, 31]), ("fc1", [2])])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_suppression_scales_only_the_chosen_units(vanilla, data, layer, units, damping):
    sup = C.suppress(vanilla, layer, units, damping)
    x = data.test.x[:8]

    # Reference: the original model with the chosen units' activations scaled by a hook.
    ref = copy.deepcopy(vanilla)
    scale = torch.ones(getattr(ref, layer).weight.shape[0])
    scale[units] = damping

    def hook(_m, _a, out):
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return out * scale.view(shape)

    h = getattr(ref, layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = ref(x)
    finally:
        h.remove()
    with torch.no_grad():
        got = sup(x)
        original = vanilla(x)
    assert torch.allclose(got, expected, atol=1e-5)
    if damping == 0.0:
        assert not torch.allclose(got, original)

    # The layer's own outputs (every unit) are unchanged; only the next layer's weights that read
    # the chosen units differ, and only in those slices.
    acts = {}
    for name, model in (("orig", vanilla), ("sup", sup)):
        hh = getattr(model, layer).register_forward_hook(
            lambda _m, _a, o, name=name: acts.__setitem__(name, o.detach()))
        try:
            with torch.no_grad():
                model(x)
        finally:
            hh.remove()
    assert torch.equal(acts["orig"], acts["sup"])
    a, b = vanilla.state_dict(), sup.state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    nxt = {"conv1": "conv2", "conv2": "fc1", "fc1": "fc2"}[layer]
    assert changed == ([f"{nxt}.weight"] if damping != 1.0 else [])
    w0, w1 = a[f"{nxt}.weight"], b[f"{nxt}.weight"]
    n_units = getattr(vanilla, layer).weight.shape[0]
    per = w0.shape[1] // n_units
    touched = torch.zeros(w0.shape[1], dtype=torch.bool)
    for u in units:
        touched[u * per:(u + 1) * per] = True
    assert torch.equal(w0[:, ~touched], w1[:, ~touched])
    assert torch.allclose(w1[:, touched], damping * w0[:, touched])


def test_suppression_rejects_negative_damping_and_bad_units(vanilla):
    with pytest.raises(ValueError, match="damping"):
        C.suppress(vanilla, "conv1", [0], -0.5)
    with pytest.raises(ValueError, match="out of range"):
        C.suppress(vanilla, "conv1", [16], 0.0)


def test_shortcut_units_are_found_without_the_mask(vanilla, data):
    ranked = C.find_shortcut_units(vanilla, data.train.x, data.train.y, "conv1", candidates=2,
                                   n_images=10, resolution=4)
    assert ranked and all(0.0 <= d["border_mass"] <= 1.0 for d in ranked)
    masses = [d["border_mass"] for d in ranked]
    assert masses == sorted(masses, reverse=True)


# ---------------------------------------------------------------------------------- P-ClArC

def test_pclarc_wraps_the_layer_and_leaves_weights_untouched(vanilla, data):
    before = _state(vanilla)
    x, xc = data.train.x[:100], data.train.x_clean[:100]
    v, z_bar = C.concept_direction(vanilla, x, xc, "relu2")
    corrected = C.project_out(vanilla, "relu2", v, z_bar)
    assert isinstance(corrected.relu2, C.ConceptProjection)
    # the original model and every wrapped weight are untouched
    assert all(torch.equal(before[k], v_) for k, v_ in vanilla.state_dict().items())
    cs = corrected.state_dict()
    for k, w in before.items():
        assert torch.equal(cs[k], w), k
    assert set(cs) - set(before) == {"relu2.v", "relu2.z_bar"}
    # the projection: a' = a − v (vᵀa − vᵀz̄); every a' has the same component along v
    acts = pclarc._activations(corrected, data.test.x[:10], "relu2")
    raw = pclarc._activations(vanilla, data.test.x[:10], "relu2")
    vv = corrected.relu2.v.cpu()
    expected = raw - (raw @ vv - vv @ z_bar)[:, None] * vv[None]
    assert torch.allclose(acts, expected, atol=1e-5)
    assert torch.allclose(acts @ vv, torch.full((10,), float(vv @ z_bar)), atol=1e-4)
    assert abs(float(vv.norm()) - 1.0) < 1e-5


def test_pclarc_model_rebuilds_from_its_state_dict(vanilla, data):
    corr = C.correct("pclarc", vanilla, data, layers=["relu1"])
    state = corr.model.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    shell = C.build_corrected("pclarc", vanilla, corr.record)
    shell.load_state_dict(loaded)
    x = data.test.x[:6]
    with torch.no_grad():
        assert torch.allclose(shell.eval()(x), corr.model(x), atol=1e-6)


# ---------------------------------------------------------------------------------- penalties

def test_rrr_penalty_is_zero_on_an_empty_mask_and_positive_otherwise(vanilla, data):
    x = data.train.x[:16]
    m = copy.deepcopy(vanilla)
    empty = torch.zeros_like(data.train.mask[:16], dtype=torch.float32)
    zero = C.rrr_penalty(m, x, empty)
    assert float(zero.detach()) == 0.0
    pos = C.rrr_penalty(m, x, data.train.mask[:16].float())
    assert float(pos.detach()) > 0.0
    pos.backward()  # double backprop reaches the parameters
    assert m.conv1.weight.grad is not None and m.conv1.weight.grad.abs().sum() > 0
    # equals the definition on one example: Σ_pixels (mask · ∂Σ_k log p_k / ∂x)²
    xi = x[:1].clone().requires_grad_(True)
    g, = torch.autograd.grad(torch.log_softmax(vanilla(xi), 1).sum(), xi)
    ref = (data.train.mask[:1].float() * g).pow(2).sum()
    assert torch.allclose(C.rrr_penalty(vanilla, x[:1], data.train.mask[:1].float()), ref,
                          rtol=1e-5)


@pytest.mark.parametrize("layer", [None, "conv1"])
def test_influence_penalty_zero_selector_and_positive_region(vanilla, data, layer):
    x = data.train.x[:8]
    shape = (1, 28, 28) if layer is None else common.slice_shape(vanilla, x[:1], layer)
    assert float(C.influence_penalty(vanilla, x, torch.zeros(shape), layer).detach()) == 0.0
    sel = torch.zeros(shape)
    sel[..., :4, :4] = 1
    assert float(C.influence_penalty(vanilla, x, sel, layer).detach()) > 0.0


def test_shortcut_region_lies_in_the_border(vanilla, data):
    region, info = C.shortcut_region(vanilla, data.train.x, data.train.y, border=4)
    assert region.dtype == torch.bool and region.shape == (28, 28)
    assert not (region & ~C.border_region(28, 4)).any()
    assert info["n_pixels"] == int(region.sum())
    everything, _ = C.shortcut_region(vanilla, data.train.x, data.train.y, threshold=0.0)
    assert torch.equal(everything, C.border_region(28, 4))


def test_counterexample_copies_change_only_patch_pixels(data):
    x, mask = data.train.x[:20], data.train.mask[:20]
    for fill in ("uniform", "shade"):
        c = C.counterexample_copies(x, mask, fill=fill, seed=1)
        assert torch.equal(c[~mask], x[~mask])
        assert not torch.equal(c[mask], x[mask])
        assert c.min() >= 0 and c.max() <= 1


# ---------------------------------------------------------------------------------- the stage

def _context(data, models, corrections, progress=None, seeds=1):
    """The stage's context without a case: DecoyMNIST's layers, vanilla under study, clean as
    the reference."""
    return StageContext.standalone("corrections", data, models, section=corrections,
                                   experts={"layers": ["conv1", "conv2", "fc1"]},
                                   subject="vanilla", reference="clean", seeds=seeds,
                                   progress=progress)


@pytest.fixture(scope="module")
def stage(data, vanilla, clean):
    cfg = {**{k: v for k, v in FAST.items()}, "n_explain": 20, "explain_resolution": 4}
    events = []
    ctx = _context(data, {"vanilla": vanilla, "clean": clean}, cfg, lambda *a: events.append(a))
    payload = C.build(ctx)
    return ctx, payload, events


def test_stage_rows_and_gap_closed_agree_with_the_accuracies(stage):
    _study, payload, events = stage
    rows = payload["rows"]
    assert [r["method"] for r in rows] == list(C.METHODS)
    van = payload["reference"]["vanilla"]["decoy_test_acc"]
    cln = payload["reference"]["clean"]["decoy_test_acc"]
    for r in rows:
        for k in ("method", "decoy_test_acc", "clean_test_acc", "gap_closed", "uses_mask",
                  "decoy_mass", "seconds", "strength"):
            assert k in r, k
        assert r["uses_mask"] == C.USES_MASK[r["method"]]
        assert r["vanilla_decoy_test_acc"] == van and r["clean_ref_decoy_test_acc"] == cln
        # paired against the model under study and against the reference, on the same images
        assert r["paired_delta"] == pytest.approx(r["decoy_test_acc"] - van, abs=1e-6)
        assert r["paired_reference_delta"] == pytest.approx(r["decoy_test_acc"] - cln, abs=1e-6)
        assert r["paired_reference_verdict"] in ("better", "worse", "tie")
        if cln - van > 1e-9:
            assert r["gap_closed"] == pytest.approx((r["decoy_test_acc"] - van) / (cln - van))
        else:
            assert r["gap_closed"] is None
    assert not rows[C.METHODS.index("suppression")]["uses_mask"]
    assert not rows[C.METHODS.index("influence_penalty")]["uses_mask"]
    assert rows[C.METHODS.index("rrr")]["uses_mask"]
    # a border prior is a prior, never "no mask": each method says what it uses
    assert rows[C.METHODS.index("suppression")]["uses"] == "location prior"
    assert rows[C.METHODS.index("influence_penalty")]["uses"] == "location prior"
    assert rows[C.METHODS.index("rrr")]["uses"] == "pixel mask"
    assert all(r["uses"] == C.USES_OF[r["method"]] for r in rows)
    assert not any(C.MASK_NOTES[m].startswith("no mask") for m in C.METHODS)
    assert events and events[-1][0] == events[-1][1]  # (done, total, message): all done
    assert payload["anchors"][0]["rrr_decoy_test_acc"] == pytest.approx(0.9607)
    assert f"{_study.data.train.n:,} training images" in payload["anchors"][0]["differs"]


def test_stage_payload_reads_back_with_weights_only_and_rebuilds_models(stage, data):
    study, payload, _ = stage
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert set(back["models"]) == set(C.METHODS)
    x = data.test.x[:4]
    for name in C.METHODS:
        m = C.load_model(back, name, study.model("vanilla"))
        with torch.no_grad():
            out = m(x)
        assert out.shape == (4, 10)


def test_stage_rebuilt_models_reproduce_the_measured_accuracy(stage, data):
    study, payload, _ = stage
    from core.methods.training import evaluate

    for row in payload["rows"]:
        m = C.load_model(payload, row["method"], study.model("vanilla"))
        assert evaluate(m, data.test.x, data.test.y) == pytest.approx(row["decoy_test_acc"])


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key"):
        C.config_of({"lamdbas": [1]})
    with pytest.raises(ValueError, match="unknown key"):
        C.config_of({"rrr": {"lamdbas": [1]}})
    with pytest.raises(ValueError, match="magic"):
        C.config_of({"methods": ["rrr", "magic"]})
    cfg = C.config_of({"rrr": {"lambdas": [2]}})
    assert cfg["rrr"]["lambdas"] == [2] and cfg["epochs"] == C.DEFAULTS["epochs"]


def test_gap_closed_definition():
    assert C.gap_closed(0.9, 0.5, 1.0) == pytest.approx(0.8)
    assert C.gap_closed(0.4, 0.5, 1.0) == pytest.approx(-0.2)
    assert C.gap_closed(0.7, 0.5, 0.5) is None
    assert C.gap_closed(0.7, 0.6, 0.5) is None  # the reference is worse: no gap to close


# ---------------------------------------------------------------------------------- the page

def test_corrections_page(small_study, monkeypatch):
    from pathlib import Path

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import ui

    small_study.build(stages=["corrections"])
    assert small_study.status()["corrections"]
    monkeypatch.setenv("CASEBOOK_CACHE", str(small_study.cache.root))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()
    app = str(Path(__file__).resolve().parents[1] / "app.py")
    at = AppTest.from_file(app, default_timeout=180)
    at.run()
    at.switch_page("chapters/corrections.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Corrections"
    assert len(at.dataframe) >= 3
    assert len(at.get("vega_lite_chart")) >= 1
    text = " ".join(m.value for m in at.markdown)
    assert "Gap closed" in text and "Best" in text
    payload = small_study.artifact("corrections")
    for row in payload["rows"]:
        assert row["label"] in text or row["label"] in str(at.dataframe[0].value)
    # every correction's paired difference from the model under study and from the reference
    table = at.dataframe[0].value.set_index("method")
    subject, reference = small_study.subject, small_study.reference
    for row in payload["rows"]:
        cell = table.loc[row["label"], f"Δ vs {subject}"]
        assert f"{100 * row['paired_delta']:+.1f} pp" in cell and row["paired_verdict"] in cell
        cell = table.loc[row["label"], f"Δ vs {reference}"]
        assert f"{100 * row['paired_reference_delta']:+.1f} pp" in cell
        assert row["paired_reference_verdict"] in cell
    summary = payload["report"]
    if summary:
        line = next(m.value for m in at.markdown if "runner-up" in m.value)
        verdict = "**better**" if summary["verdict"] == "better" else "**a tie**"
        assert verdict in line and summary["rule"] in line
    st.cache_data.clear()
    st.cache_resource.clear()


def test_stage_over_seeds_reports_mean_and_sd(data, vanilla, clean):
    set_seed(1)
    other = build_model("decoy-cnn")
    train_model(other, data.train.x, data.train.y, epochs=2, lr=3e-3, batch_size=32, seed=1,
                device="cpu")
    models = {"vanilla": {0: vanilla, 1: other.eval()}, "clean": {0: clean, 1: clean}}
    cfg = {"methods": ["pclarc", "suppression"], "seeds": 2, "n_explain": 10,
           "explain_resolution": 4, "pclarc": FAST["pclarc"], "suppression": FAST["suppression"]}
    payload = C.build(_context(data, models, cfg))
    assert payload["n_seeds"] == 2
    for row in payload["rows"]:
        per = row["decoy_test_acc_per_seed"]
        assert len(per) == 2 and row["decoy_test_acc"] == pytest.approx(sum(per) / 2)
        assert row["decoy_test_acc_sd"] == pytest.approx(abs(per[0] - per[1]) / 2 ** 0.5)
        assert len(row["gap_closed_per_seed"]) == 2 and len(row["strength_per_seed"]) == 2
        assert len(row["paired_delta_per_seed"]) == 2 and row["paired_delta_per_seed"][0] == \
            row["paired_delta"]
        assert all(v in ("better", "worse", "tie") for v in row["paired_verdict_per_seed"])
    assert len(payload["reference"]["vanilla"]["decoy_test_acc_per_seed"]) == 2
    # best vs runner-up, paired per seed; "better" only when every seed says so
    summary = payload["report"]
    ranked = sorted(payload["rows"], key=lambda r: -r["decoy_test_acc"])
    assert (summary["best"], summary["runner_up"]) == (ranked[0]["method"], ranked[1]["method"])
    per = summary["best_vs_runner_up_per_seed"]
    assert len(per) == 2 and summary["best_vs_runner_up"] == per[0]
    assert summary["verdict"] == ("better" if all(p["verdict"] == "better" for p in per) else "tie")
    for p, seed in zip(per, (0, 1), strict=True):  # Δ is the seed's accuracy difference
        a, b = ranked[0]["decoy_test_acc_per_seed"][seed], ranked[1]["decoy_test_acc_per_seed"][seed]
        assert p["delta"] == pytest.approx(a - b, abs=1e-6)
    # every seed's validation grid goes to the report (report --json), plain JSON
    grids = summary["grids"]
    assert set(grids) == {r["method"] for r in payload["rows"]}
    for row in payload["rows"]:
        per_seed = grids[row["method"]]
        assert [g["strength"] for g in per_seed] == row["strength_per_seed"]
        assert all(g["points"] and all("val_acc" in pt for pt in g["points"]) for g in per_seed)
    assert json.loads(json.dumps(grids, allow_nan=False)) == grids


def test_corrections_page_offers_the_build_and_draws_after_it(small_study, monkeypatch, tmp_path):
    """An empty cache: the page explains what is missing, builds it on a click (st.status), then
    draws. AppTest is run in the server's steady navigation state (see tests/test_pages.py)."""
    import streamlit as st
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import AppTest

    import ui

    init = PagesManager.__init__

    def steady(self, *args, **kwargs):
        init(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", steady)
    monkeypatch.setenv("CASEBOOK_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()
    from pathlib import Path

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"),
                           default_timeout=300)
    at.run()
    at.switch_page("chapters/corrections.py").run()
    assert not at.exception
    assert any("corrections" in i.value and "not built yet" in i.value for i in at.info)
    assert not at.get("vega_lite_chart")
    at.button(key="build-corrections").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.get("vega_lite_chart")) >= 1 and len(at.dataframe) >= 3
    # the corrected model's experts are offered on demand and drawn after the click
    at.selectbox(key="qp-correction").set_value("rrr").run()
    if any(b.key == "compute-corrected-experts" for b in at.button):
        at.button(key="compute-corrected-experts").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.image) >= 2
    st.cache_data.clear()
    st.cache_resource.clear()


def test_paired_difference_by_hand():
    from core.stages.corrections import paired_difference

    before = torch.tensor([True, True, False, False, True, False, True, True, False, False])
    after = torch.tensor([True, False, True, True, True, True, True, True, True, False])
    p = paired_difference(after, before)
    # b = 4 images only `after` gets right, c = 1 only `before` does; n = 10
    assert (p["b"], p["c"], p["n"]) == (4, 1, 10)
    assert p["delta"] == pytest.approx(0.3)
    assert p["delta_se"] == pytest.approx(math.sqrt(5 / 100 - 9 / 1000))
    # exact McNemar: 2 · P(X ≤ 1), X ~ Bin(5, ½) = 2 · 6/32
    assert p["p_value"] == pytest.approx(12 / 32)
    assert p["verdict"] == "tie"  # 0.375 ≥ 0.05: within noise
    strong = paired_difference(torch.ones(40, dtype=torch.bool), torch.arange(40) % 2 == 0)
    assert strong["verdict"] == "better" and strong["p_value"] < 1e-5
    assert paired_difference(before, before)["verdict"] == "tie"
