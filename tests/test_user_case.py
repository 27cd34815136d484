"""A user's own case through the seam, as a CNN designer brings it: an image folder with a planted
mark and its masks, a factory module next to the TOML and two checkpoints — then the same without
a region and a reference, a torchvision architecture by name, and every bad input of issue 9."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.casestudy import CaseError, CaseStudy

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "cross", "bar")
COLOURS = ((230, 40, 40), (40, 200, 40), (40, 80, 230))
SIZE, PER_CLASS, MARK = 48, 40, 6

NETS = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, n_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(4)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(4)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 3 * 3, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def not_a_module():
    return 42
'''

SMALL_STAGES = '''
[experts]
k = 2
bootstrap = 8
n_images = 2
resolution = 4

[representations]
n_images = 6
n_display = 3
n_mprt = 2
n_reference = 4
methods = ["saliency", "integrated_gradients", "gradcam", "internal_influence"]
'''


def _shape(kind: str, rng) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(16, SIZE - 16, size=2)
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= 100
    if kind == "cross":
        return ((abs(yy - cy) <= 2) & (abs(xx - cx) <= 10)) | ((abs(xx - cx) <= 2) & (abs(yy - cy) <= 10))
    return (abs(yy - cy) <= 3) & (abs(xx - cx) <= 12)


def write_images(root: Path, *, mark: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``root/images/<class>/<i>.png`` (48×48 RGB: a shape and a corner mark in the class's colour)
    and ``root/masks/...`` (the mark); returns the images (N, 3, 48, 48) in [0, 1] and labels."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, kind in enumerate(CLASSES):
        (root / "images" / kind).mkdir(parents=True, exist_ok=True)
        (root / "masks" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            img = rng.normal(80, 15, size=(SIZE, SIZE, 3))
            img[_shape(kind, rng)] = 210
            m = np.zeros((SIZE, SIZE), np.uint8)
            if mark:
                top, left = (int(rng.integers(2)) * (SIZE - MARK) for _ in range(2))
                img[top:top + MARK, left:left + MARK] = COLOURS[label]
                m[top:top + MARK, left:left + MARK] = 255
            img = np.clip(img, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / kind / f"{i:03d}.png")
            Image.fromarray(m).save(root / "masks" / kind / f"{i:03d}.png")
            xs.append(img.transpose(2, 0, 1) / 255.0)
            ys.append(label)
    return np.stack(xs).astype(np.float32), np.array(ys)


def _train(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    sys.path.insert(0, str(_train.dir))
    try:
        import importlib

        nets = importlib.import_module("nets")
        importlib.reload(nets)
        from core.methods.training import set_seed, train_model

        set_seed(seed)
        model = nets.Net()
        train_model(model, torch.from_numpy(x), torch.from_numpy(y), epochs=4, lr=3e-3,
                    batch_size=16, seed=seed, device="cpu")
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        sys.path.remove(str(_train.dir))
        sys.modules.pop("nets", None)


def _toml(folder: Path, *, region: bool = True, reference: bool = True, extra: str = "") -> Path:
    text = textwrap.dedent(f'''
        title = "Shapes with a mark"
        [dataset]
        source = "folder"
        root = "data/images"
        classes = {json.dumps(list(CLASSES))}
        size = [48, 48]
        channels = 3
        split = {{ val = 0.2, test = 0.25, seed = 0 }}
        ''')
    if region:
        text += '[region]\nmasks = "data/masks"\nname = "mark"\n'
    text += '[models.vanilla]\nfactory = "nets:Net"\ncheckpoint = "vanilla.pt"\n'
    if reference:
        text += '[models.reference]\nfactory = "nets:Net"\ncheckpoint = "clean.pt"\n'
    return _write(folder / "case.toml", text + SMALL_STAGES + extra)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """A folder as a user would have it: images, masks, nets.py, vanilla.pt and clean.pt (the
    vanilla model trained on the marked images, the reference on the same shapes without it)."""
    folder = tmp_path_factory.mktemp("user-case")
    (folder / "nets.py").write_text(NETS)
    x, y = write_images(folder / "data")
    x_clean, _ = write_images(folder / "unmarked", mark=False)
    _train.dir = folder
    torch.save(_train(x, y, 0), folder / "vanilla.pt")
    torch.save(_train(x_clean, y, 0), folder / "clean.pt")
    return folder


@pytest.fixture(scope="module")
def user_study(user_dir, casebook_cache) -> CaseStudy:
    study = CaseStudy.open(_toml(user_dir), cache_dir=casebook_cache, device="cpu")
    result = study.build(["data", "models", "experts", "representations"])
    assert {s: r["status"] for s, r in result.items()}["representations"] == "built", result
    return study


def test_the_user_case_reports_its_classes_models_experts_and_representations(user_study):
    rep = user_study.report()
    json.dumps(rep, allow_nan=False)
    assert rep["case"] == user_study.config.path.parent.name
    assert rep["subject"] == "vanilla" and rep["reference"] == "reference"
    facts = rep["case_facts"]
    assert facts["classes"] == list(CLASSES) and facts["region"] == "mark"
    assert facts["channels"] == 3 and facts["size"] == [48, 48]
    assert facts["chance"] == pytest.approx(36 / 48 ** 2)
    d = rep["data"]
    assert d["n_train"] + d["n_val"] + d["n_test"] == 3 * PER_CLASS
    for name in ("vanilla", "reference"):
        m = rep["models"][name]
        assert 0 <= m["test_acc"] <= 1 and 0 <= m["val_acc"] <= 1
    # the vanilla model reads the coloured mark, the reference cannot (it never saw one): on the
    # marked test images the vanilla model is at least as good
    assert rep["models"]["vanilla"]["test_acc"] >= rep["models"]["reference"]["test_acc"] - 0.05
    e = rep["experts"]
    assert e["layers"] == ["conv1", "conv2", "fc1"]  # the default: first/last conv, hidden dense
    assert set(e["shortcut_thresholds"]) == set(e["layers"])
    assert "mark" in e["shortcut_rule"]
    seen = {(r["model"], r["class"], r["layer"]) for r in e["top"]}
    assert seen == {(m, c, layer) for m in ("vanilla", "reference") for c in range(3)
                    for layer in e["layers"]}
    for r in e["top"]:
        assert r["region_mass"] is None or 0 <= r["region_mass"] <= 1
        assert "decoy_mass" not in r and isinstance(r["shortcut"], bool)
    rows = rep["representations"]
    assert {r["model"] for r in rows} == {"vanilla", "reference"}
    for r in rows:
        assert 0 <= r["region_mass"] <= 1 and "decoy_mass" not in r
    # the engine's views work with the case's class names and image shape
    view = user_study.experts("vanilla", "conv2", 1)
    assert view["images"].shape[1:] == (48, 48, 3) and view["maps"].shape[-2:] == (48, 48)
    assert view["masks"].shape[-2:] == (48, 48)
    samples = user_study.samples("test", 4)
    assert samples["x"].shape == (4, 48, 48, 3) and samples["x_clean"] is None


def test_without_region_and_reference_there_are_no_localisation_claims(user_dir, tmp_path):
    path = _toml(user_dir, region=False, reference=False)
    bare = _write(user_dir / "bare.toml", path.read_text())
    _toml(user_dir)  # restore case.toml for the other tests
    study = CaseStudy.open(bare, cache_dir=tmp_path, device="cpu")
    assert study.reference is None
    study.build(["data", "models", "experts", "representations"])
    rep = study.report()
    assert rep["case_facts"]["region"] is None and rep["case_facts"]["chance"] is None
    assert list(rep["models"]) == ["vanilla"]
    e = rep["experts"]
    assert e["shortcut_rule"] is None and e["shortcut_thresholds"] == {}
    assert all(r["region_mass"] is None and "shortcut" not in r for r in e["top"])
    assert all(s["n_shortcut"] is None for s in e["summary"]["vanilla"].values())
    for r in rep["representations"]:
        assert not {"region_mass", "wrong_reason", "rank_accuracy", "decoy_mass"} & set(r)
        assert r["model"] == "vanilla"


def test_a_torchvision_architecture_by_name_builds_and_ranks_experts(user_dir, tmp_path):
    text = _toml(user_dir).read_text()
    text = text.split("[models.vanilla]")[0] + textwrap.dedent('''
        [models.resnet]
        factory = "torchvision.models:resnet18"
        kwargs = { num_classes = 3 }
        training = { epochs = 1, batch_size = 32 }
        [experts]
        k = 2
        bootstrap = 0
        n_images = 1
        resolution = 2
        classes = [0]
        ''')
    study = CaseStudy.open(_write(user_dir / "resnet.toml", text), cache_dir=tmp_path / "c",
                           device="cpu")
    assert study.config.experts["layers"] == ["conv1", "layer4.1.conv2"]
    study.build(["data", "models", "experts"])
    rep = study.report()
    assert 0 <= rep["models"]["resnet"]["test_acc"] <= 1
    view = study.experts("resnet", "layer4.1.conv2", 0)
    assert len(view["rows"]) == 2 and view["scores"].shape == (512,)


# ------------------------------------------------------------------------------------ bad input

def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _bad_case(user_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the user's folder (hard links for the images) with ``edit(folder)`` applied."""
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(user_dir, folder, ignore=shutil.ignore_patterns("*.toml", "unmarked"))
    _toml(folder)
    edit(folder)
    return folder / "case.toml"


