"""core.queries.explain: a reader's own image read safely from memory, converted to the case's input, and
explained (prediction, Integrated Gradients, the predicted class's experts)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.queries.explain import MAX_BYTES, ImageError, explain_image, read_image, to_model_input


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_png_becomes_the_case_input_in_colour():
    a = np.zeros((10, 20, 3), np.uint8)
    a[..., 0] = 255  # pure red
    out = read_image(_bytes(Image.fromarray(a)), (48, 48), 3)
    assert out.shape == (48, 48, 3) and out.dtype == np.float32
    assert np.allclose(out[..., 0], 1.0) and np.allclose(out[..., 1:], 0.0)


def test_colour_to_grey_and_grey_to_colour():
    rgb = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    grey = read_image(_bytes(rgb), (28, 28), 1)
    assert grey.shape == (28, 28) and np.allclose(grey, 200 / 255, atol=1 / 255)
    g = Image.fromarray(np.full((8, 8), 51, np.uint8), mode="L")
    col = read_image(_bytes(g), (4, 6), 3)
    assert col.shape == (4, 6, 3) and np.allclose(col, 51 / 255, atol=1 / 255)


def test_transparency_is_flattened_onto_black_and_palette_and_16_bit_read():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:2, :, 3] = 255  # top half opaque white, bottom half transparent
    out = read_image(_bytes(Image.fromarray(rgba, "RGBA")), (4, 4), 1)
    assert np.allclose(out[:2], 1.0) and np.allclose(out[2:], 0.0)
    pal = Image.fromarray(np.full((4, 4, 3), 100, np.uint8)).convert("P")
    assert read_image(_bytes(pal), (4, 4), 3).shape == (4, 4, 3)
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.allclose(read_image(_bytes(deep), (4, 4), 1), 1.0)


def test_jpeg_is_accepted():
    img = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    out = read_image(_bytes(img, "JPEG", quality=95), (16, 16), 3)
    assert np.allclose(out, 128 / 255, atol=3 / 255)


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"not an image at all", "not a readable"),
    (None, "bytes"),
])
def test_unreadable_input_is_one_line(data, words):
    with pytest.raises(ImageError, match=words) as info:
        read_image(data, (8, 8), 3)
    assert "\n" not in str(info.value)


def test_other_formats_are_refused():
    gif = _bytes(Image.fromarray(np.zeros((4, 4), np.uint8)), "GIF")
    with pytest.raises(ImageError, match="PNG or JPEG"):
        read_image(gif, (8, 8), 3)


def test_a_file_over_the_size_cap_is_refused_before_decoding():
    with pytest.raises(ImageError, match="at most"):
        read_image(b"\x89PNG" + b"\0" * (MAX_BYTES + 1), (8, 8), 3)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = _bytes(Image.new("1", (6000, 5000)))  # 30 M pixels in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="pixels"):
        read_image(bomb, (8, 8), 1)
    huge = _bytes(Image.new("1", (10000, 10000)))  # above Pillow's own limit (~89 M): its warning
    with pytest.raises(ImageError, match="pixels"):  # becomes an error, not a decode
        read_image(huge, (8, 8), 1, max_pixels=10**12)


def test_truncated_data_is_refused():
    data = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    with pytest.raises(ImageError):
        read_image(data[: len(data) // 2], (8, 8), 3)


def test_to_model_input_inverts_the_display():
    pic = np.random.default_rng(1).random((5, 6, 3)).astype(np.float32)
    t = to_model_input(pic, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    assert tuple(t.shape) == (1, 3, 5, 6)
    back = t[0].permute(1, 2, 0).numpy() * np.array([0.2, 0.25, 0.5]) + np.array([0.5, 0.4, 0.3])
    assert np.allclose(back, pic, atol=1e-6)


def test_explain_image_on_the_small_case(small_study):
    s = small_study.samples("test", 1)
    layer = small_study.config.experts["layers"][0]
    res = explain_image(small_study, small_study.subject, s["x"][0], layer=layer, k=2, resolution=4)
    assert len(res["probs"]) == 10 and abs(sum(res["probs"]) - 1) < 1e-4
    assert res["pred"] == int(np.argmax(res["probs"]))
    assert res["attribution"].shape == (28, 28)
    assert len(res["experts"]) == 2 and all(e["map"].shape == (28, 28) for e in res["experts"])
    if res["source"] == "experts stage":
        rows = sorted(small_study.experts(small_study.subject, layer, res["pred"])["rows"],
                      key=lambda r: r["rank"])
        assert [e["unit"] for e in res["experts"]] == [r["unit"] for r in rows[:2]]


# ------------------------------------------------------------------------ one image, end to end


def test_trace_image_follows_one_test_image_through_every_expert_layer(small_study):
    import torch

    from core.queries.explain import trace_image

    model, layers = small_study.subject, list(small_study.config.experts["layers"])
    res = trace_image(small_study, model, 5, k=2, resolution=4)
    s = small_study.samples("test", 6)
    assert res["index"] == 5 and res["split"] == "test" and res["model"] == model
    assert res["image"].shape == s["x"][5].shape and np.allclose(res["image"], s["x"][5], atol=1e-6)
    assert res["label"] == int(s["y"][5])
    assert len(res["probs"]) == 10 and abs(sum(res["probs"]) - 1) < 1e-4
    data = small_study.data()
    with torch.no_grad():
        logits = small_study.model(model)(data.test.x[5:6])
    assert res["pred"] == int(logits.argmax(1)[0]) == int(np.argmax(res["probs"]))
    assert res["correct"] == (res["pred"] == res["label"])
    assert res["attribution"].shape == (28, 28)
    assert [ly["layer"] for ly in res["layers"]] == layers
    mask = s["mask"]
    for ly in res["layers"]:
        assert ly["class"] == res["pred"] and ly["source"] in ("experts stage", "this image")
        assert len(ly["experts"]) == 2
        for e in ly["experts"]:
            assert e["map"].shape == (28, 28)
            if mask is None:
                assert e["region_mass"] is None
            elif e["region_mass"] is not None:
                assert 0.0 <= e["region_mass"] <= 1.0
    if mask is not None:
        assert res["mask"].shape == (28, 28) and res["mask"].dtype == bool
        assert np.array_equal(res["mask"], mask[5])


def test_trace_image_experts_match_explain_image_layer_by_layer(small_study):
    from core.queries.explain import trace_image

    model = small_study.subject
    s = small_study.samples("test", 3)
    res = trace_image(small_study, model, 2, k=2, resolution=4)
    for ly in res["layers"]:
        one = explain_image(small_study, model, s["x"][2], layer=ly["layer"], k=2, resolution=4)
        assert one["pred"] == res["pred"] and one["source"] == ly["source"]
        assert [e["unit"] for e in one["experts"]] == [e["unit"] for e in ly["experts"]]
        assert np.allclose([e["score"] for e in one["experts"]], [e["score"] for e in ly["experts"]],
                           rtol=1e-4, atol=1e-6)
        for a, b in zip(one["experts"], ly["experts"], strict=True):
            assert np.allclose(a["map"], b["map"], rtol=1e-3, atol=1e-5)


def test_trace_image_of_a_picture_and_of_chosen_layers(small_study):
    from core.queries.explain import trace_image

    pic = small_study.samples("test", 1)["x"][0]
    res = trace_image(small_study, small_study.subject, pic, layers=["conv2"], k=1, resolution=4)
    assert res["index"] is None and res["label"] is None and res["mask"] is None
    assert res["correct"] is None
    assert [ly["layer"] for ly in res["layers"]] == ["conv2"] and len(res["layers"][0]["experts"]) == 1
    assert res["layers"][0]["experts"][0]["region_mass"] is None
    none = trace_image(small_study, small_study.subject, 0, layers=[], resolution=4)
    assert none["layers"] == []


@pytest.mark.parametrize("bad, error, words", [
    (10_000, IndexError, "out of range"),
    (-1, IndexError, "out of range"),
    ("3", TypeError, "integer"),
    (True, TypeError, "integer"),
    (2.0, TypeError, "integer"),
])
def test_trace_image_refuses_a_bad_index_in_one_line(small_study, bad, error, words):
    from core.queries.explain import trace_image

    with pytest.raises(error, match=words) as info:
        trace_image(small_study, small_study.subject, bad, layers=[], resolution=4)
    assert "\n" not in str(info.value)


def test_predict_split_says_which_images_the_model_gets_wrong(small_study):
    import torch

    from core.queries.explain import predict_split

    got = predict_split(small_study, small_study.subject)
    data = small_study.data()
    with torch.no_grad():
        pred = small_study.model(small_study.subject)(data.test.x).argmax(1).numpy()
    assert np.array_equal(got["pred"], pred) and np.array_equal(got["label"], data.test.y.numpy())
    assert got["wrong"] == [int(i) for i in np.flatnonzero(pred != data.test.y.numpy())]
    with pytest.raises(ValueError, match="split"):
        predict_split(small_study, small_study.subject, "nope")


def test_layer_experts_read_the_stage_when_experts_classes_is_unset():
    """An unset ``[experts] classes`` means every class the stage ranks (study.expert_classes()),
    so one image shows the Influence chapter's experts, not units ranked on that image alone."""
    import torch
    from torch import nn

    from core.queries.explain import _layer_experts

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.pool(self.conv(x)).flatten(1))

    class Study:
        class config:  # noqa: N801 — the attribute the function reads
            models = {"m": object()}
            experts = {"layers": ["conv"], "reduce": "sum"}  # no "classes": unset

        asked: list = []

        def expert_classes(self):
            return [0, 1, 2]

        def is_built(self, stage):
            return stage == "experts"

        def experts(self, model, layer, cls):
            self.asked.append((model, layer, cls))
            return {"rows": [{"unit": 3, "score": 0.5, "rank": 1}, {"unit": 1, "score": 0.2,
                                                                     "rank": 2}]}

    torch.manual_seed(0)
    study = Study()
    out, source = _layer_experts(study, "m", Net().eval(), torch.rand(1, 1, 6, 6), "conv", 2, 2, 4)
    assert source == "experts stage"
    assert study.asked == [("m", "conv", 2)]
    assert [e["unit"] for e in out] == [3, 1]
