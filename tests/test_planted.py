"""The planted suite (core.methods.planted): marks a model relies on, two clean twins each, and
discovery scored against the planted masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.methods import planted as P


def test_marks_and_masks_agree():
    x, y, _, _ = P.digits(0)
    on = np.zeros(len(y), bool)
    on[:5] = True
    for kind in P.KINDS:
        marked, mask = P.plant(kind, x, y, on, np.random.default_rng(0))
        assert mask[:5].flatten(1).any(1).all() and not mask[5:].any()
        assert torch.equal(marked[5:], x[5:])  # no mark where it is off
        assert (marked[:5] != x[:5]).flatten(1).any(1).all()
        assert float(mask[:5].float().mean()) < 0.25  # localised


def test_twins_break_the_relation_of_mark_and_label():
    short = P.make_case("corner_patch", "shortcut", 0)
    indep = P.make_case("corner_patch", "independent", 0)
    absent = P.make_case("corner_patch", "absent", 0)
    _, y, m = short["train"]
    has = m.flatten(1).any(1).numpy()
    assert has[y.numpy() == P.TARGET].all() and not has[y.numpy() != P.TARGET].any()
    _, y, m = indep["train"]
    has = m.flatten(1).any(1).numpy()
    rate_t, rate_o = has[y.numpy() == P.TARGET].mean(), has[y.numpy() != P.TARGET].mean()
    assert abs(rate_t - rate_o) < 0.1 and 0.03 < rate_o < 0.2
    assert not absent["train"][2].any()


def test_corner_patch_found_and_its_twin_clean():
    """One kind end to end: the shortcut model relies on the patch (≥ 15 points), discovery puts
    the patch first, suspected, localised; the model trained without it has no suspect."""
    result = P.run_suite(seeds=(0,), kinds=("corner_patch",), variants=("shortcut", "absent"))
    short = [p for p in result["per_model"] if p["variant"] == "shortcut"][0]
    assert short["drop"] >= 0.15
    assert short["found_at"] is not None and short["found_at"] <= 3
    assert short["iou"] >= 0.5
    assert result["false_alarms"] == 0


@pytest.mark.slow
def test_suite_found_at_3_and_false_alarms():
    """The whole suite, one seed: every kind (the texture at a random place included) is found
    among the top 3, suspected and localised, and no twin is flagged (issue 20's goals: found@3
    ≥ 90% on localised kinds, false alarms ≤ 5%)."""
    result = P.run_suite(seeds=(0,))
    assert result["n_shortcut"] == 5 and result["n_twins"] == 10
    assert result["found@3"] >= 0.9
    assert result["false_alarm_rate"] <= 0.05
    by_kind = {p["kind"]: p for p in result["per_model"] if p["variant"] == "shortcut"}
    for kind in P.LOCALISED:
        assert by_kind[kind]["found_at"] is not None and by_kind[kind]["found_at"] <= 3, \
            (kind, by_kind[kind]["reason"])
        assert by_kind[kind]["iou"] >= 0.5 and by_kind[kind]["consistency"] is not None


def test_score_reads_the_best_candidate_of_the_target():
    # a hand-made result: one suspected candidate of the target whose region is the planted mask
    case = P.make_case("corner_patch", "shortcut", 0)
    tx, _, tm = case["test"]
    idx = np.flatnonzero(tm.flatten(1).any(1).numpy())[:5]
    row = {"rank": 1, "class_index": P.TARGET, "verdict": "suspected", "mode": "fixed",
           "group": "all", "consistency": 0.9, "reason": "both effects beat the control",
           "_heldout": {"index": idx, "masks": tm[idx].numpy(), "n_test": len(tx)}}
    s = P.score({"candidates": [row]}, case)
    assert s["found_at"] == 1 and s["iou"] == 1.0 and s["consistency"] == 0.9
    row["verdict"] = "not suspected"
    s = P.score({"candidates": [row]}, case)
    assert s["found_at"] is None and s["suspected"] == 0 and s["iou"] == 1.0
    assert P.score({"candidates": []}, case)["consistency"] is None
