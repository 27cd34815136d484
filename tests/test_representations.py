"""Representations as engine configurations: Captum as oracle, the stage's payload, the page."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from streamlit.testing.v1 import AppTest

from core.cases.decoy_mnist.net import DecoyCNN
from core.casestudy.registry import BY_NAME
from core.engine.distributions import GaussianDoI
from core.engine.experts import interpret
from core.engine.influence import influence
from core.engine.quantities import ClassQoI
from core.methods import metrics as M
from core.stages.base import StageContext
from core.stages.representations import (
    METHODS,
    METRIC_KEYS,
    NoiseDoI,
    attribute,
    build,
    layer_activation,
    method_table,
    smoothgrad_noise,
)


def tiny_cnn(seed: int = 0) -> DecoyCNN:
    torch.manual_seed(seed)
    return DecoyCNN(channels=(4, 6), hidden=16).eval()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(3)
    x = torch.rand(6, 1, 28, 28)
    y = torch.tensor([0, 3, 3, 7, 0, 1])
    return x, y


# ----------------------------------------------------------------------------- Captum equalities

def test_saliency_equals_captum(batch):
    x, y = batch
    m = tiny_cnn()
    ours = attribute(m, x, y, "saliency")
    theirs = Saliency(m).attribute(x, target=y, abs=False)
    assert ours.shape == (6, 1, 28, 28)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_gradient_x_input_equals_captum(batch):
    x, y = batch
    m = tiny_cnn()
    assert torch.allclose(attribute(m, x, y, "gradient_x_input"),
                          InputXGradient(m).attribute(x, target=y), atol=1e-6)


@pytest.mark.parametrize("baseline", [None, 0.3])
def test_integrated_gradients_equals_captum_riemann_middle(batch, baseline):
    x, y = batch
    m = tiny_cnn()
    ours = attribute(m, x, y, "integrated_gradients", steps=12, baseline=baseline)
    theirs = IntegratedGradients(m).attribute(x, baselines=0.0 if baseline is None else baseline,
                                              target=y, n_steps=12, method="riemann_middle")
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_smoothgrad_equals_captum_noise_tunnel_with_the_same_noise(batch):
    x, y = batch
    m = tiny_cnn()
    torch.manual_seed(5)
    theirs = NoiseTunnel(Saliency(m)).attribute(x, nt_type="smoothgrad", nt_samples=7, stdevs=0.2,
                                                target=y, abs=False)
    torch.manual_seed(5)
    # Captum's draw: torch.normal over the inputs each repeated nt_samples times in a row
    noise = torch.normal(0, torch.full((7 * len(x), *x.shape[1:]), 0.2))
    ours = attribute(m, x, y, "smoothgrad", noise=noise.view(len(x), 7, *x.shape[1:]))
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_smoothgrad_seeded_is_the_gaussian_doi_and_independent_of_grouping(batch):
    x, y = batch
    m = tiny_cnn()
    seeded = attribute(m, x, y, "smoothgrad", samples=5, stdev=0.1, seed=4)
    explicit = attribute(m, x, y, "smoothgrad",
                         noise=smoothgrad_noise(len(x), tuple(x.shape[1:]), samples=5, stdev=0.1,
                                                seed=4))
    assert torch.allclose(seeded, explicit, atol=1e-6)
    # one target class: one engine call whose DoI is exactly the seeded GaussianDoI
    same = attribute(m, x, 3, "smoothgrad", samples=5, stdev=0.1, seed=4)
    direct = influence(m, x, None, ClassQoI(3), GaussianDoI(5, 0.1, 4), per_input=True)
    assert torch.allclose(same, direct, atol=1e-6)
    # example i's noise follows its index in the caller's batch, not its class group's
    doi = GaussianDoI(5, 0.1, 4)
    for i in (0, 3):
        pts = x[i:i + 1] + 0.1 * doi.noise(tuple(x.shape[1:]), i)
        want = Saliency(m).attribute(pts, target=int(y[i]), abs=False).mean(0, keepdim=True)
        assert torch.allclose(seeded[i:i + 1], want, atol=1e-6)
    assert NoiseDoI(torch.zeros(1, 5, 1)).resolution == 5


@pytest.mark.parametrize("layer", ["relu2", "conv2"])
def test_gradcam_equals_captum_layer_gradcam_interpolated(batch, layer):
    x, y = batch
    m = tiny_cnn()
    ours = attribute(m, x, y, "gradcam", layer=layer)
    cam = LayerGradCam(m, m.get_submodule(layer)).attribute(x, target=y, relu_attributions=True)
    theirs = LayerAttribution.interpolate(cam, (28, 28), "bilinear")
    assert ours.shape == (6, 1, 28, 28)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (ours >= 0).all()


def test_internal_influence_from_the_definition(batch):
    """Experts by a slow loop of autograd over the class's reference images, then IG per unit."""
    x, y = batch
    m = tiny_cnn()
    torch.manual_seed(9)
    rx = torch.rand(12, 1, 28, 28)
    ry = torch.tensor([0, 1, 3, 7] * 3)
    ours, info = attribute(m, x, y, "internal_influence", reference=(rx, ry), layer="conv2", k=2,
                           resolution=6, return_info=True)
    for c in (0, 1, 3, 7):
        chi = torch.zeros(6, 14, 14)
        for img in rx[ry == c]:
            z = layer_activation(m, img[None], "conv2").requires_grad_(True)
            out = m.fc2(m.relu3(m.fc1(m.flatten(m.pool2(m.relu2(z))))))
            (g,) = torch.autograd.grad(out[0, c], z)
            chi += g[0]
        chi /= int((ry == c).sum())
        scores = chi.sum((1, 2))
        top = torch.topk(scores, 2).indices.tolist()
        w = scores[top].clamp(min=0)
        w = w / w.sum() if w.sum() > 0 else torch.full((2,), 0.5)
        sel = y == c
        want = sum(wi * interpret(m, x[sel], "conv2", u, resolution=6) for wi, u in zip(w, top, strict=True))
        got_info = next(i for i in info["classes"] if i["class"] == c)
        assert got_info["units"] == top
        assert torch.allclose(ours[sel], want, atol=1e-5)


