"""core.cases.newcase: the example case is written, refuses to overwrite, and works end to end."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
import torch

from core.cases.factories import check_model, make_model, model_facts
from core.cases.newcase import EXAMPLE_FILES, write_example
from core.cases.seam import SourceError
from core.cases.sources import check_dataset, check_region, folder_data, source_fingerprint


def test_write_example_writes_the_four_files(tmp_path):
    paths = write_example(tmp_path / "new" / "case")
    assert [p.name for p in paths] == ["nets.py", "make_images.py", "case.toml", "README.txt"]
    assert all(p.read_text() == EXAMPLE_FILES[p.name] for p in paths)
    cfg = tomllib.loads(paths[2].read_text())
    check_dataset(cfg["dataset"], "case.toml [dataset]")
    check_region(cfg["region"], "case.toml [region]")
    assert list(cfg["models"]) == ["vanilla", "reference"]
    for name, section in cfg["models"].items():
        assert check_model(section, f"case.toml [models.{name}]")["checkpoint"] is None


def test_write_example_refuses_to_overwrite(tmp_path):
    (tmp_path / "case.toml").write_text("mine")
    with pytest.raises(SourceError, match=r"case\.toml.*already exists") as info:
        write_example(tmp_path)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.toml"]  # nothing written
    assert (tmp_path / "case.toml").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError, match="not a folder"):
        write_example(tmp_path / "file")


def test_example_round_trip(tmp_path):
    write_example(tmp_path)
    run = subprocess.run([sys.executable, "make_images.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "data" / "images").rglob("*.png"))) == 420
    assert len(list((tmp_path / "data" / "masks").rglob("*.png"))) == 420
    cfg = tomllib.loads((tmp_path / "case.toml").read_text())
    data = folder_data(cfg["dataset"], cfg["region"], tmp_path)
    assert data.class_names == ("circle", "square", "triangle")
    assert data.channels == 3 and data.size == (48, 48)
    assert data.train.n + data.val.n + data.test.n == 420
    assert (data.train.n, data.val.n, data.test.n) == (240, 60, 120)
    assert data.region_name == "mark"
    for split in (data.train, data.val, data.test):
        assert split.mask.shape == (split.n, 1, 48, 48)
        assert split.mask.sum(dim=(1, 2, 3)).eq(36).all()  # one 6×6 mark per image
        assert torch.bincount(split.y, minlength=3).tolist() == [split.n // 3] * 3
    # the mark's colour is the class's colour for most training images (the planted shortcut)
    colours = torch.tensor([[230, 40, 40], [40, 200, 40], [40, 80, 230]]) / 255.0
    tr = data.train
    mark_rgb = (tr.x * tr.mask).sum(dim=(2, 3)) / 36
    nearest = torch.cdist(mark_rgb, colours).argmin(1)
    assert float((nearest == tr.y).float().mean()) > 0.75
    # ... and the test split breaks the link (its mark's colour is drawn at random)
    te = data.test
    nearest = torch.cdist((te.x * te.mask).sum(dim=(2, 3)) / 36, colours).argmin(1)
    assert float((nearest == te.y).float().mean()) < 0.55

    spec = cfg["models"]["vanilla"]
    model = make_model(spec["factory"], spec["kwargs"], tmp_path)
    assert model(data.test.x[:5]).shape == (5, 3)
    facts = model_facts(spec["factory"], spec["kwargs"], tmp_path, input_shape=(3, 48, 48))
    assert facts["n_outputs"] == 3 and {"conv1", "conv2", "conv3", "fc1"} <= set(facts["layers"])

    # deterministic: a second run rewrites identical files
    digest = data.digest()
    fingerprint = source_fingerprint(cfg["dataset"], cfg["region"], tmp_path)
    run = subprocess.run([sys.executable, "make_images.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert folder_data(cfg["dataset"], cfg["region"], tmp_path).digest() == digest
    assert len(fingerprint) == 64
