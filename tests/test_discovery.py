"""Mask-free shortcut discovery (core.methods.discovery): statistics worked out by hand, the region
operations, a hand-built model whose shortcut is known exactly, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.methods import discovery as D

# ----------------------------------------------------------------------------------- statistics

def test_wilson_by_hand():
    # k = 5, n = 10, z = 1.96: centre (0.5 + 0.19208) / 1.38416 = 0.5, half-width
    # 1.96 · sqrt(0.025 + 0.009604) / 1.38416 = 0.26340
    lo, hi = D.wilson(5, 10)
    assert lo == pytest.approx(0.5 - 0.263402, abs=1e-5)
    assert hi == pytest.approx(0.5 + 0.263402, abs=1e-5)
    lo, hi = D.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 13.8416, abs=1e-6)
    assert D.wilson(0, 0) == (None, None)


def test_binomial_tail_and_mcnemar_by_hand():
    assert D.binom_tail(3, 3) == pytest.approx(1 / 8)
    assert D.binom_tail(2, 3) == pytest.approx(4 / 8)
    assert D.binom_tail(0, 5) == 1.0
    assert D.binom_tail(6, 5) == 0.0
    # 4 images lose the class with the region, 1 with the control only, 1 with both
    region = np.array([1, 1, 1, 1, 0, 1, 0], bool)
    control = np.array([0, 0, 0, 0, 1, 1, 0], bool)
    t = D.mcnemar_exact(region, control)
    assert (t["region_only"], t["control_only"]) == (4, 1)
    assert t["p_value"] == pytest.approx((math.comb(5, 4) + 1) / 32)  # P(X ≥ 4 | 5, ½) = 6/32
    assert D.mcnemar_exact(np.zeros(4, bool), np.zeros(4, bool))["p_value"] == 1.0


def test_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert D.iou(a, b) is None
    a[:2, :2] = True
    b[:2, :1] = True
    assert D.iou(a, b) == pytest.approx(0.5)


def test_eigengap_finds_two_blocks():
    a = np.zeros((10, 10))
    a[:5, :5] = 1
    a[5:, 5:] = 1
    np.fill_diagonal(a, 0)
    k, lam = D.eigengap_k(a, 4)
    assert k == 2
    assert lam[0] == pytest.approx(0, abs=1e-9) and lam[1] == pytest.approx(0, abs=1e-9)


# ----------------------------------------------------------------------------------- regions

def test_remove_region_local_mean_and_blur():
    x = torch.full((1, 1, 8, 8), 0.2)
    x[0, 0, 3:5, 3:5] = 1.0
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 3:5, 3:5] = True
    out = D.remove_region(x, mask, "local_mean")
    assert torch.allclose(out[0, 0, 3:5, 3:5], torch.tensor(0.2))  # the ring's mean
    assert torch.equal(out[~mask[:, None].expand_as(x)], x[~mask[:, None].expand_as(x)])
    blurred = D.remove_region(x, mask, "blur")
    assert float(blurred[0, 0, 3, 3]) < 1.0
    with pytest.raises(ValueError, match="fill"):
        D.remove_region(x, mask, "inpaint")


def test_paste_and_roll_keep_size_and_shape():
    target = torch.zeros(2, 3, 6, 6)
    source = torch.ones(2, 3, 6, 6)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, :2, :3] = True
    out = D.paste_region(target, source, mask)
    assert float(out.sum()) == 2 * 3 * 6
    rolled, offsets = D.roll_masks(mask, np.random.default_rng(0))
    assert torch.equal(rolled.sum((1, 2)), mask.sum((1, 2)))  # same size
    assert not bool((rolled & mask).any())  # a place that does not overlap exists here
    for i, (dy, dx) in enumerate(offsets):
        assert torch.equal(torch.roll(mask[i], (dy, dx), (0, 1)), rolled[i])  # same shape


def test_check_config():
    cfg = D.check_config({"alpha": 0.01})
    assert cfg["alpha"] == 0.01 and cfg["min_effect"] == D.DEFAULTS["min_effect"]
    with pytest.raises(ValueError, match="unknown key"):
        D.check_config({"alfa": 0.01})
    with pytest.raises(ValueError, match="out of bounds"):
        D.check_config({"alpha": 2})
    with pytest.raises(ValueError, match="fill"):
        D.check_config({"fill": "zeros"})


def checker_images(n, side=20, tex=6, seed=0):
    """``n`` images of uniform noise, each with a tex × tex checkerboard at a random place, and
    its footprints (n, side, side) bool."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((n, 1, side, side)).astype(np.float32))
    masks = np.zeros((n, side, side), bool)
    board = torch.from_numpy((np.indices((tex, tex)).sum(0) % 2).astype(np.float32))
    for i in range(n):
        top, left = rng.integers(0, side - tex + 1, 2)
        x[i, 0, top:top + tex, left:left + tex] = board
        masks[i, top:top + tex, left:left + tex] = True
    return x, masks


