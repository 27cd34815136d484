"""Degenerate results named "cannot tell" in core/report (issues 18 and 22): flat correction grids
and essence rows that cannot discriminate, in the findings box and the README renderer."""

from __future__ import annotations

from core.report.degenerate import (
    annotate_corrections,
    cannot_tell,
    corrections_cannot_tell,
    flat_grid,
)
from core.report.findings import findings
from core.report.markdown import _corrections as _corrections_md
from core.report.markdown import markdown


def test_flat_grid_is_within_one_validation_image():
    # RRR on faces: 20 validation images, every λ at the same accuracy
    same = [{"value": v, "val_acc": 0.55} for v in (0.001, 0.01, 0.1, 1.0)]
    why = flat_grid(same, 20)
    assert why.startswith("flat validation grid: 4 strengths all at 55% on 20 validation images")
    one_image = [{"value": 0.1, "val_acc": 0.55}, {"value": 1.0, "val_acc": 0.60}]  # 1/20 apart
    assert "within one image" in flat_grid(one_image, 20)
    two_images = [{"value": 0.1, "val_acc": 0.55}, {"value": 1.0, "val_acc": 0.65}]
    assert flat_grid(two_images, 20) is None
    assert flat_grid(one_image, 1000) is None  # 5 points apart on 1000 images: it chose
    assert flat_grid([{"value": 0.0, "val_acc": 0.9}], 20) is None  # one strength: no choice made
    assert flat_grid(same, None) is not None and flat_grid(one_image, None) is None
    assert flat_grid(None, 20) is None and flat_grid([{"val_acc": None}] * 3, 20) is None


def _corr_report():
    rows = [{"method": "rrr", "label": "RRR", "decoy_test_acc": 0.61, "gap_closed": 0.02,
             "paired_verdict": "tie", "headline": "decoy_test", "uses": "pixel mask"},
            {"method": "counterexamples", "label": "Counterexamples", "decoy_test_acc": 0.9,
             "gap_closed": 0.8, "paired_verdict": "better", "headline": "decoy_test",
             "uses": "pixel mask"}]
    payload = {"records": {
        "rrr": {"grid": [{"value": v, "val_acc": 0.55} for v in (0.01, 0.1, 1.0)]},
        "counterexamples": {"grid": [{"value": 0.1, "val_acc": 0.7},
                                     {"value": 0.5, "val_acc": 0.9}]}}}
    rep = {"case": "c", "corrections": rows, "data": {"n_val": 20, "n_test": 500},
           "case_facts": {"headline": "decoy_test"}}
    return rep, payload


def test_corrections_flags_from_the_payload_and_the_report_carries_them():
    rep, payload = _corr_report()
    assert set(corrections_cannot_tell(payload, 20)) == {"rrr"}
    out = annotate_corrections(rep, payload)
    assert "corrections_cannot_tell" not in rep and "cannot_tell" not in rep["corrections"][0]
    assert set(out["corrections_cannot_tell"]) == {"rrr"}
    assert out["corrections"][0]["cannot_tell"].startswith("flat validation grid")
    assert "cannot_tell" not in out["corrections"][1]
    assert annotate_corrections({"case": "c"}, payload) == {"case": "c"}


def test_findings_and_readme_say_cannot_tell_for_a_flat_grid():
    rep, payload = _corr_report()
    found = findings(annotate_corrections(rep, payload))
    said = " ".join(found["cannot_tell"])
    assert "Whether RRR helps: cannot tell (flat validation grid: 3 strengths all at 55%" in said
    assert "Counterexamples helps" not in said
    md = "\n".join(_corrections_md(annotate_corrections(rep, payload)))
    assert "RRR: whether it helps — cannot tell (flat validation grid" in md
    # without the payload's grids nothing is claimed either way
    assert "cannot tell" not in "\n".join(_corrections_md(rep))


def _essence_rows(k_random: int, full: float, degenerate: str | None) -> list[dict]:
    return [{"model": "m", "layer": layer, "a_name": "a", "b_name": "b", "fill": fill,
             "full_acc": full, "k_top": 1, "k_random": k_random, "k_bottom": k_random,
             "n_eval": 40, "degenerate": degenerate}
            for layer in ("l1", "l2") for fill in ("mean", "zero")]


def test_degenerate_essence_reads_cannot_tell_not_not_concentrated():
    why = "k = 1 for every rule; the whole layer's binary accuracy 52% on 40 images is near chance (50%)"
    rows = _essence_rows(1, 0.52, why)
    summary = [{"model": "m", "layer": r["layer"], "fill": r["fill"], "experts_beat_random": False,
                "k_top": [1], "k_random": [1], "degenerate": why} for r in rows]
    rep = {"case": "faces", "essence": rows, "essence_summary": {"summary": summary}}
    found = findings(rep)
    item = next(i for i in found["items"] if i["topic"] == "essence")
    assert "cannot tell (degenerate)" in item["text"] and "fewer of them" not in item["text"]
    said = " ".join(found["cannot_tell"])
    assert "Whether the essence is concentrated in the top experts (l1, l2; every row): cannot " \
           "tell (degenerate: k = 1 for every rule" in said
    md = markdown(rep)
    assert "In every row: cannot tell (degenerate: k = 1 for every rule)" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| m ")]
    assert len(table) == 4 and all(ln.rstrip(" |").endswith("cannot tell") for ln in table)


