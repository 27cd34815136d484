"""core.cases.sources: table checks, the folder and tensors adapters, their errors, the fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cases import sources
from core.cases.seam import CaseData, SourceError
from core.cases.sources import (
    DATASET_SCHEMA,
    REGION_SCHEMA,
    check_dataset,
    check_region,
    folder_data,
    load_data,
    source_fingerprint,
    tensors_data,
)

# ----------------------------------------------------------------------------------------------
# helpers: a tiny image folder with planted marks and their masks


def _image(rng, size, mode, label):
    h, w = size
    arr = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
    arr[..., label % 3] += 100  # the class tints one channel
    img = Image.fromarray(arr)
    return img.convert("L") if mode == "L" else img


def make_folder(base: Path, counts=None, size=(16, 16), mode="RGB", masks=True, layout=None,
                ext=".png") -> dict:
    """<base>/imgs/<class>/<i><ext> (or imgs/<split>/<class>/...) and <base>/masks/... (PNG, a 4×4
    mark at a label-dependent corner). Returns the [dataset] and [region] tables."""
    counts = counts or {"cat": 6, "dog": 6}
    rng = np.random.default_rng(1)
    parts = layout or {None: 1.0}
    for part in parts:
        for label, (cls, n) in enumerate(counts.items()):
            idir = base / "imgs" / (part or "") / cls
            mdir = base / "masks" / (part or "") / cls
            idir.mkdir(parents=True, exist_ok=True)
            mdir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(rng, size, mode, label).save(idir / f"{i:02d}{ext}")
                if masks:
                    m = np.zeros(size, dtype=np.uint8)
                    m[:4, :4] = 255 if label == 0 else 0
                    m[-4:, -4:] = 0 if label == 0 else 255
                    Image.fromarray(m).save(mdir / f"{i:02d}.png")
    return ({"source": "folder", "root": "imgs", "split": {"val": 0.2, "test": 0.3, "seed": 0}},
            {"masks": "masks", "name": "mark"} if masks else None)


def tree(base: Path) -> dict:
    return {str(p.relative_to(base)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(base.rglob("*"))}


# ----------------------------------------------------------------------------------------------
# check_dataset / check_region


def test_schemas_name_both_sources_and_region_keys():
    assert set(DATASET_SCHEMA) == {"folder", "tensors"}
    assert "root" in DATASET_SCHEMA["folder"] and "path" in DATASET_SCHEMA["tensors"]
    assert set(REGION_SCHEMA) == {"masks", "name"}


def test_check_dataset_fills_defaults():
    out = check_dataset({"source": "folder", "root": "data", "size": 32,
                         "mean": [0.5, 0.5, 0.5], "split": {"test": 0.3}}, "c.toml [dataset]")
    assert out["size"] == [32, 32]
    assert out["channels"] == 3  # inferred from mean
    assert out["split"] == {"val": 0.1, "test": 0.3, "seed": 0}
    assert out["classes"] is None and out["std"] is None
    assert check_dataset(out) == out  # a checked table passes again unchanged


@pytest.mark.parametrize("section, words", [
    ({"source": "folder", "root": "d", "sise": [8, 8]}, ["'sise'", "valid keys", "size"]),
    ({"source": "images", "root": "d"}, ["'images'", "folder"]),
    ({"source": "folder"}, ["'root'"]),
    ({"source": "tensors", "root": "d"}, ["'root'", "path"]),
    ({"source": "folder", "root": "d", "size": [4, 4]}, ["size", "8 to 1024"]),
    ({"source": "folder", "root": "d", "size": [64, 2000]}, ["size", "8 to 1024"]),
    ({"source": "folder", "root": "d", "size": [64, 64, 3]}, ["size", "[H, W]"]),
    ({"source": "folder", "root": "d", "size": "64"}, ["size", "must be"]),
    ({"source": "folder", "root": "d", "channels": 2}, ["channels", "1", "3"]),
    ({"source": "folder", "root": "d", "channels": 3, "mean": [0.5]}, ["mean", "channels = 3"]),
    ({"source": "folder", "root": "d", "channels": 1, "std": [0.0]}, ["std", "> 0"]),
    ({"source": "folder", "root": "d", "mean": [0.1, 0.2]}, ["mean", "1 (gray) or 3"]),
    ({"source": "folder", "root": "d", "mean": ["a", 1, 2]}, ["mean", "finite numbers"]),
    ({"source": "folder", "root": "d", "split": {"val": 0.95}}, ["split.val", "0 to 0.9"]),
    ({"source": "folder", "root": "d", "split": {"test": -0.1}}, ["split.test", "0 to 0.9"]),
    ({"source": "folder", "root": "d", "split": {"val": 0.5, "test": 0.5}}, ["split.val + split.test"]),
    ({"source": "folder", "root": "d", "split": {"train": 0.5}}, ["'train'", "val, test, seed"]),
    ({"source": "folder", "root": "d", "split": {"seed": -1}}, ["split.seed"]),
    ({"source": "folder", "root": "d", "classes": ["a"]}, ["classes", "2 to 1000"]),
    ({"source": "folder", "root": "d", "classes": ["a", "a"]}, ["classes", "'a'", "distinct"]),
    ({"source": "folder", "root": "d", "classes": ["a", ""]}, ["classes", "non-empty"]),
    ({"source": "folder", "root": "d", "classes": ["a", "b" * 101]}, ["classes", "100"]),
    ({"source": "folder", "root": "d", "classes": ["a", 2]}, ["classes", "strings"]),
    ({"source": "folder", "root": "d", "classes": [str(i) for i in range(1001)]}, ["classes", "1001"]),
    ({"source": "folder", "root": " "}, ["root", "empty"]),
    ({"source": "folder", "root": "d", "channels": True}, ["channels", "must be"]),
])
def test_check_dataset_errors_name_the_key(section, words):
    with pytest.raises(SourceError) as info:
        check_dataset(section, "c.toml [dataset]")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("c.toml [dataset]")
    for w in words:
        assert w in msg


def test_check_region_defaults_and_errors():
    assert check_region({"masks": "m"}) == {"masks": "m", "name": "region"}
    with pytest.raises(SourceError, match="'mask'.*valid keys: masks, name"):
        check_region({"mask": "m"})
    with pytest.raises(SourceError, match="name"):
        check_region({"masks": "m", "name": "x" * 65})
    with pytest.raises(SourceError, match="masks must be a string"):
        check_region({"masks": 3})


# ----------------------------------------------------------------------------------------------
# folder_data


def test_folder_data_shapes_labels_masks_and_split(tmp_path):
    dataset, region = make_folder(tmp_path, counts={"cat": 10, "dog": 10})
    before = tree(tmp_path)
    data = folder_data(dataset, region, tmp_path)
    assert tree(tmp_path) == before  # nothing written
    assert isinstance(data, CaseData) and data.source == "folder"
    assert data.class_names == ("cat", "dog")
    assert (data.train.n, data.val.n, data.test.n) == (10, 4, 6)  # per class: 3 test, 2 val, 5 train
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (3, 16, 16)
        assert 0 <= float(split.x.min()) and float(split.x.max()) <= 1
        assert split.mask.dtype == torch.bool and split.mask.shape == (split.n, 1, 16, 16)
        assert split.x_clean is None
        assert torch.bincount(split.y, minlength=2).tolist() == [split.n // 2] * 2
        # the planted marks: top-left for cat (label 0), bottom-right for dog
        for m, y in zip(split.mask[:, 0], split.y, strict=True):
            corner = m[:4, :4] if int(y) == 0 else m[-4:, -4:]
            assert corner.all() and int(m.sum()) == 16
        # the tint channel follows the label
        assert (split.x[split.y == 1][:, 1].mean() > split.x[split.y == 1][:, 0].mean())
    assert data.region_name == "mark" and data.has_region
    assert data.extra == {"root": "imgs", "layout": "flat", "n_files": 20}
    assert data.mean is None and data.std is None and data.seed == 0
    again = folder_data(dataset, region, tmp_path)
    assert again.digest() == data.digest()
    other = folder_data({**dataset, "split": {"val": 0.2, "test": 0.3, "seed": 5}}, region, tmp_path)
    assert other.digest() != data.digest()
    assert (other.train.n, other.val.n, other.test.n) == (10, 4, 6)


def test_folder_classes_order_sets_labels(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False)
    a = folder_data(dataset, None, tmp_path)
    b = folder_data({**dataset, "classes": ["dog", "cat"]}, None, tmp_path)
    assert b.class_names == ("dog", "cat") and not b.has_region and b.region_name is None
    # every image keeps its class: the tint channel (label % 3 in make_folder) moves with the name
    cat_a = a.train.x[a.train.y == 0]
    cat_b = b.train.x[b.train.y == 1]
    assert float(cat_a[:, 0].mean()) > float(cat_a[:, 1].mean())
    assert float(cat_b[:, 0].mean()) > float(cat_b[:, 1].mean())


def test_folder_resize_gray_to_rgb_and_normalisation(tmp_path):
    dataset, region = make_folder(tmp_path, size=(20, 24), mode="L")
    plain = folder_data(dataset, region, tmp_path)
    assert plain.channels == 1 and plain.size == (20, 24)  # inferred: gray images
    rgb = folder_data({**dataset, "size": [10, 12], "channels": 3}, region, tmp_path)
    assert rgb.train.x.shape[1:] == (3, 10, 12) and rgb.train.mask.shape[1:] == (1, 10, 12)
    assert torch.equal(rgb.train.x[:, 0], rgb.train.x[:, 1])  # gray repeated
    assert rgb.train.mask.sum(dim=(1, 2, 3)).eq(4).all()  # 4×4 of 20×24 → 2×2 of 10×12 (nearest)
    norm = folder_data({**dataset, "mean": [0.25], "std": [0.5]}, region, tmp_path)
    assert norm.mean == (0.25,) and norm.std == (0.5,)
    assert torch.allclose(norm.train.x, (plain.train.x - 0.25) / 0.5)
    shown = norm.display(norm.train.x[:3])
    assert shown.shape == (3, 20, 24) and np.allclose(shown, plain.train.x[:3, 0].numpy(), atol=1e-6)


def test_folder_rgb_to_gray_and_jpeg(tmp_path):
    dataset, region = make_folder(tmp_path, ext=".jpg")
    gray = folder_data({**dataset, "channels": 1}, region, tmp_path)
    rgb = folder_data(dataset, region, tmp_path)
    assert gray.channels == 1 and rgb.channels == 3
    luma = (rgb.train.x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(gray.train.x[:, 0], luma, atol=1e-5)


def test_folder_split_folders_carve_val(tmp_path):
    dataset, region = make_folder(tmp_path, counts={"a": 10, "b": 10},
                                  layout={"train": 1, "test": 1})
    data = folder_data(dataset, region, tmp_path)
    assert data.extra["layout"] == "split"
    assert (data.train.n, data.val.n, data.test.n) == (16, 4, 20)  # val 0.2 of train; test as given
    both = make_folder(tmp_path / "b", counts={"a": 4, "b": 4},
                       layout={"train": 1, "val": 1, "test": 1})[0]
    data = folder_data(both, None, tmp_path / "b")
    assert (data.train.n, data.val.n, data.test.n) == (8, 8, 8)


def test_folder_with_differing_sizes_needs_size(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False)
    Image.new("RGB", (20, 16)).save(tmp_path / "imgs" / "cat" / "wide.png")
    with pytest.raises(SourceError, match=r"differ in size.*wide\.png.*size = \[H, W\]"):
        folder_data(dataset, None, tmp_path)
    assert folder_data({**dataset, "size": [16, 16]}, None, tmp_path).train.x.shape[-2:] == (16, 16)


# ----------------------------------------------------------------------------------------------
# folder_data: bad input, one line naming the thing


def _raises(dataset, region, base, *words):
    with pytest.raises(SourceError) as info:
        folder_data(dataset, region, base)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_root(tmp_path):
    _raises({"source": "folder", "root": "nowhere"}, None, tmp_path, "'nowhere'", "does not exist")


def test_class_folder_without_images(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False)
    (tmp_path / "imgs" / "bird").mkdir()
    (tmp_path / "imgs" / "bird" / "notes.txt").write_text("no images here")
    _raises(dataset, None, tmp_path, "imgs/bird", "no images")


def test_classes_naming_a_missing_folder(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False)
    _raises({**dataset, "classes": ["cat", "cow"]}, None, tmp_path, "'cow'", "does not exist")


def test_folder_not_in_classes(tmp_path):
    dataset, _ = make_folder(tmp_path, counts={"cat": 3, "dog": 3, "cow": 3}, masks=False)
    _raises({**dataset, "classes": ["cat", "dog"]}, None, tmp_path, "imgs/cow", "not a class")


def test_fewer_than_two_classes(tmp_path):
    dataset, _ = make_folder(tmp_path, counts={"cat": 4}, masks=False)
    _raises(dataset, None, tmp_path, "1 class folder", "at least 2")


def test_truncated_image_is_named(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False)
    path = tmp_path / "imgs" / "dog" / "03.png"
    path.write_bytes(path.read_bytes()[:60])
    _raises(dataset, None, tmp_path, "imgs/dog/03.png", "cannot be decoded")


def test_not_an_image_is_named(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False)
    (tmp_path / "imgs" / "cat" / "fake.jpg").write_text("hello")
    _raises(dataset, None, tmp_path, "imgs/cat/fake.jpg", "cannot be decoded")


def test_mask_of_another_size_is_named(tmp_path):
    dataset, region = make_folder(tmp_path)
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "cat" / "02.png")
    _raises(dataset, region, tmp_path, "masks/cat/02.png", "8×8", "16×16")


def test_a_missing_mask_is_an_empty_region_and_no_mask_at_all_is_named(tmp_path):
    # issue 20: discovery writes masks only where its region is, so a missing file = no region
    dataset, region = make_folder(tmp_path)
    before = source_fingerprint(dataset, region, tmp_path)
    (tmp_path / "masks" / "dog" / "04.png").unlink()
    data = folder_data(dataset, region, tmp_path)
    masks = torch.cat([data.train.mask, data.val.mask, data.test.mask])
    empty = int((masks.flatten(1).sum(1) == 0).sum())
    assert empty >= 1 and masks.any()
    assert source_fingerprint(dataset, region, tmp_path) != before  # the key follows the change
    # a folder that matches no image at all is a wrong folder, named in one line
    for p in (tmp_path / "masks").rglob("*.png"):
        p.unlink()
    _raises(dataset, region, tmp_path, "masks/", "no mask for any image")


def test_mask_with_another_extension_is_found(tmp_path):
    dataset, region = make_folder(tmp_path, ext=".jpg")  # masks stay .png
    assert folder_data(dataset, region, tmp_path).train.mask.any()


def test_missing_masks_folder_and_region_without_masks(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False)
    _raises(dataset, {"masks": "nomasks"}, tmp_path, "'nomasks'", "does not exist")
    _raises(dataset, {"name": "x"}, tmp_path, "'masks'")


def test_split_leaving_a_class_without_training_images(tmp_path):
    dataset, _ = make_folder(tmp_path, counts={"cat": 6, "dog": 1}, masks=False)
    _raises({**dataset, "split": {"val": 0.0, "test": 0.6, "seed": 0}}, None, tmp_path,
            "'dog'", "no training image")


def test_split_folders_without_test(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False, layout={"train": 1, "val": 1})
    _raises(dataset, None, tmp_path, "'test'")


def test_fifo_is_refused(tmp_path):
    dataset, _ = make_folder(tmp_path, masks=False)
    os.mkfifo(tmp_path / "imgs" / "cat" / "pipe.png")
    _raises(dataset, None, tmp_path, "imgs/cat/pipe.png", "not a regular file")


def test_symlink_outside_root_is_refused_inside_is_fine(tmp_path):
    dataset, _ = make_folder(tmp_path / "case", masks=False)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (16, 16)).save(outside)
    (tmp_path / "case" / "imgs" / "cat" / "link.png").symlink_to(outside)
    _raises(dataset, None, tmp_path / "case", "imgs/cat/link.png", "outside")
    (tmp_path / "case" / "imgs" / "cat" / "link.png").unlink()
    (tmp_path / "case" / "imgs" / "cat" / "link.png").symlink_to(
        tmp_path / "case" / "imgs" / "dog" / "00.png")
    data = folder_data(dataset, None, tmp_path / "case")
    assert data.train.n + data.val.n + data.test.n == 13 and data.extra["n_files"] == 13


def test_file_size_and_count_caps(tmp_path, monkeypatch):
    dataset, _ = make_folder(tmp_path, masks=False)
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 100)
    _raises(dataset, None, tmp_path, "imgs/cat/00.png", "limit")
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 50 * 2**20)
    monkeypatch.setattr(sources, "MAX_IMAGES", 5)
    _raises(dataset, None, tmp_path, "more than 5 images")


def test_decompression_bomb_is_an_error(tmp_path, monkeypatch):
    dataset, _ = make_folder(tmp_path, masks=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 16×16 = 256 > 200: Pillow warns
    _raises(dataset, None, tmp_path, "imgs/cat/00.png", "decompression-bomb")


# ----------------------------------------------------------------------------------------------
# digest and fingerprint


def test_replacing_an_image_changes_digest_and_fingerprint(tmp_path):
    dataset, region = make_folder(tmp_path)
    d1 = folder_data(dataset, region, tmp_path).digest()
    f1 = source_fingerprint(dataset, region, tmp_path)
    assert source_fingerprint(dataset, region, tmp_path) == f1
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "imgs" / "cat" / "01.png")
    assert folder_data(dataset, region, tmp_path).digest() != d1
    f2 = source_fingerprint(dataset, region, tmp_path)
    assert f2 != f1
    Image.new("L", (16, 16)).save(tmp_path / "masks" / "cat" / "01.png")
    assert source_fingerprint(dataset, region, tmp_path) != f2
    assert source_fingerprint({**dataset, "size": [8, 8]}, region, tmp_path) != f2


def test_fingerprint_decodes_nothing(tmp_path, monkeypatch):
    dataset, region = make_folder(tmp_path)

    def boom(*a, **k):
        raise AssertionError("decoded an image")

    monkeypatch.setattr(sources, "_decode", boom)
    assert len(source_fingerprint(dataset, region, tmp_path)) == 64
    with pytest.raises(SourceError, match="'gone'"):
        source_fingerprint({**dataset, "root": "gone"}, None, tmp_path)


# ----------------------------------------------------------------------------------------------
# tensors_data


def _tensors(n=30, c=1, h=12, w=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g)
    y = torch.arange(n) % classes
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    mask[:, :3, :3] = True
    return x, y, mask


def test_tensors_pt_with_mask_split_and_classes(tmp_path):
    x, y, mask = _tensors()
    split = ["train"] * 18 + ["val"] * 6 + ["test"] * 6
    torch.save({"x": x, "y": y, "mask": mask, "split": split, "classes": ["a", "b", "c"]},
               tmp_path / "d.pt")
    before = tree(tmp_path)
    data = tensors_data({"source": "tensors", "path": "d.pt"}, {"name": "corner"}, tmp_path)
    assert tree(tmp_path) == before
    assert data.source == "tensors" and data.class_names == ("a", "b", "c")
    assert (data.train.n, data.val.n, data.test.n) == (18, 6, 6)
    assert torch.equal(data.train.x, x[:18]) and torch.equal(data.test.y, y[24:])
    assert data.train.mask.shape == (18, 1, 12, 12) and data.region_name == "corner"
    assert data.extra == {"path": "d.pt"}


def test_tensors_npz_uint8_gray_resize_and_stratified_split(tmp_path):
    x, y, mask = _tensors(n=40, classes=2)
    x8 = (x[:, 0] * 255).round().to(torch.uint8).numpy()  # (N, H, W)
    np.savez(tmp_path / "d.npz", x=x8, y=y.numpy(), mask=mask.numpy(), split=np.zeros(40, np.int64))
    data = tensors_data({"source": "tensors", "path": "d.npz", "size": [8, 8], "channels": 3,
                         "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}, None, tmp_path)
    assert data.train.x.shape[1:] == (3, 8, 8) and data.train.mask.shape[1:] == (1, 8, 8)
    assert data.class_names == ("0", "1") and data.region_name == "region"
    assert (data.train.n, data.val.n, data.test.n) == (36, 4, 0)  # val carved from train (0.1)
    shown = data.display(data.train.x)
    assert shown.shape == (36, 8, 8, 3) and 0 <= shown.min() and shown.max() <= 1
    plain = tensors_data({"source": "tensors", "path": "d.npz"}, None, tmp_path)
    assert plain.train.x.shape[1:] == (1, 12, 12) and plain.train.x.max() <= 1
    assert (plain.train.n, plain.val.n, plain.test.n) == (36, 4, 0)
    np.savez(tmp_path / "e.npz", x=x8, y=y.numpy())
    split = tensors_data({"source": "tensors", "path": "e.npz"}, None, tmp_path)
    assert (split.train.n, split.val.n, split.test.n) == (28, 4, 8)
    assert not split.has_region


def _terr(tmp_path, payload, *words, name="d.pt", dataset=None, region=None):
    path = tmp_path / name
    if payload is not None:
        if name.endswith(".npz"):
            np.savez(path, **payload)
        else:
            torch.save(payload, path)
    with pytest.raises(SourceError) as info:
        tensors_data({"source": "tensors", "path": name, **(dataset or {})}, region, tmp_path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_tensors_bad_input(tmp_path):
    x, y, mask = _tensors()
    _terr(tmp_path, None, "'nothere.pt'", "does not exist", name="nothere.pt")
    _terr(tmp_path, {"x": x}, "no 'y'")
    _terr(tmp_path, {"y": y}, "no 'x'")
    _terr(tmp_path, {"x": x, "y": y, "masks": mask}, "unknown key 'masks'")
    _terr(tmp_path, {"x": x[:, :, :, :, None], "y": y}, "x has shape")
    _terr(tmp_path, {"x": x.repeat(1, 2, 1, 1), "y": y}, "x has shape", "C 1 or 3")
    _terr(tmp_path, {"x": x, "y": y[:-1]}, "y has shape")
    _terr(tmp_path, {"x": x, "y": y.float()}, "y has shape", "integer")
    _terr(tmp_path, {"x": x, "y": y - 1}, "y[0] = -1", "out of range", "0..1")
    _terr(tmp_path, {"x": x, "y": y + 5}, "class '0'", "no training image")  # classes 0-4 empty
    _terr(tmp_path, {"x": x, "y": y}, "y[2] = 2", "0..1", dataset={"classes": ["a", "b"]})
    _terr(tmp_path, {"x": x, "y": y * 0}, "at least 2")
    _terr(tmp_path, {"x": x, "y": y, "mask": mask[:, :5]}, "mask has shape")
    _terr(tmp_path, {"x": x, "y": y, "split": torch.full((30,), 7)}, "split must hold")
    _terr(tmp_path, {"x": x, "y": y, "split": ["train"] * 29 + ["dev"]}, "'dev'")
    _terr(tmp_path, {"x": x, "y": y}, "has no 'mask'", region={"name": "r"})
    _terr(tmp_path, {"x": x, "y": y, "mask": mask}, "'m'", "does not exist", region={"masks": "m"})
    (tmp_path / "m" / "test").mkdir(parents=True)
    _terr(tmp_path, {"x": x, "y": y}, "no mask for any image", "test/0.png", region={"masks": "m"})
    _terr(tmp_path, {"x": x * float("nan"), "y": y}, "NaN")
    _terr(tmp_path, {"x": x.int(), "y": y}, "torch.int32")


def test_tensors_split_without_a_class_in_train(tmp_path):
    x, y, _ = _tensors(n=9)
    split = torch.tensor([0 if int(v) != 2 else 2 for v in y])
    _terr(tmp_path, {"x": x, "y": y, "split": split}, "'2'", "no training image")


class NotATensor:
    def __init__(self):
        self.value = 3


def test_tensors_pickled_objects_are_refused(tmp_path):
    x, y, _ = _tensors()
    _terr(tmp_path, {"x": x, "y": y, "extra": NotATensor()}, "pickled objects", "NotATensor")
    np.savez(tmp_path / "o.npz", x=x.numpy(), y=np.array([object()] * 30, dtype=object))
    _terr(tmp_path, None, "pickled", name="o.npz")
    _terr(tmp_path, [x, y], "holds a list", "dict")


def test_tensors_truncated_and_wrong_suffix(tmp_path):
    x, y, _ = _tensors()
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    (tmp_path / "d.pt").write_bytes((tmp_path / "d.pt").read_bytes()[:100])
    _terr(tmp_path, None, "'d.pt'", "could not be read")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    (tmp_path / "d.npz").write_bytes((tmp_path / "d.npz").read_bytes()[:100])
    _terr(tmp_path, None, "'d.npz'", "not a readable .npz", name="d.npz")
    (tmp_path / "d.h5").write_bytes(b"x")
    _terr(tmp_path, None, "'d.h5'", ".npz", name="d.h5")


def test_tensors_fingerprint_follows_the_file(tmp_path):
    x, y, _ = _tensors()
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    ds = {"source": "tensors", "path": "d.pt"}
    f1 = source_fingerprint(ds, None, tmp_path)
    torch.save({"x": x[:20], "y": y[:20]}, tmp_path / "d.pt")
    assert source_fingerprint(ds, None, tmp_path) != f1


def test_folder_modes_16bit_palette_alpha(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
    deep = np.full((16, 16), 65535 // 2, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "imgs" / "a" / "deep.png")  # 16-bit gray
    Image.new("P", (16, 16), 0).save(tmp_path / "imgs" / "a" / "pal.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 10)).save(tmp_path / "imgs" / "b" / "alpha.png")
    Image.new("LA", (16, 16), (128, 255)).save(tmp_path / "imgs" / "b" / "la.png")
    data = folder_data({"source": "folder", "root": "imgs", "size": [8, 8],
                        "split": {"val": 0.0, "test": 0.0}}, None, tmp_path)
    assert data.channels == 3 and data.train.n == 4
    x = {name: data.train.x[i] for i, name in enumerate(["deep", "pal", "alpha", "la"])}
    assert torch.allclose(x["deep"], torch.full_like(x["deep"], 0.5), atol=1e-3)
    assert torch.allclose(x["alpha"][0], torch.ones(8, 8)) and float(x["alpha"][1:].max()) == 0
    assert torch.allclose(x["la"], torch.full_like(x["la"], 128 / 255))


def test_symlinked_class_folder_outside_root_is_refused(tmp_path):
    dataset, _ = make_folder(tmp_path / "case", masks=False)
    make_folder(tmp_path / "other", masks=False)
    (tmp_path / "case" / "imgs" / "cow").symlink_to(tmp_path / "other" / "imgs" / "cat")
    _raises(dataset, None, tmp_path / "case", "imgs/cow", "outside")


def test_tensors_file_may_be_a_symlink_the_user_named(tmp_path):
    x, y, _ = _tensors()
    (tmp_path / "store").mkdir()
    (tmp_path / "case").mkdir()
    torch.save({"x": x, "y": y}, tmp_path / "store" / "d.pt")
    (tmp_path / "case" / "d.pt").symlink_to(tmp_path / "store" / "d.pt")
    data = tensors_data({"source": "tensors", "path": "d.pt"}, None, tmp_path / "case")
    assert data.n_classes == 3
    os.mkfifo(tmp_path / "case" / "p.pt")
    _terr(tmp_path / "case", None, "'p.pt'", "not a regular file", name="p.pt")


def test_load_data_dispatches_on_source(tmp_path):
    dataset, region = make_folder(tmp_path)
    assert load_data(dataset, region, tmp_path).digest() == folder_data(dataset, region, tmp_path).digest()
    x, y, _ = _tensors()
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    assert load_data({"source": "tensors", "path": "d.pt"}, None, tmp_path).source == "tensors"
    with pytest.raises(SourceError, match="'hdf5'"):
        load_data({"source": "hdf5"}, None, tmp_path)


def test_tensors_region_from_a_masks_folder_of_split_and_index(tmp_path):
    """What ``discover --out`` writes for a tensors source (``<split>/<index>.png``, a missing file
    = no region) is a valid ``[region] masks``: it replaces the file's mask, is resized to the
    images, and is in the data's fingerprint."""
    from PIL import Image

    from core.cases.sources import source_fingerprint

    x, y, mask = _tensors()
    split = ["train"] * 18 + ["val"] * 6 + ["test"] * 6
    torch.save({"x": x, "y": y, "mask": mask, "split": split}, tmp_path / "d.pt")
    folder = tmp_path / "found" / "1"
    for name, rows in (("train", (0, 5)), ("test", (2,))):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in rows:
            m = np.zeros((24, 24), np.uint8)  # twice the images' size: resized (nearest)
            m[-6:, -6:] = 255
            Image.fromarray(m).save(folder / name / f"{i}.png")
    dataset, region = {"source": "tensors", "path": "d.pt"}, {"masks": "found/1", "name": "found"}
    data = tensors_data(dataset, region, tmp_path)
    assert data.has_region and data.region_name == "found"
    want = torch.zeros(12, 12, dtype=torch.bool)
    want[-3:, -3:] = True
    for sp, rows in ((data.train, (0, 5)), (data.val, ()), (data.test, (2,))):
        for i in range(sp.n):
            assert torch.equal(sp.mask[i, 0], want if i in rows else torch.zeros_like(want)), i
    before = source_fingerprint(dataset, region, tmp_path)
    assert before != source_fingerprint(dataset, None, tmp_path)
    (folder / "val").mkdir()
    Image.fromarray(np.full((24, 24), 255, np.uint8)).save(folder / "val" / "1.png")
    assert source_fingerprint(dataset, region, tmp_path) != before  # a new mask file: rebuild
    assert bool(tensors_data(dataset, region, tmp_path).val.mask[1].all())