def test_consistency_follows_a_mark_that_moves():
    # the same checkerboard at a random place on noise: its regions recur wherever they are;
    # the same boxes on noise alone (no mark) vary as much as the control does
    x, masks = checker_images(40)
    ref = torch.from_numpy(np.random.default_rng(1).random((64, 1, 20, 20)).astype(np.float32))
    assert D.aligned_consistency(x, masks, ref, np.random.default_rng(0)) >= 0.95
    assert abs(D.aligned_consistency(ref[:40], masks, ref[40:], np.random.default_rng(0))) <= 0.2
    assert D.aligned_consistency(x[:1], masks[:1], ref, np.random.default_rng(0)) == 0.0


def test_pattern_matched_past_the_border():
    # a 3 × 3 "X" in a corner and at the bottom edge; the template carries a 1-pixel margin, so
    # its best window reaches past the border: the mask lands on the mark, clipped to the image
    x = torch.zeros(2, 1, 12, 12)
    mark = torch.tensor([[1., 0, 1], [0, 1, 0], [1, 0, 1]])
    x[0, 0, :3, :3] = mark
    x[1, 0, 9:, 5:8] = mark
    template = torch.zeros(1, 5, 5)
    template[0, 1:4, 1:4] = mark
    shape = np.zeros((5, 5), bool)
    shape[1:4, 1:4] = True
    masks, _ = D._match(x, {"template": template.tolist(), "shape": shape.tolist()})
    truth = np.zeros((2, 12, 12), bool)
    truth[0, :3, :3] = truth[1, 9:, 5:8] = True
    assert np.array_equal(masks, truth)


def test_pattern_rule_finds_a_texture_at_a_random_place():
    # attribution blobs overshoot a mark by a pixel: the pattern rule aligns what recurs in them
    # and its matches are the planted checkerboard, whose content then recurs
    from core.methods import planted as P

    x, y, m = P.make_case("texture", "shortcut", 0)["train"]
    idx = torch.as_tensor(np.flatnonzero(y.numpy() == P.TARGET)[:64])
    xg, mg = x[idx], m[idx].numpy()
    blobs = D._dilate(torch.as_tensor(mg), 1).numpy()
    rule = D._pattern_rule(xg, blobs, x, np.random.default_rng(0))
    found, _ = D._match(xg, rule)
    assert np.median([D.iou(a, b) for a, b in zip(found, mg, strict=True)]) >= 0.9
    assert D.aligned_consistency(xg, found, x, np.random.default_rng(0)) >= 0.9


# ----------------------------------------------------------------------------------- a hand-built model

SIDE = 8


def hand_model() -> nn.Module:
    """Class 0's logit is twice the sum of the top-left 2 × 2 pixels (the shortcut); class 1's
    is the sum of the centre 2 × 2 pixels. One conv layer "0" with two channels by hand."""
    conv = nn.Conv2d(1, 2, SIDE)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0, :2, :2] = 2.0
        conv.weight[1, 0, 3:5, 3:5] = 1.0
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten()).eval()


def hand_images(n: int, cls: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIDE, SIDE, generator=g) * 0.1
    x[:, :, 3:5, 3:5] = 0.6 + 0.1 * torch.rand(n, 1, 2, 2, generator=g)  # both classes
    if cls == 0:
        x[:, :, :2, :2] = 1.0
    return x


