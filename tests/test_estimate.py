"""The estimate a build prints before it starts (core/casestudy/estimate.py, issue 21)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from core.casestudy import estimate as est

REPO = Path(__file__).resolve().parents[1]


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 2))


def test_probe_times_are_positive_and_leave_the_model_as_it_was():
    net = _net().train()
    p = est.probe(net, (1, 8, 8), "cpu", batch=4, repeats=1)
    assert p["f"] > 0 and p["fb"] > 0 and p["train"] > 0 and p["batch"] == 4
    assert net.training and all(q.grad is None for q in net.parameters())
    # the adaptive batch doubles from 4 and stops at max_batch
    assert est.probe(net, (1, 8, 8), "cpu", max_batch=16, target_s=1e9, repeats=1)["batch"] == 16


def _fake(sections: dict, layers=("conv1",)):
    config = SimpleNamespace(section=lambda name: sections.get(name, {}),
                             experts={"layers": list(layers), "k": 5, "n_images": 8,
                                      "resolution": 20},
                             training={"epochs": 2}, models={"m": SimpleNamespace(checkpoint=None)})
    return SimpleNamespace(config=config, seeds=1, subject="m", reference=None, device="cpu")


SIZES = {"train": 400, "val": 40, "test": 120, "all": 560, "classes": 2, "hw": (32, 32),
         "width": 64, "layers": 10, "f": 0.3, "train_step": 1.4,
         "share": {"conv1": 0.5}}


@pytest.mark.parametrize("stage,key,term", [
    ("representations", "n_images", "n_images (maps)"),
    ("representations", "n_images", "n_steps × n_images (deletion/insertion curves)"),
    ("detection", "n_eval", "adaptive: steps × held-out attempts × attacks")])
def test_doubling_a_stage_images_roughly_doubles_its_count(stage, key, term):
    base = {"representations": 16, "detection": 32, "discovery": 20}[stage]
    one = est.counts(_fake({stage: {key: base}}), stage, SIZES)
    two = est.counts(_fake({stage: {key: 2 * base}}), stage, SIZES)
    assert 0 < sum(one.values()) < sum(two.values())
    # the term the images scale doubles (internal influence's reference images and detection's
    # attacked training images do not follow n_images / n_eval)
    assert 1.6 < two[term] / one[term] <= 2.0 + 1e-9, (stage, one, two)


def test_discovery_maps_follow_the_images_and_detection_attempts_the_design():
    maps = "max_fit + max_heldout × resolution (experts' maps)"
    one, two = (est.counts(_fake({"discovery": {"max_fit": m, "max_heldout": m, "max_targets": m}}),
                           "discovery", SIZES) for m in (20, 40))
    assert two[maps] / one[maps] == pytest.approx(2.0)
    tests = "max_heldout, max_targets × groups (causal tests, forward)"
    assert two[tests] > one[tests] and two[tests] / one[tests] == pytest.approx(2.0)
    # every patch side and position is one more attempt: the attacks scale with them
    att = "steps × (n_attack_fit + held-out attempts) (patch attacks)"
    one = est.counts(_fake({"detection": {"n_attack_fit": 2}}), "detection", SIZES)
    four = est.counts(_fake({"detection": {"n_attack_fit": 2, "patch_sizes": [4, 6],
                                           "positions": 2}}), "detection", SIZES)
    assert four[att] / one[att] == pytest.approx((2 + 4 * SIZES["test"]) / (2 + SIZES["test"]))


def test_representations_count_follows_curve_steps_and_mprt_points():
    full = est.counts(_fake({}), "representations", SIZES)
    quick = est.counts(_fake({"representations": {"n_steps": 8, "mprt_points": 2}}),
                       "representations", SIZES)
    curve = "n_steps × n_images (deletion/insertion curves)"
    mprt = "mprt_points × n_mprt (randomisation test)"
    # 32 steps (one row of 32 px per step) vs 8: (32 + 1) / (8 + 1) points per curve
    assert full[curve] / quick[curve] == pytest.approx(33 / 9)
    assert full[mprt] / quick[mprt] == pytest.approx(SIZES["layers"] / 2)
    assert full["n_images (maps)"] == quick["n_images (maps)"]


def test_lower_names_the_largest_term_and_the_format_prints_every_stage():
    rows = [est.StageEstimate("data", None),
            est.StageEstimate("experts", 12.0, [("a", 1.0), ("experts.resolution", 5.0)])]
    assert rows[1].lower == "experts.resolution" and rows[0].lower is None
    text = est.format_estimate(rows, {"f": 1e-3, "fb": 3e-3, "batch": 8, "seconds": 0.5})
    assert "experts: ~    12 s  (lower: experts.resolution, 83% of it)" in text
    assert "data: not estimated" in text


def test_to_build_skips_what_is_cached(small_study):
    assert est.to_build(small_study, ["experts"]) == []  # the fixture holds data, models, experts
    assert est.to_build(small_study, ["experts"], force=True) == ["experts"]


def test_estimate_of_a_small_case_is_positive_per_stage(small_study):
    stages = ["models", "experts", "representations", "discovery", "detection", "essence"]
    rows, p = est.estimate(small_study, stages)
    assert [r.stage for r in rows] == stages
    assert all(r.seconds and r.seconds > 0 and r.lower for r in rows)
    assert p["fb"] > 0 and p["seconds"] > 0


def test_build_prints_the_estimate_unless_told_not_to(small_study, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(small_study.cache_dir, cache)

    def build(*extra):
        return subprocess.run([sys.executable, "-m", "core", "build", "decoy-mnist-small",
                               "--stages", "experts", "--force", "--device", "cpu", "--cache",
                               str(cache), *extra], cwd=REPO, capture_output=True, text=True)

    proc = build()
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout
    assert head.startswith("estimate (probe: ") and "estimate (probe" not in proc.stderr
    line = re.search(r"experts: ~ *([0-9.]+) (s|min)", head)
    assert line and float(line.group(1)) > 0, head
    assert "estimate (probe" not in build("--no-estimate").stdout


def test_parse_estimate_reads_back_what_format_prints():
    rows = [est.StageEstimate("models", 42.0, [("a", 1.0)]),
            est.StageEstimate("experts", 600.0, [("b", 1.0)], coarse=True),
            est.StageEstimate("data", None)]
    text = est.format_estimate(rows, {"f": 1e-3, "fb": 3e-3, "batch": 8, "seconds": 0.5})
    assert est.parse_estimate("tqdm noise\n" + text) == {"models": 42.0, "experts": 600.0,
                                                          "total": 642.0}
