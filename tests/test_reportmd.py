"""The README's generated blocks: Markdown from a report, and the drift check CI runs."""

from __future__ import annotations

from core.report.markdown import drift, markdown, readme_blocks, stamped, update_readme


def _report(region: bool = True) -> dict:
    rep = {
        "case": "x", "subject": "a", "reference": "b" if region else None,
        "data": {"source": "folder", "n_train": 10, "n_val": 2, "n_test": 4},
        "case_facts": {"classes": ["cat", "dog"], "channels": 3, "size": [8, 8],
                       "region": "mark" if region else None, "chance": 0.0625 if region else None},
        "seeds": [0],
        "models": {"a": {"train_acc": 1.0, "test_acc": 0.75}, "b": {"train_acc": 0.9,
                                                                     "test_acc": 0.5}},
        "representations": [{"method": "saliency", "label": "Saliency", "model": "a",
                             "deletion_auc": 0.25, **({"region_mass": 0.5} if region else {})}],
    }
    return rep


def test_markdown_has_the_numbers_and_no_region_columns_without_a_region():
    text = markdown(_report())
    assert "0.750" in text and "| a (under study) | 1.000 | 0.750 |" in text
    assert "region mass" in text and "the mark" in text and "0.0625" in text
    bare = markdown(_report(region=False))
    assert "region mass" not in bare and "no region" in bare


def test_a_model_named_after_its_role_is_not_labelled_twice():
    rep = _report()
    rep["reference"] = "reference"
    rep["models"] = {"a": rep["models"]["a"], "reference": rep["models"]["b"]}
    text = markdown(rep)
    assert "| reference | 0.900 | 0.500 |" in text and "reference (reference)" not in text
    assert "| a (under study) |" in text


def test_percent_cells_carry_only_the_digits_their_interval_supports():
    from core.report.markdown import _pct

    assert _pct(0.407, 0.12, 0.52) == "40% (10–50%)"  # half-width 20 points: tens
    assert _pct(0.16, 0.09, 0.24) == "16% (9–24%)"
    assert _pct(0.102, 0.102, 0.107) == "10.2% (10.2–10.7%)"
    assert _pct(0.1042, 0.1042, 0.1042) == "10.4%"  # a constant has no interval to show
    assert _pct(None) == "–"


def test_each_layer_threshold_says_which_term_of_the_rule_set_it():
    from core.report.markdown import set_by

    e = {"chance": 0.02, "shortcut_factor": 5.0, "shortcut_quantile": 0.95,
         "shortcut_thresholds": {"floor": 0.1, "ref": 0.4}}
    assert set_by(e, "floor") == "the floor (5 × chance)"
    assert set_by(e, "ref") == "the reference's 95% quantile"
    assert set_by({**e, "chance": None}, "ref") is None and set_by(e, "absent") is None


def test_drift_catches_code_changes_and_numbers_beyond_float_noise():
    block = stamped(markdown(_report()), "abc123")
    assert drift(block, block) == []
    noisy = block.replace("0.750", "0.751")
    assert drift(noisy, block) == []  # floating-point noise between machines
    stale = block.replace("0.750", "0.600")
    assert any("0.600" in p for p in drift(stale, block))
    assert any("fingerprint" in p for p in drift(stamped(markdown(_report()), "zzz"), block))
    assert drift(block.replace("Saliency", "Salience"), block) == [
        "the text differs (rows, columns or words)"]


def test_update_readme_replaces_only_the_blocks():
    text = "intro\n<!-- report:x -->\nold\n<!-- /report:x -->\nend 0.5\n"
    assert readme_blocks(text) == ["x"]
    new = update_readme(text, {"x": "new 1.0\n"})
    assert new == "intro\n<!-- report:x -->\nnew 1.0\n<!-- /report:x -->\nend 0.5\n"
    assert update_readme(text, {}) == text


def test_corrections_say_best_vs_runner_up_and_each_seed():
    rep = _report()
    pair = {"delta": 0.001, "delta_se": 0.002, "p_value": 1.0, "verdict": "tie", "alpha": 0.05}
    rows = []
    for method, label, acc in (("rrr", "RRR", 0.97), ("ip", "Influence penalty", 0.969)):
        rows.append({"method": method, "label": label, "headline": "test", "n_seeds": 2,
                     "test_acc": acc, "uses_mask": True, "paired_delta": 0.2,
                     "paired_delta_se": 0.01, "paired_p_value": 1e-9, "paired_verdict": "better",
                     "paired_alpha": 0.05, "paired_delta_per_seed": [0.2, 0.19],
                     "paired_verdict_per_seed": ["better", "better"],
                     "paired_reference_delta": -0.003, "paired_reference_delta_se": 0.004,
                     "paired_reference_p_value": 0.6, "paired_reference_verdict": "tie"})
    rep["corrections"] = rows
    rep["corrections_summary"] = {"best": "rrr", "runner_up": "ip", "best_vs_runner_up": pair,
                                  "best_vs_runner_up_per_seed": [pair, {**pair, "delta": -0.002}],
                                  "verdict": "tie", "rule": "better only when every seed says so"}
    text = markdown(rep)
    assert "2 seeds" in text and "per seed: better, better" in text
    assert "-0.003 ± 0.004 tie (p 0.6)" in text  # against the reference
    assert ("**RRR** vs **Influence penalty**, Δ +0.001 ± 0.002 (p 1); per seed +0.001 tie, "
            "-0.002 tie: **tie** (better only when every seed says so).") in text