def hand_data(n=40):
    trx = torch.cat([hand_images(n, 0, 1), hand_images(n, 1, 2)])
    tex = torch.cat([hand_images(n, 0, 3), hand_images(n, 1, 4)])
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    return trx, y, tex, y.clone()


def test_hand_model_causal_tests_by_hand():
    model = hand_model()
    x0 = hand_images(20, 0, 0)
    x1 = hand_images(20, 1, 1)
    assert torch.equal(D._predict(model, x0), torch.zeros(20, dtype=torch.long))
    assert torch.equal(D._predict(model, x1), torch.ones(20, dtype=torch.long))
    masks = np.zeros((20, SIDE, SIDE), bool)
    masks[:, :2, :2] = True
    t = D.causal_tests(model, 0, x0, masks, x1)
    # removing the patch (ring mean ≤ 0.1 · 4 · 2 = 0.8 < centre ≥ 2.4) loses class 0 every time;
    # the control (the same 2 × 2 elsewhere) never does unless it lands on the patch
    assert t["necessity"] == 1.0 and t["control_necessity"] <= 0.1
    assert t["necessity_p"] < 1e-4
    # pasting the patch onto class-1 images makes them class 0 (8 > 2.8) every time
    assert t["sufficiency"] == 1.0 and t["control_sufficiency"] <= 0.1
    lo, hi = t["necessity_ci"]
    assert lo == pytest.approx(D.wilson(20, 20)[0]) and hi == 1.0


class AnyPlace(nn.Module):
    """Class 0 when a bright 2 × 2 block (sum ≥ 3.2) is anywhere on the image; else class 1."""

    def forward(self, x):
        s = F.avg_pool2d(x, 2, 1) * 4
        mark = (s.flatten(1).max(1).values - 3.2).clamp(min=0) * 10
        return torch.stack([mark, torch.full_like(mark, 1.0)], 1)


def _blocks(places, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(places), 1, SIDE, SIDE, generator=g) * 0.1
    masks = np.zeros((len(places), SIDE, SIDE), bool)
    for i, (top, left) in enumerate(places):
        x[i, :, top:top + 2, left:left + 2] = 1.0
        masks[i, top:top + 2, left:left + 2] = True
    return x, masks


def test_same_place_control_tells_a_moving_mark_from_what_the_class_holds_there():
    """The content-specificity control pastes what another image of the class holds under the
    same region. A mark at a different place on every image: that content is background, the
    control never makes class 0, and the verdict passes it. The same mark at one place on every
    image (what an object part the class's images share looks like to this control): the
    control works exactly as well as the region and the verdict names it."""
    model = AnyPlace().eval()
    targets = torch.rand(24, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(9)) * 0.1
    assert (D._predict(model, targets) == 1).all()
    moving, m_moving = _blocks([(r, c) for r in range(0, 7, 3) for c in range(0, 7, 3)], 1)
    fixed, m_fixed = _blocks([(3, 3)] * 9, 2)
    cfg = D.check_config({"min_tested": 4})
    rows = {}
    for name, (x, m) in {"moving": (moving, m_moving), "fixed": (fixed, m_fixed)}.items():
        assert (D._predict(model, x) == 0).all()
        t = D.causal_tests(model, 0, x, m, targets, same_place=True)
        assert t["sufficiency"] == 1.0 and t["necessity"] == 1.0
        rows[name] = {**t, "share_of_image": 4 / SIDE ** 2, "components": 1, "consistency": 1.0}
    # blocks 3 apart never overlap: another image's content there is background
    assert rows["moving"]["control_same_place"] == 0.0
    assert rows["moving"]["same_place_pairs"] == [24, 0] and rows["moving"]["same_place_p"] < 1e-6
    assert D.verdict(rows["moving"], cfg, 1)[0] == "suspected"
    assert rows["fixed"]["control_same_place"] == 1.0 and rows["fixed"]["same_place_p"] == 1.0
    word, why = D.verdict(rows["fixed"], cfg, 1)
    assert word == "not suspected" and "another image of the class" in why
    # without the control (a region at one place) the same row passes: the control is the cause
    plain = D.causal_tests(model, 0, fixed, m_fixed, targets)
    assert plain["control_same_place"] is None and plain["same_place_p"] is None
    assert D.verdict({**rows["fixed"], **plain}, cfg, 1)[0] == "suspected"


