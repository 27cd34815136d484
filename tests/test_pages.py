"""The report's pages under Streamlit's AppTest, on the small prebuilt case study.

Every page the report app owns (and the entrypoint's sidebar) runs without an exception and draws
what it promises; changing a widget changes the view; the URL's query parameters reopen a view;
missing results and failures show readable messages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import ui

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TIMEOUT = 120


def _cache_dir(study) -> str:
    for attr in ("cache_dir", "root"):
        value = getattr(study, attr, None)
        if value is not None:
            return str(value)
    cache = getattr(study, "cache", None)
    for attr in ("root", "path", "directory", "dir"):
        value = getattr(cache, attr, None)
        if value is not None:
            return str(value)
    raise AttributeError("cannot tell where the small study's cache lives")


def _clear() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()
    ui._GENERATION.clear()


def _factory(small_study, monkeypatch):
    """A factory of AppTests on the small prebuilt case (env points the app at it), caches cleared."""
    monkeypatch.setenv("CASEBOOK_CACHE", _cache_dir(small_study))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()

    def make(page: str | None = None, **params) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        for key, value in params.items():
            at.query_params[key] = str(value)
        at.run()
        if page is not None:
            at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return make


@pytest.fixture
def app(small_study, monkeypatch):
    yield _factory(small_study, monkeypatch)
    _clear()


def _texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown) + "\n".join(c.value for c in at.caption)


# ---------------------------------------------------------------------------------------------- app.py


def test_sidebar_offers_case_model_device_and_cache_status(app, small_study):
    at = app()
    case = at.sidebar.selectbox(key="qp-case")
    assert case.value == small_study.config.name
    assert small_study.config.name in case.options
    assert at.sidebar.selectbox(key="qp-model").value == "vanilla"
    facts = small_study.case_facts()
    assert {ui.model_label("vanilla", facts=facts), ui.model_label("clean", facts=facts)} <= set(
        at.sidebar.selectbox(key="qp-model").options)
    assert at.sidebar.selectbox(key="qp-device").value in ("cpu", "cuda")
    status = "\n".join(m.value for m in at.sidebar.markdown)
    built = small_study.status()
    for stage in ui.STAGES:
        assert stage in status
    assert f"{sum(map(bool, built.values()))}/{len(ui.STAGES)} stages built" in "\n".join(
        c.value for c in at.sidebar.caption)
    # The default page is the case study.
    assert at.title[0].value


def test_unknown_case_is_a_readable_error_not_a_traceback(app):
    at = app(case="no-such-case")
    assert not at.exception
    assert any("no-such-case" in e.value for e in at.error)
    # The rest of the app stays usable: the method page needs no case study.
    at.switch_page("chapters/method.py").run()
    assert not at.exception
    assert at.title[0].value == "Method"


# ---------------------------------------------------------------------------------------------- case study


def test_case_study_page_draws_samples_table_chart_from_the_report(app, small_study):
    at = app("chapters/case_study.py")
    assert [h.value for h in at.header] == ["The images", "What the models learned", "What the gap means"]
    assert len(at.image) >= 6  # train and test: with patch, outlined, clean
    assert len(at.image[0].proto.imgs) == 8
    assert len(at.get("vega_lite_chart")) == 1
    rep = small_study.report()
    table = at.dataframe[0].value.set_index("model")
    for name, accs in rep["models"].items():
        for key, label in [("train_acc", "train"), ("decoy_test_acc", "decoy test"),
                           ("clean_test_acc", "clean test")]:
            assert table.loc[name, label] == pytest.approx(accs[key])
    text = _texts(at)
    van, cln = rep["models"]["vanilla"], rep["models"]["clean"]
    assert ui.pct(van["decoy_test_acc"]) in text and ui.pct(cln["decoy_test_acc"]) in text
    assert at.metric[2].value == ui.pp(cln["decoy_test_acc"] - van["decoy_test_acc"])
    assert {b.proto.label for b in at.get("download_button")} >= {
        "Download the table (CSV)", "Download the report (JSON)"}


# ---------------------------------------------------------------------------------------------- influence


def _layer(small_study) -> str:
    return small_study.report()["experts"]["layer"]


def test_influence_page_shows_experts_interpretations_and_reading(app, small_study):
    at = app("chapters/influence.py")
    layer = _layer(small_study)
    assert at.header[0].value == f"Experts of {layer} for class 0"
    other = ui.model_label("clean", facts=small_study.case_facts())
    assert [h.value for h in at.header[1:]] == ["What each expert looks at", "One expert up close",
                                                f"The same view of {other}", "How to read this"]
    assert len(at.get("vega_lite_chart")) >= 1
    view = small_study.experts("vanilla", layer, 0)
    table = at.dataframe[0].value
    assert table["unit"].tolist() == [r["unit"] for r in sorted(view["rows"], key=lambda r: r["rank"])]
    assert table["decoy_mass"].tolist() == pytest.approx([r["decoy_mass"] for r in
                                                         sorted(view["rows"], key=lambda r: r["rank"])])
    n_experts, n_images = view["maps"].shape[:2]
    # one row of interpretations per expert, plus the close-up (image, mask, heatmap), then the
    # reference's same view (its experts of the layer on its images of the class)
    twin = small_study.experts("clean", layer, 0)
    assert len(at.image) == n_experts + 3 + twin["maps"].shape[0]
    assert all(len(img.proto.imgs) == n_images for img in at.image)
    assert all(i.caption.startswith("clean: unit") for img in at.image[n_experts + 3:]
               for i in img.proto.imgs)
    # the close-up's image row shades the region
    assert all("decoy patch shaded red" in i.caption for i in at.image[n_experts].proto.imgs)
    assert "decoy mass" in _texts(at)
    # a zero-width bootstrap interval is named as degenerate, never read as stability (issue 22)
    rows = view["rows"]
    zero = sum(1 for r in rows if r.get("ci_low") is not None and r.get("ci_high") is not None
               and abs(r["ci_high"] - r["ci_low"]) <= 1e-12)
    text = _texts(at)
    assert ("zero-width" in text) == (zero > 0)
    # ... and said where the intervals are drawn (under the chart), not only in "How to read this"
    assert any("zero-width" in c.value and "degenerate" in c.value for c in at.caption) == (zero > 0)
    if zero == len(rows):
        assert "stay in the top" not in text


def test_another_class_changes_the_view_and_the_url(app, small_study):
    at = app("chapters/influence.py")
    before = at.dataframe[0].value.copy()
    images_before = [i.url for i in at.image[0].proto.imgs]
    at.selectbox(key="qp-cls").select(1).run()
    assert not at.exception
    after = at.dataframe[0].value
    expected = small_study.experts("vanilla", _layer(small_study), 1)
    assert after["unit"].tolist() == [r["unit"] for r in sorted(expected["rows"], key=lambda r: r["rank"])]
    assert not before.equals(after)
    assert [i.url for i in at.image[0].proto.imgs] != images_before
    assert at.query_params["cls"] == "1"
    assert at.header[0].value.endswith("for class 1")


def test_a_page_opened_first_still_runs_through_the_entrypoint(app, small_study):
    # The chapters live in chapters/ (not pages/), so Streamlit's old multipage mode never runs a
    # chapter alone: the sidebar and the navigation are there on the first run.
    at = app("chapters/influence.py", model="clean")
    assert at.sidebar.selectbox(key="qp-model").value == "clean"
    assert at.sidebar.selectbox(key="qp-case").value == small_study.config.name
    assert at.header[0].value.startswith("Experts of")


def test_a_deep_link_reopens_the_same_view(app, small_study):
    layer = _layer(small_study)
    view = small_study.experts("clean", layer, 2)
    unit = sorted(view["rows"], key=lambda r: r["rank"])[1]["unit"]
    at2 = app("chapters/influence.py", model="clean", cls=2, layer=layer, expert=unit, view="heatmap")
    # The page ran through app.py: the shared sidebar is there, set from the URL.
    assert at2.sidebar.selectbox(key="qp-model").value == "clean"
    assert f"Model **{ui.model_label('clean', facts=small_study.case_facts())}**" in _texts(at2)
    assert at2.selectbox(key="qp-cls").value == 2
    assert at2.selectbox(key="qp-expert").value == unit
    assert at2.radio(key="qp-view").value == "heatmap"
    assert at2.dataframe[0].value["unit"].tolist() == [
        r["unit"] for r in sorted(view["rows"], key=lambda r: r["rank"])]


def test_damp_this_unit_shows_the_class_before_and_after(app, small_study):
    at = app("chapters/influence.py")
    layer = _layer(small_study)
    unit = at.selectbox(key="qp-expert").value
    assert at.button(key="damp-unit").label == "Damp this unit"
    assert not any("damped (mean fill)" in c.value for c in at.caption)
    at.button(key="damp-unit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    line = next(c.value for c in at.caption if "damped (mean fill)" in c.value)
    assert f"Unit {unit} damped" in line and "accuracy" in line and "mean logit" in line
    assert "One random unit instead" in line
    labels = [m.label for m in at.metric]
    assert "accuracy on 0" in labels and "mean logit of 0" in labels
    # The numbers are core's: the same ablation computed directly.
    import torch

    from core.stages import essence

    data = small_study.data()
    split = data.evaluation_sets[data.headline]
    x, y = split.x[:2000], split.y[:2000]
    fill_from = data.train.x[data.train.y == 0][:256]
    with torch.no_grad():
        want = essence.ablation(small_study.model("vanilla"), layer, [unit], x, y, 0, fill="mean",
                                fill_from=fill_from)
    acc = next(m for m in at.metric if m.label == "accuracy on 0")
    assert acc.value == ui.pct(want["acc_after"])
    # A rerun (another widget) keeps the result, from the cache.
    at.radio(key="qp-view").set_value("heatmap").run()
    assert any(f"Unit {unit} damped" in c.value for c in at.caption)


def test_comparative_quantity_is_computed_on_request(app, small_study):
    at = app("chapters/influence.py")
    at.radio(key="qp-quantity").set_value("comparative").run()
    at.selectbox(key="qp-vs").select(8).run()
    assert not at.exception
    qoi, doi = {"kind": "comparative", "a": 0, "b": 8}, {"kind": "class-images"}
    if not small_study.has_experts_for("vanilla", _layer(small_study), qoi, doi):
        assert [b.label for b in at.button] == ["Compute"]
        assert not at.dataframe  # nothing drawn until asked
        at.button(key="compute-experts").click().run()
        assert not at.exception, [e.value for e in at.exception]
    assert at.header[0].value.endswith("for 0 rather than 8")
    assert small_study.has_experts_for("vanilla", _layer(small_study), qoi, doi)
    expected = small_study.experts_for("vanilla", _layer(small_study), qoi, doi)
    assert at.dataframe[0].value["unit"].tolist() == [
        r["unit"] for r in sorted(expected["rows"], key=lambda r: r["rank"])]
    assert at.query_params["quantity"] == "comparative" and at.query_params["vs"] == "8"


def test_a_corrected_model_from_the_sidebar_is_explained_on_request(app, small_study):
    corrections = small_study.report().get("corrections") or []
    if not corrections:
        pytest.skip("the small study has no corrections built")
    name = corrections[0]["model"]
    at = app(model=name)
    model_box = at.sidebar.selectbox(key="qp-model")
    assert model_box.value == name
    label = ui.model_label(name, {name: corrections[0]["label"]}, small_study.case_facts())
    assert label in model_box.options
    at.switch_page("chapters/influence.py").run()
    assert not at.exception
    layer = _layer(small_study)
    qoi, doi = {"kind": "class", "class": 0}, {"kind": "class-images"}
    if not small_study.has_experts_for(name, layer, qoi, doi):
        assert corrections[0]["label"] in at.info[0].value
        at.button(key="compute-experts").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
    expected = small_study.experts_for(name, layer, qoi, doi)
    assert at.dataframe[0].value["unit"].tolist() == [
        r["unit"] for r in sorted(expected["rows"], key=lambda r: r["rank"])]
    # one row per expert and the close-up, then the reference's same view
    twin = small_study.experts(small_study.reference, layer, 0)
    assert len(at.image) == len(expected["rows"]) + 3 + len(twin["rows"])


# ---------------------------------------------------------------------------------------------- method


def test_method_page_has_theory_table_and_references(app):
    at = app("chapters/method.py")
    assert at.title[0].value == "Method"
    assert len(at.latex) >= 8
    engine = at.dataframe[0].value
    assert "Integrated Gradients" in engine["representation"].tolist()
    assert list(engine.columns) == ["representation", "slice", "quantity (QoI)", "distribution (DoI)",
                                    "multiplier"]
    refs = _texts(at)
    for ref in ("1802.03788", "1703.03717", "1912.11425", "1810.03292", "1806.07421"):
        assert ref in refs


# ---------------------------------------------------------------------------------------------- building


def _build_script():
    import streamlit as st

    import ui

    class Study:
        def __init__(self, fail):
            self.fail, self.calls = fail, []

        def status(self):
            return {s: False for s in ui.STAGES}

        def build(self, stages=None, force=False, progress=None):
            progress(stages[0], 1, 2, "half way")
            if self.fail:
                raise RuntimeError("the GPU caught fire")

    ok = ui.build_missing(Study(st.session_state.get("fail", True)), ["models"])
    st.write(f"result: {ok}")


def test_build_missing_shows_a_readable_error(monkeypatch):
    _clear()
    at = AppTest.from_function(_build_script, default_timeout=30)
    at.session_state["fail"] = True
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == ["RuntimeError: the GPU caught fire"]
    assert at.markdown[-1].value == "result: False"
    assert at.get("status") or at.get("expandable")
    at.session_state["fail"] = False
    at.run()
    assert not at.error and at.markdown[-1].value == "result: True"


def test_missing_results_are_offered_and_built_from_the_page(app, tmp_path, monkeypatch):
    # An empty cache: nothing is built. The page explains, offers the build, and draws after it.
    monkeypatch.setenv("CASEBOOK_CACHE", str(tmp_path / "empty"))
    at = app("chapters/case_study.py")
    assert any("**data**" in i.value and "not built yet" in i.value for i in at.info)
    assert not at.image and not at.get("vega_lite_chart")
    at.button(key="build-data").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.image) >= 6  # the sample images are drawn now
    assert any("**models**" in i.value for i in at.info)  # the next stage is offered, not built
    assert [b.label for b in at.button] == ["Build models"]
    # The other pages stay usable.
    at.switch_page("chapters/method.py").run()
    assert not at.exception and at.title[0].value == "Method"


# ---------------------------------------------------------------------------------------------- user cases
# The same chapters for a user's case: the example folder case of core.cases.newcase (3 RGB classes,
# 48×48, a "mark" region, a reference model), and a variant without region and reference.

EXAMPLE_EXPERTS = """
[experts]
layers = ["conv1", "fc1"]
k = 2
bootstrap = 5
n_images = 2
resolution = 4
"""


def _drop_section(text: str, header: str) -> str:
    """``text`` without the TOML section ``header`` (up to the next section)."""
    out, skip = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skip = line.split("#")[0].strip() == header
        if not skip:
            out.append(line)
    return "\n".join(out) + "\n"


def write_user_cases(root: Path) -> dict[str, Path]:
    """Two user cases under ``root`` (the folder $CASEBOOK_CASES names): ``shapes`` (the example as
    written, trained briefly) and ``plain`` (no [region], one model)."""
    import shutil
    import subprocess
    import sys

    from core.cases.newcase import write_example

    shapes = root / "shapes"
    write_example(shapes)
    subprocess.run([sys.executable, "make_images.py"], cwd=shapes, check=True, capture_output=True)
    toml = (shapes / "case.toml").read_text()
    toml = toml.replace("training = { epochs = 20 }", "training = { epochs = 2 }")
    toml = toml.replace("epochs = 30", "epochs = 2") + EXAMPLE_EXPERTS
    (shapes / "case.toml").write_text(toml)
    plain = root / "plain"
    shutil.copytree(shapes, plain)
    text = _drop_section(_drop_section(toml, "[region]"), "[models.reference]")
    (plain / "case.toml").write_text(text.replace('title = "Example: shapes with a planted mark"',
                                                  'title = "Shapes without a region"'))
    return {"shapes": shapes, "plain": plain}


@pytest.fixture(scope="session")
def user_cases(tmp_path_factory, casebook_cache):
    """Both user cases with data, models and experts built in the session's cache."""
    from core.casestudy import CaseStudy

    root = tmp_path_factory.mktemp("user-cases")
    write_user_cases(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASEBOOK_CASES", str(root))
        studies = {}
        for name in ("shapes", "plain"):
            s = CaseStudy.open(name, cache_dir=casebook_cache, device="cpu", allow_path=False)
            s.build(stages=["data", "models", "experts"])
            studies[name] = s
        yield root, studies


@pytest.fixture
def user_app(user_cases, casebook_cache, monkeypatch):
    root, studies = user_cases
    monkeypatch.setenv("CASEBOOK_CASES", str(root))
    monkeypatch.setenv("CASEBOOK_CACHE", str(casebook_cache))
    _clear()

    def make(case: str, page: str | None = None, **params) -> AppTest:
        monkeypatch.setenv("CASEBOOK_CASE", case)
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        for key, value in params.items():
            at.query_params[key] = str(value)
        at.run()
        if page is not None:
            at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield make, studies
    _clear()


CHAPTERS = ["chapters/case_study.py", "chapters/influence.py", "chapters/representations.py",
            "chapters/corrections.py", "chapters/essence.py", "chapters/detection.py", "chapters/method.py",
            "chapters/suspects.py"]


def test_user_case_is_listed_and_its_models_are_offered(user_app):
    make, studies = user_app
    at = make("shapes")
    case = at.sidebar.selectbox(key="qp-case")
    assert case.value == "shapes" and {"shapes", "plain", "decoy-mnist-small"} <= set(case.options)
    facts = studies["shapes"].case_facts()
    assert at.sidebar.selectbox(key="qp-model").options == [
        ui.model_label("vanilla", facts=facts), ui.model_label("reference", facts=facts)]
    assert at.title[0].value == "Example: shapes with a planted mark"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_draws_for_the_user_case(user_app, chapter):
    make, _ = user_app
    at = make("shapes", chapter)
    assert at.title[0].value
    assert not at.error, [e.value for e in at.error]
    if not Path(ROOT / chapter).exists():
        return
    text = _texts(at)
    for word in ("vanilla (trained with the decoy)", "decoy test", "16/784", "digit"):
        assert word not in text


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_draws_for_a_case_without_region_or_reference(user_app, chapter):
    make, _ = user_app
    at = make("plain", chapter)
    assert at.title[0].value
    assert not at.error, [e.value for e in at.error]
    assert not any("shortcut" in str(d.value.columns) for d in at.dataframe)
    assert len(at.sidebar.selectbox(key="qp-model").options) == 1


def test_user_case_chapter_one_shows_classes_region_and_sets(user_app):
    make, studies = user_app
    at = make("shapes", "chapters/case_study.py")
    facts = studies["shapes"].case_facts()
    assert [h.value for h in at.header] == ["The images", "What the models learned", "What the gap means"]
    # train and test: the images and the same with the mark tinted (no region-free copies here)
    assert len(at.image) == 4 and len(at.image[0].proto.imgs) == 8
    captions = [i.caption for img in at.image for i in img.proto.imgs]
    assert any(c.endswith(tuple(facts["classes"])) for c in captions)
    assert any("mark tinted red" in c for c in captions)
    rep = studies["shapes"].report()
    table = at.dataframe[0].value.set_index("model")
    assert list(table.columns) == ["train", "val", "test"]
    for name, accs in rep["models"].items():
        assert table.loc[name, "test"] == pytest.approx(accs["test_acc"])
    van, ref = rep["models"]["vanilla"], rep["models"]["reference"]
    assert at.metric[2].value == ui.pp(ref["test_acc"] - van["test_acc"])
    assert "**mark**" in _texts(at)


def test_user_case_influence_names_classes_region_and_thresholds(user_app):
    make, studies = user_app
    at = make("shapes", "chapters/influence.py")
    assert at.header[0].value == "Experts of conv1 for class circle"
    assert at.selectbox(key="qp-cls").options == ["circle", "square", "triangle"]
    view = studies["shapes"].experts("vanilla", "conv1", 0)
    table = at.dataframe[0].value
    assert table["unit"].tolist() == [r["unit"] for r in sorted(view["rows"], key=lambda r: r["rank"])]
    assert table["region_mass"].tolist() == pytest.approx(
        [r["region_mass"] for r in sorted(view["rows"], key=lambda r: r["rank"])])
    assert table["threshold"].tolist() == pytest.approx([view["threshold"]] * len(table))
    verdicts = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert len(verdicts) == len(view["rows"]) and all("threshold" in v for v in verdicts)
    n_experts, n_images = view["maps"].shape[:2]
    twin = studies["shapes"].experts("reference", "conv1", 0)  # the reference's same view
    assert len(at.image) == n_experts + 3 + twin["maps"].shape[0]
    at.selectbox(key="qp-cls").select(2).run()
    assert not at.exception and at.header[0].value == "Experts of conv1 for class triangle"


def test_a_case_without_region_has_no_verdicts_and_says_why(user_app):
    make, studies = user_app
    at = make("plain", "chapters/influence.py")
    table = at.dataframe[0].value
    assert {"region_mass", "threshold", "carries shortcut"}.isdisjoint(table.columns)
    assert "no region" in _texts(at)
    assert not any("carries the shortcut" in m.value or "does not carry" in m.value for m in at.markdown)
    at = make("plain", "chapters/case_study.py")
    assert at.header[-1].value == "What the accuracy says"
    assert len(at.image) == 2  # no tinted region, no region-free copies
    assert "no reference model" in _texts(at)
    at = make("plain", "chapters/corrections.py")
    assert any("no region" in i.value for i in at.info)


def test_images_are_shown_in_colour_and_enlarged(user_app):
    make, studies = user_app
    s = studies["shapes"].samples("test", 2)
    assert s["x"].shape == (2, 48, 48, 3)
    big = ui.picture(s["x"][0], ui.scale_for([48, 48]))
    assert big.shape == (144, 144, 3) and big.dtype.name == "uint8"
    assert (big[..., 0] != big[..., 1]).any()  # colour kept, not grey
    gray = ui.picture(np.full((28, 28), 0.5), ui.scale_for([28, 28]))
    assert gray.shape == (140, 140, 3) and (gray == 128).all()
    tinted = ui.tinted(s["x"][0], np.ones((48, 48), bool), 1)
    assert tinted.shape == (48, 48, 3) and (tinted[..., 0] >= tinted[..., 2]).all()


# ---------------------------------------------------------------------------------------------- ?case=


@pytest.mark.parametrize("asked", ["/dev/zero", "../../etc/passwd", "[x](http://evil.example)", "**bold**",
                                   "a" * 500])
def test_an_unknown_case_in_the_url_is_one_plain_line_and_the_default_case(app, small_study, asked):
    at = app(case=asked)
    assert not at.exception
    assert len(at.error) == 1
    message = at.error[0].value
    assert "\n" not in message and len(message) < 200
    assert "/dev" not in message and "etc/passwd" not in message and "](http" not in message
    assert "**bold**" not in message
    assert at.sidebar.selectbox(key="qp-case").value == small_study.config.name
    assert at.query_params["case"] == [small_study.config.name] or at.query_params["case"] == \
        small_study.config.name
    assert at.title[0].value  # the default case's first chapter drew


def test_the_app_opens_cases_by_name_only(monkeypatch, small_study):
    calls = []
    from core.casestudy import CaseStudy

    real = CaseStudy.open.__func__

    def spy(cls, case, *args, **kwargs):
        calls.append((case, kwargs.get("allow_path")))
        return real(cls, case, *args, **kwargs)

    monkeypatch.setattr(CaseStudy, "open", classmethod(spy))
    _clear()
    with pytest.raises(Exception, match="unknown case"):
        ui.open_study("/dev/zero", "cpu")
    assert calls == []  # never even asked core for a name that is not listed
    ui.open_study(small_study.config.name, "cpu")
    assert calls and all(allow is False for _, allow in calls)
    _clear()


# ---------------------------------------------------------------------------------------------- essence


def test_essence_chapter_offers_the_build_then_draws_curves_and_tables(small_study, monkeypatch, tmp_path):
    if not ui.stage_exists("essence"):
        pytest.skip("core.stages.essence is not there")
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(small_study.cache_dir, cache)  # the shared cache keeps essence unbuilt
    monkeypatch.setenv("CASEBOOK_CACHE", str(cache))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    _clear()
    try:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
        at.switch_page("chapters/essence.py").run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.title[0].value == "Essence & causal check"
        assert any("**essence**" in i.value for i in at.info) and not at.get("vega_lite_chart")
        at.button(key="build-essence").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert len(at.get("vega_lite_chart")) == 1
        headers = [h.value for h in at.header]
        assert headers[:2] == ["Essence: how few units separate two classes?",
                               "Causal check: remove a class's experts"]
        from core.casestudy import CaseStudy

        payload = CaseStudy.open(small_study.config.name, cache_dir=cache, device="cpu").artifact("essence")
        layer, fill = at.selectbox(key="qp-elayer").value, at.radio(key="qp-efill").value
        mine = [r for r in payload["rows"] if r["layer"] == layer and r["fill"] == fill]
        smallest = at.dataframe[0].value
        assert smallest["top experts"].tolist() == [r["k_top"] for r in mine]
        assert smallest["random (median)"].tolist() == [r["k_random"] for r in mine]
        ablation = at.dataframe[1].value
        rows = [r for r in payload["ablation"] if r["layer"] == layer and r["fill"] == fill]
        assert ablation["class"].tolist() == [r["class_name"] for r in rows]
        assert ablation["accuracy drop (experts)"].tolist() == pytest.approx(  # in pp, as the
            [100 * r["experts"]["acc_drop"] for r in rows])  # random column beside it
        beats = [r["beats_random"] for r in rows if r["beats_random"] is not None]
        said = " ".join(w.value for w in at.warning) + _texts(at)
        if beats and sum(beats) <= len(beats) / 2:
            assert "do **not** beat random units" in said
        # another layer changes the view
        other = [x for x in at.selectbox(key="qp-elayer").options if x != layer][0]
        at.selectbox(key="qp-elayer").set_value(other).run()
        assert not at.exception and at.query_params["elayer"] == other
    finally:
        _clear()


# ---------------------------------------------------------------------------------------------- detection

DETECTION_PAYLOAD = {
    "rows": [
        {"detector": "max_softmax", "label": "max softmax", "attack": "patch", "auc": 0.61,
         "tpr_at": {0.01: 0.02, 0.05: 0.1, 0.25: 0.4}, "n_clean": 50, "n_attacked": 40,
         "fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.7, 1.0]},
        {"detector": "influence_path", "label": "influence (path)", "attack": "patch", "auc": 0.83,
         "tpr_at": {"0.01": 0.2, "0.05": 0.45, "0.25": 0.8}, "n_clean": 50, "n_attacked": 40},
        {"detector": "influence_path", "label": "influence (path)", "attack": "adaptive", "auc": 0.7,
         "tpr_at": {0.01: 0.1, 0.05: 0.3, 0.25: 0.6}},
    ],
    "roc": {"influence_path": {"patch": {"fpr": [0.0, 0.1, 1.0], "tpr": [0.0, 0.6, 1.0]}}},
    "attack": {"knows": "weights and gradients, not the detector", "size": 12, "steps": 80},
    "attack_success": {"patch": 0.9},
}


class _StubStudy:
    def __init__(self, payload, built=True):
        from types import SimpleNamespace

        self.payload, self.built, self.builds = payload, built, []
        self.config = SimpleNamespace(name="stub-case", title="stub", experts={"layers": ["conv1"]})

    def status(self):
        return {s: s != "detection" or self.built for s in ui.STAGES} | {"detection": self.built}

    def artifact(self, stage):
        return self.payload if stage == "detection" and self.built else None

    def report(self):
        return {"models": {"net": {"test_acc": 0.9}}}

    def case_facts(self):
        return {"classes": ["face", "non-face"], "region": "watermark", "channels": 3, "size": [48, 48],
                "headline": "test", "evaluation_sets": ["test"], "training_sets": ["train"],
                "chance": 0.05, "region_alias": None, "subject": "onet", "reference": None,
                "models": ["onet"], "layers": ["conv1"], "title": "stub"}

    def build(self, stages=None, force=False, progress=None):
        self.builds.append(list(stages))
        progress("detection", 1, 1, "stub")
        self.built = True


@pytest.fixture
def stub(monkeypatch):
    def make(payload, built=True):
        study = _StubStudy(payload, built)
        monkeypatch.setattr(ui, "current_study", lambda: study)
        _clear()
        return study

    yield make
    _clear()


def test_detection_chapter_draws_roc_table_and_the_attacker(stub):
    stub(DETECTION_PAYLOAD)
    at = AppTest.from_file(str(ROOT / "chapters" / "detection.py"), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    assert [h.value for h in at.header] == ["What the attacker knows", "Detectors compared", "ROC curves"]
    table = at.dataframe[-1].value
    assert table["detector"].tolist() == ["max softmax", "influence (path)"]  # the first attack
    assert table["TPR at 1% FPR"].tolist() == pytest.approx([0.02, 0.2])
    assert table["TPR at 25% FPR"].tolist() == pytest.approx([0.4, 0.8])
    assert table["AUC"].tolist() == pytest.approx([0.61, 0.83])
    assert table["uses influence"].tolist() == ["no", "yes"]
    text = _texts(at)
    assert "weights and gradients, not the detector" in text and "90.0%" in text
    assert "**influence (path)** (AUC **0.830**)" in text and "beat the baselines" in text
    assert len(at.get("vega_lite_chart")) == 1
    at.radio(key="qp-attack").set_value("adaptive").run()
    assert not at.exception and at.dataframe[-1].value["AUC"].tolist() == pytest.approx([0.7])
    assert "ROC curves" in _texts(at) or any("no ROC curves" in i.value for i in at.info)


def test_detection_chapter_says_what_the_payload_lacks(stub):
    stub({"rows": [{"detector": "mahalanobis", "auc": 0.5}]})
    at = AppTest.from_file(str(ROOT / "chapters" / "detection.py"), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    missing = " ".join(c.value for c in at.caption)
    assert "ROC curves" in missing and "payload['attack']" in missing and "tpr_at" in missing
    assert at.dataframe[-1].value["AUC"].tolist() == [0.5]


def test_detection_chapter_offers_its_build(stub):
    study = stub(DETECTION_PAYLOAD, built=False)
    at = AppTest.from_file(str(ROOT / "chapters" / "detection.py"), default_timeout=TIMEOUT).run()
    assert not at.exception and not at.get("vega_lite_chart")
    at.button(key="build-detection").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert study.builds == [["detection"]] and len(at.get("vega_lite_chart")) == 1


def test_switching_case_resets_choices_the_new_case_lacks(user_app, small_study):
    make, _ = user_app
    at = make("decoy-mnist-small", "chapters/influence.py", model="clean", cls=7)
    assert at.selectbox(key="qp-cls").value == 7
    at.sidebar.selectbox(key="qp-case").set_value("shapes").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.info, [i.value for i in at.info]
    assert at.sidebar.selectbox(key="qp-model").value == "vanilla"
    assert at.selectbox(key="qp-cls").value == 0
    assert at.header[0].value == "Experts of conv1 for class circle"


def test_detection_chapter_reads_the_stage_payload_as_core_writes_it(stub):
    rng = np.random.default_rng(0)
    payload = {
        "rows": [{"detector": d, "uses_influence": inf, "layer": "conv1", "what": f"{d} score",
                  "auc": auc, "tpr_at_1": t1, "tpr_at_5": t5, "tpr_at_25": t25, "n_clean": 30,
                  "n_attacked": 20}
                 for d, inf, auc, t1, t5, t25 in [("max_softmax", False, 0.6, 0.0, 0.1, 0.3),
                                                  ("influence_combined", True, 0.9, 0.3, 0.6, 0.9)]],
        "roc": {"max_softmax": {"fpr": [0, 0.5, 1], "tpr": [0, 0.6, 1]},
                "influence_combined": {"fpr": [0, 0.1, 1], "tpr": [0, 0.8, 1]}},
        "features": [{"feature": "conv1 point", "auc": 0.8, "weight": 1.5}],
        "attack": {"size": 12, "steps": 80, "step_size": 0.05, "seed": 0, "model": "onet",
                   "success": {"overall": 0.75, "face": 0.8, "non-face": 0.7}, "n_held_out": 30,
                   "knows": "white box: the model's weights and gradients; not the detector"},
        "masking": {"recovered": 0.4, "clean_still_correct": 0.9, "clean_correct_before": 0.95,
                    "window": 12, "hits_patch": 0.6, "n_attacked": 20},
        "adaptive": {"success": 0.5, "weight": 1.0, "layer": "conv1",
                     "rows": [{"detector": "influence_combined", "uses_influence": True, "auc": 0.7,
                               "tpr_at_1": 0.1, "tpr_at_5": 0.2, "tpr_at_25": 0.5}]},
        "examples": {"x": rng.random((2, 3, 48, 48)), "x_clean": rng.random((2, 3, 48, 48)),
                     "patch": np.zeros((2, 1, 48, 48), bool), "y": np.array([0, 1]),
                     "pred": np.array([1, 0]), "expert_map": rng.normal(size=(2, 48, 48))},
    }
    stub(payload)
    at = AppTest.from_file(str(ROOT / "chapters" / "detection.py"), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if "AUC" in d.value.columns)
    assert table["TPR at 5% FPR"].tolist() == pytest.approx([0.1, 0.6])
    assert table["uses influence"].tolist() == ["no", "yes"]
    text = _texts(at)
    assert "white box" in text and "overall **75.0%**" in text and "**40.0%**" in text
    assert len(at.get("vega_lite_chart")) == 1
    assert len(at.image) == 1 and len(at.image[0].proto.imgs) == 6  # clean, attacked, experts × 2
    at.radio(key="qp-attack").set_value("adaptive attack").run()
    assert not at.exception
    table = next(d.value for d in at.dataframe if "AUC" in d.value.columns)
    assert table["AUC"].tolist() == pytest.approx([0.7])
    assert "50.0%" in _texts(at)
    # issue 22: the adaptive view shows nothing of the patch attack (its curves, masking,
    # features or images) and no "no ROC" box; with its own curves it draws them
    assert not at.get("vega_lite_chart") and not at.image
    heads = [h.value for h in at.header]
    assert "Masking where the experts point" not in heads and "Attacked images" not in heads
    assert not any("carries no ROC" in i.value for i in at.info)
    payload["adaptive"]["rows"][0]["roc"] = {"fpr": [0, 0.3, 1], "tpr": [0, 0.7, 1]}
    stub(payload)
    at = AppTest.from_file(str(ROOT / "chapters" / "detection.py"), default_timeout=TIMEOUT)
    at.query_params["attack"] = "adaptive attack"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("vega_lite_chart")) == 1 and "ROC curves" in [h.value for h in at.header]


# ------------------------------------------------------------------------------------ the HTML report


def test_sidebar_offers_the_html_report_made_on_click(app, small_study):
    at = app()
    buttons = [b for b in at.sidebar.get("download_button") if b.proto.label == "Download the report (HTML)"]
    assert len(buttons) == 1
    html_bytes = ui.report_html_bytes(small_study)
    assert html_bytes.startswith(b"<!DOCTYPE html>") and b"<table" in html_bytes


def test_a_report_that_cannot_be_made_is_one_escaped_line():
    class Broken:
        name = "broken"

        def report(self):
            raise RuntimeError("<script>x</script> in /srv/secret/cache/file.json")

    text = ui.report_html_bytes(Broken()).decode()
    assert "Could not make the report: RuntimeError: &lt;script&gt;" in text
    assert "<script>" not in text and "/srv/secret" not in text


def test_target_label_or_predicted_class_labels_each_tile_and_keeps_the_wrong_ones(app, small_study):
    import torch

    layer = _layer(small_study)
    data = small_study.data()
    facts = small_study.case_facts()
    found = None
    for model in ("vanilla", "clean"):
        net = small_study.model(model)
        for c in small_study.expert_classes():
            view = small_study.experts(model, layer, c)
            idx = torch.as_tensor(np.asarray(view["indices"]), dtype=torch.long)
            with torch.no_grad():
                pred = net(data.test.x[idx]).argmax(1).tolist()
            y = data.test.y[idx].tolist()
            if pred != y:
                found = (model, int(c), view, y, pred)
                break
        if found:
            break
    if found is None:
        pytest.skip("both small models get every interpreted test image right")
    model, c, view, y, pred = found
    n_experts, n_images = view["maps"].shape[:2]
    main = n_experts + 3  # one row per expert, then the close-up; the other model's view follows
    at = app("chapters/influence.py", model=model, cls=c)
    assert at.radio(key="qp-target").value == "label"
    arrows = [f"{ui.class_name(a, facts)} → {ui.class_name(b, facts)}" for a, b in zip(y, pred, strict=True)]
    for im in at.image[:main]:  # label: the class's own images, each with the model's prediction
        assert [i.caption.rsplit(" · ", 1)[-1] for i in im.proto.imgs] == arrows
    wrong = [k for k in range(n_images) if y[k] != pred[k]]
    assert f"**{len(wrong)} of {n_images}**" in _texts(at)

    at.checkbox(key="only-wrong").check().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["wrong"] == "1"
    for im in at.image[:main]:
        caps = [i.caption for i in im.proto.imgs]
        assert len(caps) == len(wrong) and all("→" in cap for cap in caps)
        assert [cap.rsplit(" · ", 1)[-1] for cap in caps] == [arrows[k] for k in wrong]
        assert all(f"image {k + 1}" in cap for k, cap in zip(wrong, caps, strict=True))
    at.checkbox(key="only-wrong").uncheck().run()
    assert not at.exception
    assert all(len(im.proto.imgs) == n_images for im in at.image[:main])
    assert "wrong" not in at.query_params

    # predicted class: the first test images the model predicts as c, whatever their label
    with torch.no_grad():
        all_pred = small_study.model(model)(data.test.x).argmax(1)
    want = (all_pred == c).nonzero().flatten()[:n_images].tolist()
    at.radio(key="qp-target").set_value("predicted").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["target"] == "predicted"
    got = small_study.experts_for(model, layer, {"kind": "class", "class": c}, {"kind": "class-images"},
                                  images="predicted")
    assert np.asarray(got["indices"]).tolist() == want
    assert [r["unit"] for r in got["rows"]] == [r["unit"] for r in view["rows"]]  # same experts
    labels_p = data.test.y[want].tolist()
    arrows_p = [f"{ui.class_name(a, facts)} → {ui.class_name(c, facts)}" for a in labels_p]
    for im in at.image[:main]:
        assert [i.caption.rsplit(" · ", 1)[-1] for i in im.proto.imgs] == arrows_p
    fooled = sum(a != c for a in labels_p)
    assert f"**{fooled} of {len(want)}**" in _texts(at)
    assert "predicted as" in _texts(at)


def test_heat_legend_runs_from_blue_through_white_to_red():
    legend = ui.heat_legend(width=101, height=3)
    assert legend.shape == (3, 101, 3) and legend.dtype == np.uint8
    assert legend[0, 0].tolist() == [0, 0, 255] and legend[0, -1].tolist() == [255, 0, 0]
    assert legend[0, 50].tolist() == [255, 255, 255]  # zero is white


def test_labelled_grid_keeps_the_tiles_and_adds_the_words():
    tiles = [[np.full((8, 8, 3), v, np.uint8) for v in (10, 20)], [np.full((8, 8, 3), 30, np.uint8)] * 2]
    plain = ui.image_grid(tiles)
    out = ui.labelled_grid(tiles, ["image", "unit 3 → x"], "model | layer", "legend −max")
    assert out.shape[0] > plain.shape[0] and out.shape[1] > plain.shape[1]
    # the grid sits unchanged below the title and right of the labels
    h, w = plain.shape[:2]
    found = any((out[y:y + h, x:x + w] == plain).all() for y in range(out.shape[0] - h + 1)
                for x in range(out.shape[1] - w + 1) if out[y + 4, x + 4, 0] == 10)
    assert found
    assert (out[:16] < 128).any()  # the title is drawn (dark ink on white)


def test_model_colors_are_stable_and_distinct():
    facts = {"subject": "vanilla", "reference": "clean"}
    a = ui.model_colors(["clean", "vanilla", "rrr"], facts)
    b = ui.model_colors(["vanilla", "rrr", "clean"], facts)
    assert a == b and len(set(a.values())) == 3
    assert a["vanilla"] == ui.PALETTE[0] and a["clean"] == ui.PALETTE[1]
    assert ui.model_colors(["x"], {"reference": "x"})["x"] == ui.PALETTE[1]


def test_heatmap_view_shows_the_colour_scale(app, small_study):
    at = app("chapters/influence.py", view="heatmap")
    assert not at.exception
    assert any(i.caption == ui.HEAT_SCALE_NOTE for im in at.image for i in im.proto.imgs)
    at = app("chapters/influence.py", view="mask")
    assert not any(i.caption == ui.HEAT_SCALE_NOTE for im in at.image for i in im.proto.imgs)


def test_the_model_choice_is_live_only_on_the_chapters_it_drives(app, small_study):
    at = app()  # the case-study chapter shows every model
    box = at.sidebar.selectbox(key="qp-model")
    assert box.disabled and "this chapter shows every model" in box.help
    at.switch_page("chapters/influence.py").run()
    box = at.sidebar.selectbox(key="qp-model")
    assert not box.disabled and "Influence & experts" in box.help
    box.set_value("clean").run()
    at.switch_page("chapters/case_study.py").run()
    assert at.sidebar.selectbox(key="qp-model").value == "clean"  # kept while greyed out
    at.switch_page("chapters/influence.py").run()
    assert at.sidebar.selectbox(key="qp-model").value == "clean"


@pytest.mark.parametrize("chapter", CHAPTERS + ["chapters/overview.py", "chapters/one_image.py"])
def test_no_heading_says_none_or_is_empty_without_a_reference(user_app, chapter):
    # issue 22: a case with no reference model drew "None" and empty headings
    make, studies = user_app
    assert studies["plain"].reference is None
    at = make("plain", chapter)
    heads = [h.value for kind in ("title", "header", "subheader") for h in at.get(kind)]
    heads += [e.label for e in at.expander] + [t.label for t in at.tabs]
    assert all(h and h.strip() for h in heads), heads
    assert not [h for h in heads if "None" in h], heads
    bold = [m.value for m in at.markdown if m.value.startswith("**") and m.value.endswith("**")]
    assert not [b for b in bold if "None" in b or not b.strip("* ")], bold
