"""The discovery stage end to end (issue 20): the ``discover`` command's output contract, its masks
closing the loop as a case's ``[region]``, the stage in the report and the Suspects chapter, and
DecoyMNIST's corner patch found with no mask while the clean twins stay clean."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cases.newcase import write_example
from core.casestudy import CaseStudy

REPO = Path(__file__).resolve().parents[1]
CONTRACT = ("rank", "class", "verdict", "masks", "layer", "units", "n_images", "share_of_image",
            "necessity", "sufficiency", "control_necessity", "control_sufficiency", "p_value")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The starter case (folder source with split folders), trained briefly."""
    root = tmp_path_factory.mktemp("example")
    write_example(root)
    subprocess.run([sys.executable, "make_images.py"], cwd=root, check=True, capture_output=True)
    toml = (root / "case.toml").read_text().replace("epochs = 30", "epochs = 6")
    (root / "case.toml").write_text(toml)
    return root


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def test_discover_writes_the_contract_and_its_masks_are_a_region(example, tmp_path):
    out = tmp_path / "found"
    cache = tmp_path / "cache"
    proc = _cli("discover", example / "case.toml", "--top", "2", "--out", out, "--cache", cache)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "candidates.json").read_text())
    assert rows, proc.stdout
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        assert set(CONTRACT) <= set(r)
        assert r["class"] in ("circle", "square", "triangle")  # the class *name*
        assert r["verdict"] in ("suspected", "not suspected")
    first = out / rows[0]["masks"]
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*.png"))
    assert files, "no mask written for the top candidate"
    images = example / "data" / "images"
    for rel in files:  # the same relative paths as the images under the data root
        assert rel.split("/")[0] in ("train", "val", "test")
        assert (images / rel).is_file(), rel
        m = np.asarray(Image.open(first / rel))
        assert m.shape == (48, 48) and m.any()
    # closing the loop: the masks folder is the case's region; missing files are empty regions
    case = example / "case.toml"
    looped = example / "looped.toml"
    looped.write_text(case.read_text().replace('masks = "data/masks"',
                                               f'masks = "{Path(first).as_posix()}"'))
    study = CaseStudy.open(str(looped), cache_dir=cache, device="cpu")
    data = study.data()
    split = data.train
    rel_train = [r for r in files if r.startswith("train/")]
    assert int((split.mask.flatten(1).sum(1) > 0).sum()) == len(rel_train)


def test_the_stage_is_in_the_report_and_the_chapter_draws(small_study, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import ui

    cache = tmp_path / "cache"
    shutil.copytree(small_study.cache_dir, cache)
    monkeypatch.setenv("CASEBOOK_CACHE", str(cache))
    monkeypatch.setenv("CASEBOOK_CASE", small_study.config.name)
    for fn in (ui._report, ui._status, ui._artifact, ui._facts):
        fn.clear()
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300).run()
    at.switch_page("chapters/suspects.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Suspects: shortcuts no one marked"
    at.button(key="build-discovery").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    study = CaseStudy.open(small_study.config.name, cache_dir=cache, device="cpu")
    rep = study.report()
    assert rep["discovery"] and rep["discovery_summary"]["subject"] == study.subject
    head = rep["discovery_summary"]["models"][study.subject]["headline"]
    # success (a suspect), warning (nothing tested, or candidates too few to decide) or info
    shown = [i.value for i in list(at.success) + list(at.info) + list(at.warning)]
    assert any(head in (v or "").replace("\\", "") for v in shown), (head, shown)
    assert any("The rule:" in c.value for c in at.caption)
    for fn in (ui._report, ui._status, ui._artifact, ui._facts):
        fn.clear()


def test_decoy_mnist_patch_found_without_masks_and_the_twins_stay_clean(tmp_path):
    """The issue's measurement on the default case (models trained here, one seed): on vanilla
    the corner patch is among the top 3 candidates, suspected, with median IoU >= 0.5 against the
    case's true patch masks (used only to score); on clean and unpadded nothing is suspected."""
    study = CaseStudy.open("decoy-mnist", cache_dir=tmp_path / "cache", device="cpu")
    study.build(stages=["data", "models", "discovery"])
    rep = study.report()
    rows = [r for r in rep["discovery"] if r.get("kind") == "candidate"]
    top3 = [r for r in rows if r["model"] == "vanilla"][:3]
    hits = [r for r in top3 if r["verdict"] == "suspected" and (r.get("region_iou") or 0) >= 0.5]
    assert hits, [(r["class"], r["verdict"], r.get("region_iou"), r["reason"]) for r in top3]
    for twin in ("clean", "unpadded"):
        flagged = [r for r in rows if r["model"] == twin and r["verdict"] == "suspected"]
        assert not flagged, [(r["class"], r.get("region_iou"), r["reason"]) for r in flagged]
    summary = rep["discovery_summary"]
    assert summary["false_alarms"]["n_flagged"] == 0
    assert summary["models"]["vanilla"]["n_suspected"] >= 1


def test_faces_watermark_found_and_the_reference_clean(tmp_path):
    """The second built-in case: the watermark is found on the watermarked fine-tune (suspected,
    median IoU >= 0.5 with the case's watermark masks, used only to score); neither the clean
    fine-tune nor the pretrained network has a suspect."""
    study = CaseStudy.open("faces", cache_dir=tmp_path / "cache", device="cpu")
    study.build(stages=["data", "models", "discovery"])
    rep = study.report()
    rows = [r for r in rep["discovery"] if r.get("kind") == "candidate"]
    subject = rep["subject"]
    top3 = [r for r in rows if r["model"] == subject][:3]
    assert any(r["verdict"] == "suspected" and (r.get("region_iou") or 0) >= 0.5 for r in top3), \
        [(r["class"], r["verdict"], r.get("region_iou"), r["reason"]) for r in top3]
    flagged = [r for r in rows if r["model"] != subject and r["verdict"] == "suspected"]
    assert not flagged, [(r["model"], r["class"], r["reason"]) for r in flagged]
