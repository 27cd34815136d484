"""core.stages.detection on the real pretrained O-Net and a handful of real LFW-subset images (seconds)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("skimage")

from core.cases.faces.adapter import faces_data  # noqa: E402
from core.cases.faces.onet import STD, FaceDetector, onet_weights_path  # noqa: E402
from core.cases.seam import SourceError  # noqa: E402
from core.methods.training import predict_logits  # noqa: E402
from core.stages.detection import (  # noqa: E402
    DEFAULTS,
    Detectors,
    check_config,
    input_bounds,
    mahalanobis_scores,
    mask_experts_region,
    max_softmax_scores,
    patch_attack,
    patch_masks,
    roc,
    window_concentration,
)

try:
    onet_weights_path()
    HAVE_WEIGHTS = True
except SourceError:
    HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="facenet-pytorch (onet.pt) not installed")

LO, HI = (0 - 0.5) / STD[0], (1 - 0.5) / STD[0]


@pytest.fixture(scope="module")
def data():
    return faces_data({"augment": 1})


@pytest.fixture(scope="module")
def model():
    return FaceDetector(pretrained=True)


def test_roc_known_values():
    r = roc([0.0, 1.0, 2.0, 3.0], [2.5, 3.5, 4.0, 0.5])
    assert r["auc"] == pytest.approx(12 / 16)   # pairs attacked > clean: 3 + 4 + 4 + 1 of 16
    assert r["tpr_at"][0.01] == 0.5 and r["tpr_at"][0.25] == 0.75   # thresholds 3.5 and 2.5
    assert r["fpr"][0] == 0 and r["tpr"][-1] == 1 and r["fpr"][-1] == 1
    perfect = roc([0, 1], [2, 3])
    assert perfect["auc"] == 1 and perfect["tpr_at"][0.01] == 1
    assert roc([1, 1], [1, 1])["auc"] == 0.5
    with pytest.raises(ValueError):
        roc([], [1.0])


def test_patch_masks_are_squares_inside_the_image():
    m = patch_masks(20, 5, (16, 12), seed=3)
    assert m.shape == (20, 1, 16, 12) and (m.flatten(1).sum(1) == 25).all()
    assert torch.equal(m, patch_masks(20, 5, (16, 12), seed=3))
    with pytest.raises(ValueError):
        patch_masks(1, 20, (16, 12))


def test_window_concentration():
    maps = torch.zeros(2, 10, 10)
    maps[0, 2:4, 5:7] = 1.0        # all mass in one 3×3 window
    maps[1] = 1.0                  # uniform: 9/100
    share, corner = window_concentration(maps, 3)
    assert share[0] == pytest.approx(1.0) and share[1] == pytest.approx(0.09)
    r, c = corner[0].tolist()
    assert r <= 2 and r + 3 >= 4 and c <= 5 and c + 3 >= 7


def test_check_config_defaults_and_errors():
    cfg = check_config({})
    assert cfg == DEFAULTS and cfg is not DEFAULTS
    assert check_config({"patch_size": 6, "layers": ["a"]})["layers"] == ["a"]
    for bad in ({"bogus": 1}, {"steps": -1}, {"patch_size": 0}, {"layers": []},
                {"shrink": 2}, {"adaptive": "yes"}, {"step_size": 0}, {"n_fit": True}):
        with pytest.raises(ValueError, match=r"^\[detection\]") as err:
            check_config(bad)
        assert "\n" not in str(err.value)


@needs_weights
def test_patch_attack_fools_the_detector_and_stays_in_bounds(data, model):
    test = data.evaluation_sets["clean_test"]
    x, y = test.x[::10], test.y[::10]         # 5 images: faces and non-faces
    adv, mask = patch_attack(model, x, 1 - y, size=12, steps=25, seed=0, bounds=(LO, HI))
    assert adv.shape == x.shape and mask.shape == (len(x), 1, 48, 48)
    assert torch.equal(adv[~mask.expand_as(adv)], x[~mask.expand_as(x)])   # only the patch moves
    assert adv.min() >= LO - 1e-6 and adv.max() <= HI + 1e-6
    flipped = (predict_logits(model, adv).argmax(1) != y).float().mean()
    assert flipped >= 0.6                          # a 12×12 patch fools the pretrained O-Net
    assert torch.equal(predict_logits(model, x).argmax(1), y)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@needs_weights
def test_detectors_on_a_handful_of_images(data, model):
    clean = data.training_sets["clean"]
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(clean.n, generator=g)[:14]
    fit_x, fit_y = clean.x[idx[:10]], clean.y[idx[:10]]
    lr_x, lr_y = clean.x[idx[10:]], clean.y[idx[10:]]
    lr_adv, _ = patch_attack(model, lr_x, 1 - lr_y, size=12, steps=15, seed=1, bounds=(LO, HI))
    dets = Detectors(model, ["onet.conv4", "onet.dense5"], "onet.dense5", "onet.conv4",
                     resolution=2, window=12)
    dets.fit(fit_x, fit_y, lr_x, lr_adv)
    test = data.evaluation_sets["clean_test"]
    x = test.x[::12]
    adv, _ = patch_attack(model, x, 1 - test.y[::12], size=12, steps=15, seed=2, bounds=(LO, HI))
    s_clean, s_adv = dets.scores(x), dets.scores(adv)
    for name in ("influence_combined", "influence_naive", "max_softmax", "mahalanobis"):
        assert s_clean[name].shape == (len(x),) and torch.isfinite(s_adv[name]).all()
    assert s_clean["features"].shape == (len(x), len(dets.names)) == (len(x), 9)
    # the O-Net's clean images are far more typical than its attacked ones at conv4
    j = dets.names.index("point:onet.conv4")
    assert s_adv["features"][:, j].mean() > s_clean["features"][:, j].mean()
    assert torch.allclose(mahalanobis_scores(model, "onet.dense5", fit_x, fit_y, x),
                          s_clean["mahalanobis"])
    msp = max_softmax_scores(model, x)
    assert ((msp >= 0) & (msp <= 0.5)).all()


@needs_weights
def test_masking_keeps_clean_images_and_returns_a_square(data, model):
    test = data.evaluation_sets["clean_test"]
    x, y = test.x[::10], test.y[::10]
    res = mask_experts_region(model, x, y, "onet.conv4", resolution=2, window=8)
    assert res["before"] == 1.0 and 0 <= res["recovered"] <= 1
    assert (res["mask"].flatten(1).sum(1) == 64).all()


@needs_weights
def test_build_on_a_tiny_context(data, model):
    from core.stages.base import StageContext
    from core.stages.detection import build

    data_small = data
    section = {"model": "pretrained", "train_set": "clean", "eval_set": "clean_test",
               "layers": ["onet.conv4", "onet.dense5"], "steps": 10, "n_fit": 10,
               "n_attack_fit": 4, "n_eval": 4, "resolution": 2, "n_examples": 2,
               "adaptive_weight": 1.0}
    calls = []
    ctx = StageContext.standalone(
        "detection", data_small, {"watermarked": model, "pretrained": model}, section=section,
        experts={"layers": ["onet.dense5"]}, device=torch.device("cpu"),
        progress=lambda d, t, m: calls.append((d, t, m)))
    out = build(ctx)
    names = [r["detector"] for r in out["rows"]]
    assert {"influence_combined", "max_softmax", "mahalanobis"} <= set(names)
    for r in out["rows"]:
        assert 0 <= r["auc"] <= 1 and 0 <= r["tpr_at_5"] <= 1 and r["n_clean"] == 4
    assert out["attack"]["model"] == "pretrained" and out["attack"]["size"] == 12
    assert out["adaptive"] and 0 <= out["adaptive"]["success"] <= 1
    assert calls and calls[-1][0] == calls[-1][1]
    assert input_bounds(data_small)[0][0] == pytest.approx(LO)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str | float | int) and plain(x) for k, x in v.items())
        if isinstance(v, list | tuple):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, str | int | float | bool | torch.Tensor)

    assert plain(out)


def _attack_reference(model, x, target, *, size, steps, seed, bounds, step_size=None):
    """The attack written straight from its definition: every image takes all ``steps`` steps."""
    import torch.nn.functional as F
    lo, hi = (torch.tensor(b, dtype=x.dtype) for b in bounds)
    step_size = float(hi - lo) / 16 if step_size is None else step_size
    masks = patch_masks(len(x), size, tuple(x.shape[-2:]), seed).expand_as(x)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    patch = lo + noise * (hi - lo)
    model.eval()
    for _ in range(steps):
        patch = patch.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(torch.where(masks, patch, x)), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, patch)
        patch = torch.clamp(patch.detach() - step_size * grad.sign(), lo, hi)
    return torch.where(masks, patch, x)


def test_patch_attack_leaving_cycles_early_gives_the_full_run():
    """Images whose patch has reached a fixed point or a two-cycle leave the batch early; their
    patches after all the steps equal a plain run of every step (and some did leave early)."""
    from core.cases.decoy_mnist.net import DecoyCNN
    torch.manual_seed(0)
    net = DecoyCNN().eval()                     # random weights: sign steps settle quickly
    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    target = torch.arange(10)
    for steps in (60, 61):                       # an even and an odd number of steps left
        stats = {}
        adv, _ = patch_attack(net, x, target, size=7, steps=steps, seed=3, bounds=(0.0, 1.0),
                              batch_size=4, stats=stats)
        ref = _attack_reference(net, x, target, size=7, steps=steps, seed=3, bounds=(0.0, 1.0))
        assert stats["full"] == len(x) * steps
        assert stats["image_steps"] < stats["full"]     # the early exit did happen
        assert torch.allclose(adv, ref, atol=1e-6)
