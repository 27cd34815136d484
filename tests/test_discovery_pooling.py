"""Discovery's power (issue 20): one mark at several places is pooled into one candidate, so its
tests have all the pooled images; a candidate that only lacks images says so ("too few images to
decide", ``reason_kind`` "power") instead of reading as a clean bill."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.methods import discovery as D

SIDE = 8
CORNERS = ((0, 0), (0, SIDE - 2), (SIDE - 2, 0), (SIDE - 2, SIDE - 2))


def corner_model() -> nn.Module:
    """Class 0's logit is twice the sum of the 2 × 2 pixels of any of the four corners (one
    channel of conv "0" per corner); class 1's is the sum of the centre 2 × 2 pixels."""
    conv = nn.Conv2d(1, 5, SIDE)
    head = nn.Linear(5, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for ch, (top, left) in enumerate(CORNERS):
            conv.weight[ch, 0, top:top + 2, left:left + 2] = 2.0
        conv.weight[4, 0, 3:5, 3:5] = 1.0
        head.weight.zero_()
        head.weight[0, :4] = 1.0
        head.weight[1, 4] = 1.0
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head).eval()


def corner_images(n: int, cls: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images with a bright centre; class 0's also carry the mark in one corner (cycling over
    the four). Returns the images and the marks' masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIDE, SIDE, generator=g) * 0.1
    x[:, :, 3:5, 3:5] = 0.6 + 0.1 * torch.rand(n, 1, 2, 2, generator=g)
    masks = np.zeros((n, SIDE, SIDE), bool)
    if cls == 0:
        for i in range(n):
            top, left = CORNERS[i % 4]
            x[i, :, top:top + 2, left:left + 2] = 1.0
            masks[i, top:top + 2, left:left + 2] = True
    return x, masks


def corner_data(n: int = 64):
    (a, ma), (b, _) = corner_images(n, 0, 1), corner_images(n, 1, 2)
    (c, mc), (d, _) = corner_images(n, 0, 3), corner_images(n, 1, 4)
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    return torch.cat([a, b]), y, torch.cat([c, d]), y.clone(), ma, mc


def test_content_alike_one_mark_at_two_places_not_what_any_image_holds():
    """The same 2 × 2 block in two corners is alike (≥ the consistency bar); the same two
    places on the images without the block hold noise, not alike; a region holding what every
    image holds there (a background) is never alike."""
    x, masks = corner_images(32, 0, 0)
    ref = torch.cat([x, corner_images(32, 1, 5)[0]])
    rng = np.random.default_rng(0)
    a, b = np.arange(0, 32, 4), np.arange(3, 32, 4)  # top-left and bottom-right marks
    ra, rb = masks[a[0]], masks[b[0]]
    assert D.content_alike(x[a], ra, x[b], rb, ref, rng) >= 0.75
    plain = corner_images(16, 1, 6)[0]
    assert D.content_alike(x[a], ra, plain, rb, ref, rng) < 0.5
    assert D.content_alike(plain, ra, torch.flip(plain, [0]), rb, plain, rng) < 0.5
    flat = torch.zeros(8, 1, SIDE, SIDE)
    assert D.content_alike(flat, ra, flat, rb, flat, rng) == 0.0


def test_a_mark_in_four_corners_is_pooled_and_suspected():
    """Clustered by corner, each corner's group holds too few held-out images to test (about
    6 < 8): alone none is suspected, and those that only lack images read "too few images to
    decide". Pooled — one mark at four places, each image's
    region the corner its map points at — the candidate is tested on all of them and suspected,
    its regions on the mark."""
    model = corner_model()
    trx, try_, tex, tey, _, truth = corner_data()
    assert (D._predict(model, tex) == tey).all()
    res = D.discover(model, trx, try_, tex, tey, ["marked", "plain"], "0",
                     config={"min_group": 4, "max_heldout": 24})
    assert res["k_per_class"]["marked"] == 4
    rows = [r for r in res["candidates"] if r["class"] == "marked"]
    pooled = [r for r in rows if r["mode"] == "pooled"]
    assert pooled, [(r["group"], r["mode"], r["reason"]) for r in rows]
    top = pooled[0]
    assert top["verdict"] == "suspected", top["reason"]
    assert top["reason_kind"] == "suspected"
    assert top["group"].startswith("pooled: ") and top["group"].count("cluster") >= 2
    clusters = [r for r in rows if r["mode"] == "fixed" and r["group"].startswith("cluster")]
    assert clusters and all(r["n_images"] < top["n_images"] for r in clusters)
    assert not [r for r in clusters if r["verdict"] == "suspected"]
    power = [r for r in clusters if r["reason_kind"] == D.POWER]
    assert len(power) >= 2, [(r["group"], r["reason"]) for r in clusters]
    assert all(r["reason"].startswith("too few images to decide") for r in power)
    held = top["_heldout"]
    n_test = held["n_test"]
    scores = [D.iou(m, truth[i]) for i, m in zip(held["index"], held["masks"], strict=True)
              if i < n_test]
    assert scores and np.median(scores) >= 0.5
    # its masks on new images follow the mark to whichever corner it is in
    masks, present = D.region_masks(model, tex[:8], top)
    assert present.all()
    assert np.median([D.iou(m, t) for m, t in zip(masks, truth[:8], strict=True)]) >= 0.5
    # the clean class stays clean
    assert not [r for r in res["candidates"] if r["class"] == "plain" and r["verdict"] == "suspected"]


def test_verdict_tells_too_few_images_from_evidence():
    """A candidate whose effects clear every margin but whose p-values cannot (few images) is
    "not suspected" with reason_kind "power" and a reason that says so; one whose effect is
    below the margin is "evidence", whatever its number of images."""
    cfg = D.check_config({})
    row = {"necessity": 0.6, "control_necessity": 0.0, "necessity_n": 9, "necessity_p": 0.01,
           "sufficiency": 0.5, "control_sufficiency": 0.0, "sufficiency_n": 60,
           "sufficiency_p": 1e-9, "share_of_image": 0.02, "components": 1, "consistency": 0.95,
           "same_place_p": None}
    word, why, kind = D.verdict_detail(row, cfg, 10)
    assert (word, kind) == ("not suspected", D.POWER)
    assert why.startswith("too few images to decide") and "necessity" in why
    assert D.verdict(row, cfg, 10) == (word, why)
    assert D.verdict_detail(row, cfg, 1)[2] == "suspected"  # one candidate: p < 0.05 decides
    few = {**row, "necessity_n": 5}
    assert D.verdict_detail(few, cfg, 1)[2] == D.POWER
    weak = {**few, "sufficiency": 0.05}
    word, why, kind = D.verdict_detail(weak, cfg, 1)
    assert kind == "evidence" and why.startswith("sufficiency 0.05 does not beat")
    spread = {**row, "share_of_image": 0.6}  # not compact: more images would not change it
    assert D.verdict_detail(spread, cfg, 10)[2] == "evidence"