def test_an_essence_that_discriminates_is_counted_not_flagged():
    rows = _essence_rows(8, 0.97, None)
    rows[0]["k_top"] = 16  # one row where the top experts do not do better than random
    rep = {"case": "d", "essence": rows, "essence_summary": {"summary": []}}
    found = findings(rep)
    item = next(i for i in found["items"] if i["topic"] == "essence")
    assert "in 3 of 4 pair × layer × fill rows" in item["text"]
    assert not any("essence" in t for t in found["cannot_tell"])
    md = markdown(rep)
    assert "cannot tell (" not in md
    readings = [ln.rstrip(" |").rsplit("|", 1)[-1].strip() for ln in md.splitlines()
                if ln.startswith("| m ")]
    assert readings == ["top ≥ random", "top < random", "top < random", "top < random"]
    assert cannot_tell("x") == "cannot tell (x)"


def test_the_stage_and_the_claims_share_one_near_chance_rule():
    from core.methods.essence import near_chance
    from core.report.health import near_chance_threshold

    for n in (10, 20, 40, 100, 400, 5000, None):
        t = near_chance_threshold(0.5, n)
        assert near_chance(t - 1e-9, n) and not near_chance(t + 1e-9, n)


def test_claims_carry_the_essence_reading():
    from core.report.claims import claims

    why = "k = 1 for every rule; the whole layer's binary accuracy 40% on 40 images is near chance (50%)"
    rows = _essence_rows(1, 0.40, why)[:1] + _essence_rows(8, 0.97, None)[:1]
    rows[1]["layer"] = "l9"
    got = {c["key"]: c for c in claims({"essence": rows}) if c["key"].endswith(".reading")}
    firm, can = got["essence.m.l1.a-b.mean.reading"], got["essence.m.l9.a-b.mean.reading"]
    assert firm["value"] == "cannot tell" and firm["fragile"] is None  # 40% on 40 images: firm
    assert can["value"] == "can tell" and "smallest k" in can["fragile"]


def test_the_detection_ranking_is_read_when_the_stage_gives_one():
    rows = [{"detector": d, "auc": a, "uses_influence": u, "n_clean": 200, "n_attacked": 200}
            for d, a, u in (("influence", 1.0, True), ("mahalanobis", 1.0, False))]
    ranking = {"verdict": "saturated: cannot rank — mahalanobis (no influence) reach AUC 1.0 on "
                          "these images", "method": "95% image-level bootstrap"}
    rep = {"case": "faces", "detection": rows, "detection_summary": {"ranking": ranking}}
    found = findings(rep)
    item = next(i for i in found["items"] if i["topic"] == "detection")
    assert "Ranking (95% image-level bootstrap): saturated: cannot rank" in item["text"]
    assert "the highest AUC is influence's" in item["text"] and "best detector" not in item["text"]
    assert any(t.startswith("Which detector is best: cannot tell (saturated") for t in
               found["cannot_tell"])
    from core.report.markdown import _summary_section

    md = "\n".join(_summary_section(rep, "detection", "Attacks"))
    assert "Ranking (95% image-level bootstrap): saturated: cannot rank" in md
    assert "Best AUC" not in md
    # without the stage's ranking, the Hanley–McNeil estimate stays
    assert "Best AUC" in "\n".join(_summary_section({"detection": rows}, "detection", "Attacks"))


def test_the_accuracy_finding_calls_a_gap_within_noise_a_tie():
    def rep(s, r, n):
        return {"case": "c", "subject": "v", "reference": "c", "data": {"n_test": n},
                "case_facts": {"headline": "decoy_test"},
                "models": {"v": {"decoy_test_acc": s}, "c": {"decoy_test_acc": r}}}

    def text(*a):
        return next(i for i in findings(rep(*a))["items"] if i["topic"] == "accuracy")["text"]

    assert "(-2.0 points: within noise of the reference: a tie, ±19.5 points being two SEs)" in \
        text(0.60, 0.62, 50)
    assert "it trails the reference" in text(0.60, 0.95, 1000)
    assert "it leads the reference" in text(0.60, 0.556, 5000)  # the starter case's +4.4 points


def test_study_report_reads_the_flags_from_the_payload_and_survives_a_bad_one():
    from core.report.degenerate import study_report

    rep, payload = _corr_report()

    class Study:
        def __init__(self, artifact):
            self._artifact = artifact

        def report(self):
            return dict(rep)

        def artifact(self, stage):
            assert stage == "corrections"
            return self._artifact()

    assert set(study_report(Study(lambda: payload))["corrections_cannot_tell"]) == {"rrr"}

    def broken():
        raise OSError("truncated")

    assert study_report(Study(broken))["corrections_cannot_tell"] == {}