def _replace(folder: Path, old: str, new: str) -> None:
    p = folder / "case.toml"
    p.write_text(p.read_text().replace(old, new))


def _truncate(folder: Path) -> None:
    p = folder / "data" / "images" / "cross" / "003.png"
    p.write_bytes(p.read_bytes()[:60])


def _small_mask(folder: Path) -> None:
    Image.new("L", (20, 20)).save(folder / "data" / "masks" / "bar" / "001.png")


def _empty_class(folder: Path) -> None:
    for p in (folder / "data" / "images" / "bar").iterdir():
        p.unlink()


def _pickled(folder: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), folder / "vanilla.pt")  # a pickled module, not a state dict


def _wrong_keys(folder: Path) -> None:
    state = torch.load(folder / "vanilla.pt", weights_only=True)
    state["fc3.weight"] = state.pop("fc2.weight")
    torch.save(state, folder / "vanilla.pt")


@pytest.mark.parametrize("edit, message", [
    (lambda f: _replace(f, 'root = "data/images"', 'root = "data/nowhere"'), "nowhere"),
    (_empty_class, "bar"),
    (lambda f: _replace(f, '"cross", "bar"]', '"cross", "bar", "star"]'), "star"),
    (lambda f: _replace(f, 'factory = "nets:Net"\ncheckpoint = "vanilla.pt"',
                        'factory = "nets:Net"\nkwargs = { n_classes = 4 }\n'
                        'checkpoint = "vanilla.pt"'), "4 outputs"),
    (_truncate, "003.png"),
    (_small_mask, "001.png"),
    (lambda f: _replace(f, '"nets:Net"\ncheckpoint = "vanilla.pt"',
                        '"nowhere_module:Net"\ncheckpoint = "vanilla.pt"'), "nowhere_module"),
    (lambda f: _replace(f, '"nets:Net"\ncheckpoint = "vanilla.pt"',
                        '"nets:not_a_module"\ncheckpoint = "vanilla.pt"'), "not_a_module"),
    (_wrong_keys, "fc2.weight"),
    (_pickled, "state dict"),
], ids=["missing folder", "class without images", "class folder missing", "class count",
        "truncated image", "mask size", "factory import", "factory not a module",
        "checkpoint keys", "pickled checkpoint"])