def test_attribute_checks_its_arguments(batch):
    x, y = batch
    m = tiny_cnn()
    with pytest.raises(ValueError, match="unknown option"):
        attribute(m, x, y, "saliency", steps=3)
    with pytest.raises(KeyError):
        attribute(m, x, y, "nope")
    with pytest.raises(ValueError, match="one target class"):
        attribute(m, x, y[:2], "saliency")
    # a single int target applies to every example
    assert torch.allclose(attribute(m, x, 3, "saliency"),
                          Saliency(m).attribute(x, target=3, abs=False), atol=1e-6)


def test_every_method_is_an_engine_configuration():
    rows = method_table()
    assert [r["method"] for r in rows] == list(METHODS)
    assert {"saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "gradcam",
            "internal_influence"} == set(METHODS)
    for r in rows:
        assert r["slice"] and r["qoi"] and r["doi"] and r["multiplier"]


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def stage(small_study):
    """The representations stage of the small case study, built through ``study.build``."""
    calls = []
    small_study.build(stages=["representations"], progress=lambda *a: calls.append(a))
    payload = small_study.artifact("representations")
    assert payload is not None, "the representations stage did not build"
    return payload, [c for c in calls if c[0] == "representations"]


def test_stage_payload_shape_and_types(stage):
    payload, calls = stage
    assert BY_NAME["representations"].version == 1  # the registry holds the version
    rows = payload["rows"]
    assert len(rows) == 2 * len(METHODS)
    for row in rows:
        assert set(METRIC_KEYS) | {"method", "model", "label", "decoy_mass"} == set(row)
        assert row["region_mass"] == row["decoy_mass"]  # DecoyMNIST's alias of the region mass
        for key in METRIC_KEYS:
            assert row[key] is None or (isinstance(row[key], float) and math.isfinite(row[key]))
        assert 0 <= row["decoy_mass"] <= 1 and 0 <= row["sparseness"] <= 1
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    n_display = payload["config"]["n_display"]
    assert payload["images"]["x"].shape == (n_display, 28, 28)
    for model in ("vanilla", "clean"):
        for meth in METHODS:
            assert payload["maps"][model][meth].shape == (n_display, 28, 28)
            assert len(payload["curves"]["deletion"][model][meth]) == 29
            assert len(payload["mprt"]["curves"][model][meth]) == len(payload["mprt"]["layers"])
    assert payload["mprt"]["layers"] == ["fc2", "fc1", "conv2", "conv1"]
    assert payload["curves"]["fraction"][0] == 0 and payload["curves"]["fraction"][-1] == 1
    info = payload["metrics_info"]
    for key in METRIC_KEYS:
        assert info[key]["higher_is_better"] == M.METRICS[key].higher_is_better
        assert info[key]["arrow"] == ("↑" if M.METRICS[key].higher_is_better else "↓")
        assert "{" not in info[key]["description"]  # every placeholder filled
    # the descriptions name this case's region, chance and step, never another case's numbers
    chance = payload["chance"]
    assert f"chance {chance:.3f}" in info["decoy_mass"]["description"]
    assert "16/784" not in json.dumps(info) and "decoy patch" in info["rank_accuracy"]["description"]
    step = payload["config"]["step"]
    assert f"{step} at a time" in info["deletion_auc"]["description"]
    assert info["region_mass"]["description"] == info["decoy_mass"]["description"]
    assert calls and calls[-1][1] == calls[-1][2] > 0
    # the row value of MPRT is the last point of the curve (every layer randomised)
    row = next(r for r in rows if r["method"] == "saliency" and r["model"] == "vanilla")
    assert row["mprt_spearman"] == pytest.approx(payload["mprt"]["curves"]["vanilla"]["saliency"][-1])


