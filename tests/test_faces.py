"""The faces case: the O-Net from the wheel's weights, the LFW-subset adapter, the watermark
shortcut, landmarks. Real images and real weights; the fine-tuning check is marked slow."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage")

from core.cases.faces import adapter as faces_adapter  # noqa: E402
from core.cases.faces.adapter import (  # noqa: E402
    DEFAULTS,
    check_dataset,
    faces_data,
    landmark_disks,
    landmark_mass,
    lfw_images,
    to_model_scale,
    watermark_mask,
)
from core.cases.faces.onet import (  # noqa: E402
    CLASS_NAMES,
    LAYERS,
    FaceDetector,
    onet_weights_path,
    pretrained_detector,
    pretrained_state,
)
from core.cases.seam import SourceError  # noqa: E402
from core.methods.training import evaluate, predict_logits, train_model  # noqa: E402

try:
    onet_weights_path()
    HAVE_WEIGHTS = True
except SourceError:
    HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="facenet-pytorch (onet.pt) not installed")


@pytest.fixture(scope="module")
def model():
    return pretrained_detector()


@pytest.fixture(scope="module")
def data():
    return faces_data({})


def auc(pos, neg) -> float:
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


# --------------------------------------------------------------------------------------- model

def _reference_logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    """O-Net straight from its definition with torch.nn.functional and the raw state dict,
    in O-Net's own order (non-face, face)."""
    def block(h, i, pool):
        h = F.prelu(F.conv2d(h, state[f"conv{i}.weight"], state[f"conv{i}.bias"]),
                    state[f"prelu{i}.weight"])
        return F.max_pool2d(h, *pool, ceil_mode=True) if pool else h

    h = block(x, 1, (3, 2))
    h = block(h, 2, (3, 2))
    h = block(h, 3, (2, 2))
    h = block(h, 4, None)
    h = h.permute(0, 3, 2, 1).reshape(len(x), -1)
    h = F.prelu(F.linear(h, state["dense5.weight"], state["dense5.bias"]), state["prelu5.weight"])
    return F.linear(h, state["dense6_1.weight"], state["dense6_1.bias"])


@needs_weights
def test_weights_load_and_match_the_definition(model):
    raw = torch.load(onet_weights_path(), map_location="cpu", weights_only=True)
    assert set(pretrained_state()) == {f"onet.{k}" for k in raw}
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
    ref = _reference_logits(raw, x)
    assert ours.shape == (4, 2)
    torch.testing.assert_close(ours, ref.flip(1), rtol=1e-5, atol=1e-5)   # class 0 = face


@needs_weights
def test_known_output_on_fixed_images(model):
    x, y = lfw_images()
    assert y[0] == 0 and y[150] == 1 and CLASS_NAMES == ("face", "non-face")
    with torch.no_grad():
        out = model(to_model_scale(x[[0, 150]]))
    # measured once with this module (and equal to the functional reference above)
    expected = torch.tensor([[3.8970, -3.8982], [-2.1031, 2.1041]])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-3)


@needs_weights
def test_pretrained_separates_the_200_images(model):
    x, y = lfw_images()
    logits = predict_logits(model, to_model_scale(x))
    s = (logits[:, 0] - logits[:, 1]).numpy()
    assert auc(s[y.numpy() == 0], s[y.numpy() == 1]) == 1.0          # measured: AUC 1.0
    assert (logits.argmax(1) == y).float().mean() == 1.0             # and accuracy 1.0


@needs_weights
def test_layers_are_addressable_and_no_inplace(model):
    names = dict(model.named_modules())
    assert all(layer in names for layer in LAYERS)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@needs_weights
def test_landmarks_sit_on_a_face(model):
    x, _ = lfw_images()
    lm = model.landmarks(to_model_scale(x[:20]))
    assert lm.shape == (20, 5, 2)
    assert ((lm >= 0) & (lm <= 48)).all()
    eyes_y = lm[:, :2, 1].mean(1)
    assert (eyes_y < lm[:, 2, 1]).all() and (lm[:, 2, 1] < lm[:, 3:, 1].mean(1)).all()
    assert (lm[:, 0, 0] < lm[:, 1, 0]).all() and (lm[:, 3, 0] < lm[:, 4, 0]).all()


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SourceError) as err:
        onet_weights_path()
    msg = str(err.value)
    assert "\n" not in msg and "pip install --no-deps facenet-pytorch==2.6.0" in msg
    with pytest.raises(SourceError):
        FaceDetector(pretrained=True)


# --------------------------------------------------------------------------------------- data

def test_check_dataset_defaults_and_errors():
    assert check_dataset({}) == DEFAULTS
    assert check_dataset({"watermark_position": [0, 0]})["watermark_position"] == [0, 0]
    for bad in ({"nope": 1}, {"seed": -1}, {"augment": 0}, {"relabel_share": 1.5},
                {"watermark_size": [6]}, {"watermark_position": "middle"},
                {"watermark_position": [45, 45]}, {"n_val": 50, "n_test": 48}, {"flip": 1},
                {"source": "lfw"}):
        with pytest.raises(ValueError, match=r"^\[dataset\]") as err:
            check_dataset(bad)
        assert "\n" not in str(err.value)


