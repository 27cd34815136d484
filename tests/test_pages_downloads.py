"""Downloads carry the case's name in their file names (issue 22)."""

from __future__ import annotations


class _Where:
    """Stands in for ``st`` as a download's container: records what each button was given."""

    def __init__(self):
        self.calls: list[dict] = []

    def download_button(self, label, **kwargs):
        self.calls.append(kwargs)


def test_every_download_carries_the_case_name(monkeypatch):
    import numpy as np
    import pandas as pd

    import ui.downloads

    monkeypatch.setattr(ui.downloads, "current_case", lambda: "my case/v2")
    where = _Where()
    ui.download_csv(pd.DataFrame({"a": [1]}), "experts.csv", where=where)
    ui.download_json({"a": 1}, "rows.json", where=where)
    ui.download_png(np.zeros((2, 2, 3), np.uint8), "grid.png", where=where)
    ui.download_png(np.zeros((2, 2, 3), np.uint8), "my-case-v2-grid.png", where=where)
    names = [c["file_name"] for c in where.calls]
    assert names == ["my-case-v2-experts.csv", "my-case-v2-rows.json", "my-case-v2-grid.png",
                     "my-case-v2-grid.png"]
    assert [c["key"] for c in where.calls][:3] == ["dl-experts.csv", "dl-rows.json", "dl-grid.png"]