def test_bad_input_exits_2_with_one_line(user_dir, tmp_path, edit, message):
    case = _bad_case(user_dir, tmp_path, edit)
    proc = _cli("build", str(case), "--cache", str(tmp_path / "cache"), "--device", "cpu",
                "--stages", "models")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "step/s" not in ln
             and "s/step" not in ln and not ln.strip().startswith(("data", "models"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_the_app_names_cases_never_paths(user_dir):
    with pytest.raises(CaseError, match="unknown case"):
        CaseStudy.open(str(user_dir / "case.toml"), allow_path=False)
    with pytest.raises(CaseError, match="unknown case"):
        CaseStudy.open("/dev/zero", allow_path=False)


def test_casebook_cases_lists_only_files_with_a_dataset_table(tmp_path, monkeypatch):
    """``CASEBOOK_CASES=$PWD`` in the repository must not list ``pyproject.toml`` (issue 22): a
    TOML file is a case when it has a ``[dataset]`` table; a broken one with that line stays
    listed so that opening it says what is wrong."""
    from core.casestudy import list_cases

    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.ruff]\nline-length = 99\n')
    (tmp_path / "mine.toml").write_text('[dataset]\nsource = "folder"\nroot = "d"\n')
    (tmp_path / "broken.toml").write_text('[dataset]\nsource = "folder\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "case.toml").write_text('title = "t"\n[dataset]\nsource = "tensors"\n')
    (tmp_path / "tool").mkdir()
    (tmp_path / "tool" / "case.toml").write_text('[settings]\ndataset = "no table"\n')
    monkeypatch.setenv("CASEBOOK_CASES", str(tmp_path))
    names = list_cases()
    assert {"mine", "broken", "sub"} <= set(names)
    assert "pyproject" not in names and "tool" not in names
    monkeypatch.setenv("CASEBOOK_CASES", str(REPO))
    assert "pyproject" not in list_cases()


def test_cli_summary_names_every_row_and_shows_no_spread_for_one_seed():
    """``report CASE`` printed "?" for every essence and detection row and "± 0.000" with one seed
    (issue 22)."""
    from core.__main__ import _summary

    def rep(seeds):
        return {"case": "c", "title": "t", "built": {"models": True}, "seeds": seeds,
                "models": {"vanilla": {"train_acc": 0.9, "train_acc_sd": 0.0, "test_acc": 0.8,
                                       "test_acc_sd": 0.01}},
                "essence": [{"a": 0, "a_name": "circle", "b": 2, "b_name": "triangle",
                             "layer": "conv2", "fill": "mean", "model": "vanilla",
                             "top1_acc": 0.5, "full_acc": 0.9}],
                "detection": [{"detector": "mahalanobis", "layer": "fc1", "auc": 0.88},
                              {"detector": "max_softmax", "auc": 0.79}]}

    one = _summary(rep([0]))
    assert "?" not in one and "±" not in one and "1 seed" in one
    assert "conv2 circle vs triangle (mean) [vanilla]" in one
    assert "mahalanobis @ fc1" in one and "max_softmax " in one
    two = _summary(rep([0, 1]))
    assert "0.800 ± 0.010" in two and "2 seeds; mean ± sd" in two


def test_readme_command_list_names_every_cli_command():
    """The README's "Command line" list had no ``export`` (issue 22)."""
    from core.__main__ import _parser

    text = (REPO / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in sub.choices:
        assert f"python -m core {command}" in block, command