def test_stage_payload_round_trips_through_weights_only_load(stage, tmp_path):
    payload, _ = stage
    path = tmp_path / "p.pt"
    torch.save(payload, path)
    back = torch.load(path, weights_only=True)
    assert back["rows"] == payload["rows"]
    assert torch.equal(back["maps"]["vanilla"]["gradcam"], payload["maps"]["vanilla"]["gradcam"])


def _decoy_mass_holds(payload, factor: float) -> None:
    mass = {(r["model"], r["method"]): r["decoy_mass"] for r in payload["rows"]}
    chance = 16 / 784
    assert payload["chance"] == pytest.approx(chance)
    for method in ("gradient_x_input", "integrated_gradients"):
        assert mass[("vanilla", method)] > factor * chance, method
        assert mass[("vanilla", method)] > 1.5 * mass[("clean", method)], method


def test_stage_the_vanilla_model_points_at_the_decoy(stage):
    """Trained on decoy data (two epochs on 216 images), the vanilla model's gradient × input and
    IG maps put more than 1.5× chance (16/784) of their positive mass on the patch, and 1.5× what
    the clean model's maps put there (measured: about 2.3× chance and 2.6× the clean model)."""
    _decoy_mass_holds(stage[0], 1.5)


@pytest.mark.slow
def test_full_case_the_vanilla_model_points_at_the_decoy(casebook_cache):
    """On the full case study the shortcut is plain: gradient × input and IG put over 5× chance of
    their positive mass on the patch for the vanilla model (measured: about 10×)."""
    from core.casestudy import CaseStudy

    study = CaseStudy.open("decoy-mnist", cache_dir=casebook_cache, device="cpu")
    study.build(stages=["representations"])
    _decoy_mass_holds(study.artifact("representations"), 5.0)



# ----------------------------------------------------------------------------- the page

PAGE = str(Path(__file__).resolve().parents[1] / "chapters" / "representations.py")
APP = str(Path(__file__).resolve().parents[1] / "app.py")


class _StubStudy:
    """What the page touches of a case study, with the stage's payload prebuilt (or not)."""

    def __init__(self, payload, built: bool = True):
        self.payload, self.built, self.builds = payload, built, []
        self.config = SimpleNamespace(name="stub-case", title="stub", representations={})

    def status(self):
        return {"data": True, "models": True, "experts": True, "representations": self.built,
                "corrections": False}

    def artifact(self, stage):
        return self.payload if stage == "representations" and self.built else None

    def report(self):
        return {"models": {"vanilla": {"decoy_test_acc": 0.7, "clean_test_acc": 0.6},
                           "clean": {"decoy_test_acc": 0.95, "clean_test_acc": 0.96}}}

    def build(self, stages=None, force=False, progress=None):
        self.builds.append(list(stages))
        for k in range(3):
            progress("representations", k, 2, "stub")
        self.built = True


def _clear_streamlit_caches():
    import streamlit as st

    import ui

    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()


@pytest.fixture
def stub_page(stage, monkeypatch):
    import ui

    payload, _ = stage
    study = _StubStudy(payload)
    monkeypatch.setattr(ui, "current_study", lambda: study)
    monkeypatch.setenv("CASEBOOK_CASE", "stub-case")
    _clear_streamlit_caches()
    yield study
    _clear_streamlit_caches()


def test_page_draws_maps_table_charts_and_narrative(stub_page):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    charts = at.get("vega_lite_chart")
    assert len(charts) == 3  # metrics per method, deletion/insertion, MPRT over layers
    table = next(d.value for d in at.dataframe if "Decoy mass ↓" in d.value.columns)
    assert len(table) == 2 * len(METHODS)
    assert {"Insertion AUC ↑", "MPRT Spearman ↓", "Sparseness (Gini) ↑"} <= set(table.columns)
    text = "\n".join(m.value for m in at.markdown)
    rows = stub_page.payload["rows"]
    vm = {r["method"]: r["decoy_mass"] for r in rows if r["model"] == "vanilla"}
    cm = {r["method"]: r["decoy_mass"] for r in rows if r["model"] == "clean"}
    best = max(vm, key=lambda m: vm[m] - cm[m])
    assert f"**{METHODS[best].label}** exposes the shortcut best" in text  # read from the rows
    sim = {r["method"]: r["mprt_spearman"] for r in rows if r["model"] == "vanilla"}
    assert f"**{METHODS[max(sim, key=sim.get)].label}** stays the most similar" in text
    assert len(at.get("download_button")) >= 1
    assert len(at.image) >= 1 + len(METHODS)  # the first image row: image + every method