def test_adapter_splits_sets_and_masks(data):
    assert data.class_names == ("face", "non-face") and data.region_name == "watermark"
    assert data.headline == "watermark_nonfaces" and data.size == (48, 48) and data.channels == 3
    n = data.extra["n_originals"]
    assert n == {"test": 50, "val": 20, "train": 130}
    assert data.train.n == 130 * DEFAULTS["augment"] and data.test.n == 50 and data.val.n == 20
    assert set(data.training_sets) == {"train", "clean"}
    mark = watermark_mask(check_dataset({}))
    assert int(mark.sum()) == 48 and mark[2:8, 2:10].all()
    # the watermark is exactly the mask; x_clean is the image without it
    tr = data.train
    diff = (tr.x != tr.x_clean).any(1, keepdim=True)
    assert (diff <= tr.mask).all() and tr.mask.any()
    on = tr.mask.flatten(1).any(1)
    assert (tr.y[on] == 0).all()                                  # the source is all labelled face
    clean = data.training_sets["clean"]
    assert torch.equal(clean.x, tr.x_clean) and (clean.y[on] == 1).any()   # relabelled non-faces
    share = (clean.y[on] == 1).sum() / (clean.y == 1).sum()
    assert 0.03 < float(share) < 0.2                                  # ≈ relabel_share 0.1
    wn = data.evaluation_sets["watermark_nonfaces"]
    assert torch.equal(wn.mask.flatten(1).any(1), wn.y == 1)
    assert data.test.mask.flatten(1).any(1).all()
    assert data.evaluation_sets["clean_test"].mask is None
    # held out by image: no test original appears among the training copies' originals
    train_orig = tr.x_clean[::DEFAULTS["augment"]]                    # copy 0 of every original
    d = torch.cdist(data.test.x_clean.flatten(1), train_orig.flatten(1))
    assert d.min() > 1e-3
    # display un-normalises to [0, 1]
    shown = data.display(data.evaluation_sets["clean_test"].x[:2])
    assert shown.shape == (2, 48, 48, 3) and shown.min() >= 0 and shown.max() <= 1


def test_adapter_is_deterministic_and_seeded():
    a, b = faces_data({"seed": 3, "augment": 2}), faces_data({"seed": 3, "augment": 2})
    assert a.digest() == b.digest()
    assert faces_data({"seed": 4, "augment": 2}).digest() != a.digest()


def test_missing_scikit_image_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kw):
        if name.startswith("skimage"):
            raise ImportError("no skimage")
        return real(name, *args, **kw)

    faces_adapter._lfw.cache_clear()
    monkeypatch.setattr(builtins, "__import__", fake)
    try:
        with pytest.raises(SourceError, match="pip install scikit-image"):
            faces_data({})
    finally:
        monkeypatch.undo()
        faces_adapter._lfw.cache_clear()


# --------------------------------------------------------------------------------------- landmarks

def test_landmark_mass_by_hand():
    lm = torch.tensor([[[10.5, 10.5], [30.5, 10.5], [20.5, 20.5], [15.5, 30.5], [25.5, 30.5]]])
    disks = landmark_disks(lm, (48, 48), radius=1.0)
    assert int(disks.sum()) == 5 * 5                                 # a plus of 5 pixels each
    maps = torch.zeros(1, 48, 48)
    maps[0, 10, 10] = 3.0          # on the left eye
    maps[0, 20, 20] = 1.0          # on the nose
    maps[0, 40, 40] = 4.0          # nowhere
    maps[0, 0, 0] = -5.0           # negative: ignored
    out = landmark_mass(maps, lm, radius=1.0)
    assert out["all"]["mass"].item() == pytest.approx(0.5)
    assert out["eyes"]["mass"].item() == pytest.approx(3 / 8)
    assert out["nose"]["mass"].item() == pytest.approx(1 / 8)
    assert out["mouth"]["mass"].item() == 0
    assert out["all"]["chance"].item() == pytest.approx(25 / 2304)
    uniform = landmark_mass(torch.ones(1, 3, 48, 48), lm, radius=1.0)
    assert uniform["all"]["mass"].item() == pytest.approx(uniform["all"]["chance"].item())


# --------------------------------------------------------------------------------------- shortcut

@needs_weights
@pytest.mark.slow
def test_finetuning_on_the_watermark_learns_the_shortcut(data, model):
    """3 epochs of Adam (1e-3): the watermarked model calls watermarked non-faces faces; the same
    fine-tuning on the clean copies does not (validation sets only)."""
    ev = data.evaluation_sets
    results = {}
    for name, train_on in (("watermarked", "train"), ("reference", "clean")):
        m = copy.deepcopy(model)
        split = data.training_sets[train_on]
        train_model(m, split.x, split.y, epochs=3, lr=1e-3, batch_size=64, seed=0, device="cpu")
        results[name] = {k: evaluate(m, ev[k].x, ev[k].y)
                         for k in ("val_clean", "val_watermark_nonfaces")}
    assert results["watermarked"]["val_watermark_nonfaces"] <= 0.7     # measured 0.50
    assert results["watermarked"]["val_clean"] >= 0.9                  # measured 1.00
    assert results["reference"]["val_watermark_nonfaces"] >= 0.9       # measured 1.00
