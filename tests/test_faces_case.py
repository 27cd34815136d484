"""The faces case through the same seam a user's case goes through: a small variant of
core/cases/faces/faces.toml (fewer copies, one epoch, small expert settings) builds its data,
models and experts, and the report carries the pretrained detector, the watermark's effect, the
experts' region mass and their landmark check."""

from __future__ import annotations

import pytest

pytest.importorskip("skimage")

from faces_small import small_faces_toml  # noqa: E402

from core.cases.faces.onet import onet_weights_path  # noqa: E402
from core.casestudy import CaseStudy  # noqa: E402

try:
    onet_weights_path()
except ValueError:  # facenet-pytorch not installed: the case says how to install it
    pytest.skip("facenet-pytorch's onet.pt is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    text = small_faces_toml()
    folder = tmp_path_factory.mktemp("faces")
    path = folder / "faces-small.toml"
    path.write_text(text)
    study = CaseStudy.open(path, cache_dir=folder / "cache", device="cpu")
    study.build(["data", "models", "experts"])
    return study


def test_the_faces_report(faces):
    rep = faces.report()
    facts = rep["case_facts"]
    assert facts["classes"] == ["face", "non-face"] and facts["region"] == "watermark"
    assert facts["channels"] == 3 and facts["size"] == [48, 48]
    assert rep["subject"] == "watermarked" and rep["reference"] == "reference"
    models = rep["models"]
    assert list(models) == ["watermarked", "reference", "pretrained"]
    # the detector as it ships separates the held-out faces from non-faces (measured: all of them)
    assert models["pretrained"]["clean_test_acc"] >= 0.9
    for name in models:
        for key in ("clean_test_acc", "watermark_nonfaces_acc", "watermark_random_acc"):
            assert 0 <= models[name][key] <= 1
    e = rep["experts"]
    assert e["layers"] == ["onet.conv4", "onet.dense5"] and e["layer"] == "onet.dense5"
    assert all(0 <= r["region_mass"] <= 1 for r in e["top"] if r["region_mass"] is not None)
    checks = e["checks"]
    assert checks["rows"] and {r["part"] for r in checks["rows"]} == {"all", "eyes", "nose",
                                                                       "mouth"}
    for r in checks["rows"]:
        assert 0 <= r["mass"] <= 1 and 0 < r["chance"] < 1
    view = faces.experts("pretrained", "onet.dense5", 0)
    assert view["images"].shape[1:] == (48, 48, 3) and 0 <= view["images"].min() <= view[
        "images"].max() <= 1