def test_page_offers_to_build_the_missing_stage(stage, monkeypatch):
    import ui

    payload, _ = stage
    study = _StubStudy(payload, built=False)
    monkeypatch.setattr(ui, "current_study", lambda: study)
    monkeypatch.setenv("CASEBOOK_CASE", "stub-case")
    _clear_streamlit_caches()
    try:
        at = AppTest.from_file(PAGE, default_timeout=120).run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.get("vega_lite_chart")
        at.button(key="build-representations").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert study.builds == [["representations"]]
        assert len(at.get("vega_lite_chart")) == 3
    finally:
        _clear_streamlit_caches()


def test_page_in_the_app_on_the_small_case_study(stage, small_study, casebook_cache, monkeypatch):
    """Through app.py's navigation, on the shared small case study (tests/conftest.py)."""
    monkeypatch.setenv("CASEBOOK_CACHE", str(casebook_cache))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear_streamlit_caches()
    try:
        at = AppTest.from_file(APP, default_timeout=300).run()
        at.switch_page("chapters/representations.py").run()
        assert not at.exception, [e.value for e in at.exception]
        assert len(at.get("vega_lite_chart")) == 3
        assert any("Decoy mass ↓" in d.value.columns for d in at.dataframe)
    finally:
        _clear_streamlit_caches()


def test_build_rejects_a_malformed_config_section():
    def ctx(section):  # no data and no model: the section is checked before either is read
        return StageContext.standalone("representations", None, {"vanilla": None}, section=section)

    with pytest.raises(ValueError, match="unknown method"):
        build(ctx({"methods": ["saliency", "lime"]}))
    with pytest.raises(ValueError, match="unknown key"):
        build(ctx({"n_image": 5}))
    with pytest.raises(ValueError, match="target"):
        build(ctx({"target": "logit"}))


def test_internal_influence_with_the_path_doi_ranks_experts_in_attribution_space(batch):
    from core.engine.distributions import LinearDoI
    from core.engine.experts import experts

    x, y = batch
    m = tiny_cnn()
    torch.manual_seed(2)
    rx, ry = torch.rand(8, 1, 28, 28), torch.tensor([0, 3] * 4)
    sel = (y == 0) | (y == 3)
    _, info = attribute(m, x[sel], y[sel], "internal_influence", reference=(rx, ry), layer="fc1", k=3,
                        path_resolution=4, return_info=True)
    for c in (0, 3):
        want = experts(m, rx[ry == c], "fc1", ClassQoI(c), LinearDoI(4), k=3, multiply=True)
        got = next(i for i in info["classes"] if i["class"] == c)
        assert got["units"] == want.units
        assert got["scores"] == pytest.approx([e.score for e in want.experts], rel=1e-5)


def test_reindexed_doi_keeps_the_quadrature_weights_and_per_example_baselines():
    """A DoI seen through attribute()'s index map computes what the DoI itself does: the
    quadrature's weights and a per-example baseline follow along (found by the engine review)."""
    from core.engine.distributions import LinearDoI
    from core.engine.influence import influence
    from core.methods.attribution import _Reindexed

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    base = torch.randn(5, 4)
    for doi in (LinearDoI(4, method="gausslegendre"), LinearDoI(3, baseline=base)):
        want = influence(net, x, None, ClassQoI(1), doi, per_input=True, multiply=True)
        got = influence(net, x, None, ClassQoI(1), _Reindexed(doi, torch.arange(5)),
                        per_input=True, multiply=True)
        torch.testing.assert_close(got, want)


def test_stage_method_rows_name_the_layers_the_build_used(stage):
    payload, _ = stage
    rows = {m["method"]: m for m in payload["methods"]}
    options = payload["config"]["options"]
    assert rows["gradcam"]["slice"] == options["gradcam"]["layer"] == "relu2"
    assert rows["internal_influence"]["slice"] == options["internal_influence"]["layer"]
    assert rows["saliency"]["slice"] == "input"


def test_layer_methods_default_to_the_model_not_to_a_built_in_case(batch):
    from core.methods.attribution import gradcam_layer

    x, y = batch
    m = tiny_cnn()
    mods = list(m.named_modules())
    assert gradcam_layer([n for n, _ in mods], {n: type(v).__name__ for n, v in mods}) == "relu2"
    assert torch.equal(attribute(m, x, y, "gradcam"), attribute(m, x, y, "gradcam", layer="relu2"))
    no_conv = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    assert gradcam_layer(["", "0", "1"], {"": "Sequential", "0": "Flatten", "1": "Linear"}) is None
    with pytest.raises(ValueError, match="convolutional layer"):
        attribute(no_conv, x, y, "gradcam")
    with pytest.raises(ValueError, match="needs layer="):
        attribute(m, x, y, "internal_influence")
