"""core.report.health: a chance-level model, a train/eval gap and a rule without its false-alarm
check are warned about from the report alone (issue 22)."""

from __future__ import annotations

import copy

from core.report.health import annotate, near_chance_threshold, rule_caveat, warnings

RULE = "an expert carries the shortcut when …"


def _report(accs: dict[str, dict[str, float]], *, reference="reference", quantile=0.95) -> dict:
    return {"case": "c", "reference": reference,
            "case_facts": {"classes": ["circle", "square", "triangle"]},
            "data": {"n_train": 108, "n_val": 27, "n_test": 45},
            "models": {m: dict(a) for m, a in accs.items()},
            "experts": {"shortcut_rule": RULE, "shortcut_factor": 5.0, "chance": 0.0156,
                        "shortcut_threshold": 0.078, "shortcut_quantile": quantile}}


def test_the_chance_level_resnet18_of_issue_22_is_warned_about():
    """33.3% on train, val and test with 3 classes (the report that was analysed without a word)."""
    rep = _report({"vanilla": {"train_acc": 1 / 3, "val_acc": 1 / 3, "test_acc": 1 / 3},
                   "reference": {"train_acc": 0.99, "val_acc": 0.96, "test_acc": 0.93}})
    found = [w for w in warnings(rep) if w["kind"] == "chance"]
    assert [(w["model"], w["set"]) for w in found] == [("vanilla", "train"), ("vanilla", "val")]
    assert "33.3%" in found[0]["text"] and "own training set" in found[0]["text"]
    assert all(w["acc"] < w["threshold"] for w in found)


def test_a_model_that_learned_gets_no_warning_and_test_sets_are_not_judged():
    rep = _report({"vanilla": {"train_acc": 0.99, "val_acc": 0.9, "decoy_test_acc": 0.34}})
    assert warnings(rep) == []


def test_near_chance_counts_the_set_size():
    assert abs(near_chance_threshold(0.5) - 0.55) < 1e-12
    assert near_chance_threshold(1 / 3, 27) > near_chance_threshold(1 / 3, 10_000)
    rep = _report({"m": {"train_acc": 0.95, "val_acc": 0.45}})  # 27 val images: cannot tell
    assert [w["set"] for w in warnings(rep)] == ["val"]


def test_train_mode_and_eval_mode_that_differ_wildly_are_warned_about():
    rep = _report({"m": {"train_acc": 0.9, "train_mode_acc": 0.99, "val_acc": 0.9},
                   "bn": {"train_acc": 0.5, "train_mode_acc": 1.0, "val_acc": 0.5}})
    gaps = [w for w in warnings(rep) if w["kind"] == "train_eval_gap"]
    assert [w["model"] for w in gaps] == ["bn"] and "eval mode" in gaps[0]["text"]


def test_without_a_reference_the_rule_says_its_false_alarm_check_is_gone():
    with_ref = _report({"m": {"train_acc": 0.99}})
    assert rule_caveat(with_ref) is None
    without = _report({"m": {"train_acc": 0.99}}, reference=None)
    text = rule_caveat(without)
    assert text and "false-alarm" in text and "5 × chance (0.078)" in text
    assert "shortcut_quantile" in rule_caveat(_report({"m": {}}, quantile=0))
    no_region = copy.deepcopy(without)
    no_region["experts"].pop("shortcut_rule")
    assert rule_caveat(no_region) is None
    out = annotate(without)
    assert out["experts"]["shortcut_rule_caveat"] == text
    assert [w["kind"] for w in out["warnings"]] == ["no_false_alarm_check"]
    assert "warnings" not in without and "shortcut_rule_caveat" not in without["experts"]


def test_chance_on_one_shortcut_breaking_validation_set_only_is_no_warning():
    """faces: the watermarked model is at 50% on the watermarked non-faces (the set built to break
    its shortcut) and fine on the plain validation set: that is the finding, not an untrained
    model; at chance on every validation set it is a warning."""
    rep = _report({"w": {"train_acc": 0.99, "val_acc": 0.95, "val_watermark_acc": 0.5},
                   "u": {"train_acc": 0.99, "val_acc": 0.34, "val_watermark_acc": 0.33}})
    found = [(w["model"], w["set"]) for w in warnings(rep) if w["kind"] == "chance"]
    assert ("w", "val_watermark") not in found
    assert ("u", "val") in found and ("u", "val_watermark") in found
