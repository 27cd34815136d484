"""The HTML report: one self-contained file with tables, embedded figures and provenance."""

from __future__ import annotations

import re

from core.__main__ import main


def test_export_is_self_contained_with_figures_and_provenance(small_study, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["export", "decoy-mnist-small", "--html", str(out), "--cache",
                 str(small_study.cache_dir)]) == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "</html>" in text
    # no external URL anywhere: every image is inline, no stylesheet, script or font is fetched
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//)""", text)
    assert "<link" not in text and "<script" not in text and "@import" not in text
    images = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]+)"', text)
    assert len(images) >= 3 and all(alt for alt in images)  # samples, experts of both models
    assert "<figcaption>" in text and "<table>" in text
    for field in ("commit", "code and config", "torch", "device", "seeds"):
        assert f"<th>{field}</th>" in text
    assert "decoy_test" not in text or "decoy test" in text  # tables use readable labels
    assert str(small_study.cache_dir) not in text  # no server path


def test_export_of_an_unbuilt_case_is_a_one_line_error(tmp_path, capsys):
    code = main(["export", "decoy-mnist-small", "--html", str(tmp_path / "r.html"), "--cache",
                 str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and "not built" in err and err.count("\n") == 1