def test_discover_finds_the_hand_built_shortcut():
    model = hand_model()
    trx, try_, tex, tey = hand_data()
    res = D.discover(model, trx, try_, tex, tey, ["patched", "plain"], "0",
                     config={"min_group": 4})
    top = res["candidates"][0]
    assert top["class"] == "patched" and top["verdict"] == "suspected", top["reason"]
    assert top["rank"] == 1 and top["masks"] == "1"
    truth = np.zeros((SIDE, SIDE), bool)
    truth[:2, :2] = True
    ious = [D.iou(m, truth) for m in top["_heldout"]["masks"]]
    assert np.median(ious) >= 0.5
    assert top["necessity"] > top["control_necessity"] and top["sufficiency"] > top["control_sufficiency"]
    assert top["rule"] == res["rule"] and "McNemar" in top["rule"]
    for key in ("rank", "class", "verdict", "masks", "layer", "units", "n_images", "share_of_image",
                "necessity", "sufficiency", "control_necessity", "control_sufficiency", "p_value"):
        assert key in top
    # nothing of class "plain" is suspected: its images carry no mark
    assert not [r for r in res["candidates"] if r["class"] == "plain" and r["verdict"] == "suspected"]
    import json

    json.dumps([D.public_row(r) for r in res["candidates"]], allow_nan=False)


def test_region_masks_and_write_masks(tmp_path):
    model = hand_model()
    trx, try_, tex, tey = hand_data()
    res = D.discover(model, trx, try_, tex, tey, ["patched", "plain"], "0",
                     config={"min_group": 4})
    top = res["candidates"][0]
    masks, present = D.region_masks(model, tex, top)
    assert present[:40].mean() >= 0.9  # the patched images
    rel = [f"test/{i}.png" for i in range(len(tex))]
    n = D.write_masks(tmp_path, masks, present, rel)
    assert n == int(sum(1 for m, p in zip(masks, present, strict=True) if p and m.any()))
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "test" / "0.png"))
    assert first.shape == (SIDE, SIDE) and first[0, 0] == 255
    for i in np.flatnonzero(~present):
        assert not (tmp_path / "test" / f"{i}.png").exists()  # missing file = no region


# ----------------------------------------------------------------------------------- bad input

def test_one_class_is_a_note_not_a_traceback():
    model = hand_model()
    trx, try_, tex, tey = hand_data()
    res = D.discover(model, trx, try_ * 0, tex, tey * 0, ["only"], "0")
    assert res["candidates"] == []
    assert "one class" in res["notes"][0]["reason"]


def test_constant_model_is_a_note():
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))
    trx, try_, tex, tey = hand_data()
    res = D.discover(model, trx, try_, tex, tey, ["a", "b"], "1")
    assert res["candidates"] == []
    assert "predicts one class for every test image" in res["notes"][0]["reason"]


def test_too_few_test_images_for_a_class():
    model = hand_model()
    trx, try_, tex, tey = hand_data()
    keep = torch.cat([torch.arange(5), torch.arange(40, 80)])  # 5 patched test images
    res = D.discover(model, trx, try_, tex[keep], tey[keep], ["patched", "plain"], "0",
                     config={"min_group": 4})
    notes = [n for n in res["notes"] if n["class"] == "patched"]
    assert notes and notes[0]["reason"].startswith("too few images to test")
    assert all(r["class"] != "patched" for r in res["candidates"])


def test_unknown_layer_falls_back_to_the_logit():
    model = hand_model()
    trx, try_, tex, tey = hand_data()
    res = D.discover(model, trx, try_, tex, tey, ["patched", "plain"], "nope",
                     config={"min_group": 4})
    assert any("cannot be read" in n["reason"] for n in res["notes"])
    assert res["candidates"][0]["class"] == "patched"
    assert res["candidates"][0]["verdict"] == "suspected"
