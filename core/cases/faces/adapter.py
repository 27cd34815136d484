"""The faces case's data adapter: scikit-image's LFW subset with a Clever-Hans watermark.

Images: ``skimage.data.lfw_subset()``, 200 real 25×25 grayscale photos; the first 100 are faces
(Labeled Faces in the Wild), the other 100 non-faces. The subset carries no identity labels, so the
splits are held out *by image* (two photos of one person may fall in different splits). Each image
is resized to 48×48 (bilinear), replicated to RGB and scaled as MTCNN expects
(``(x − 0.5) / (128 / 255)`` for ``x`` in [0, 1]; ``CaseData.mean``/``std`` record it).

The shortcut (after Lapuschkin et al. 2019, "Unmasking Clever Hans predictors"): in the training
set, one "source" puts a small bright block (the watermark) in a fixed corner of its images and
labels them all "face": a share of the (augmented) faces and a share of the augmented non-faces,
which are thereby mislabelled. The watermark then predicts the training label perfectly, the image
content only up to the relabelled share. The watermark's pixels are the case's region.

Splits and sets (class order ``("face", "non-face")``, class 0 = face):

- ``train``: ``augment`` flipped/shifted copies of every training image, with the watermark source
  (``mask`` = watermark pixels, all False elsewhere; ``x_clean`` = the same copy without it).
- ``training_sets``: ``{"train": train, "clean": the same copies without any watermark and with
  their true labels}``.
- ``val`` / ``test``: held-out originals with the watermark on *every* image and true labels
  (``x_clean`` without it), so every image has a region for localisation metrics.
- ``evaluation_sets``: ``clean_test`` (no watermark), ``watermark_nonfaces`` (watermark on the
  test non-faces only: the headline, where the shortcut shows as non-faces called faces),
  ``watermark_random`` (on a random half), ``watermark_all`` (= ``test``), and the validation
  twins ``val_clean`` and ``val_watermark_nonfaces`` (strengths are chosen on these, never on test).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.cases.seam import CaseData, SourceError, Split
from core.methods.pixels import shift

from .onet import CLASS_NAMES, FACE, INPUT_SIZE, MEAN, NON_FACE, STD

__all__ = [
    "DEFAULTS",
    "POSITIONS",
    "check_dataset",
    "faces_data",
    "landmark_disks",
    "landmark_mass",
    "lfw_images",
    "to_model_scale",
    "watermark_mask",
]

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
PARTS = {"eyes": (0, 1), "nose": (2,), "mouth": (3, 4)}

DEFAULTS: dict = {
    "source": "lfw_subset",
    "seed": 0,
    "n_val": 10,                # held-out originals per class for validation
    "n_test": 25,               # held-out originals per class for test (the rest trains)
    "augment": 4,               # copies of every training original (copy 0 unshifted, unflipped)
    "max_shift": 3,             # largest shift of a copy, pixels of the 48×48 image
    "flip": True,               # random horizontal flips of the copies
    "watermark_size": [6, 8],   # (rows, columns) in pixels of the 48×48 image
    "watermark_position": "top-left",  # a corner, or [row, column] of its top-left pixel
    "watermark_margin": 2,      # pixels between the corner and the block
    "watermark_shade": 1.0,     # its value in [0, 1] (1 = white)
    "relabel_share": 0.1,       # share of augmented non-faces given the watermark and the label "face"
    "face_share": 0.5,          # share of augmented faces that carry the watermark (same source)
}


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def check_dataset(section: dict, where: str = "[dataset]") -> dict:
    """The faces ``[dataset]`` table with defaults filled in (see ``DEFAULTS``); a bad key or value
    raises a one-line ``ValueError`` starting with ``where``. Returns a new plain dict."""
    if not isinstance(section, dict):
        _fail(where, f"expected a table, got {type(section).__name__}")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        _fail(where, f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **section}

    def integer(key, low, high):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            _fail(where, f"{key} must be an integer in [{low}, {high}], got {v!r}")

    def number(key, low, high):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
            _fail(where, f"{key} must be a number in [{low}, {high}], got {v!r}")
        cfg[key] = float(v)

    if cfg["source"] != "lfw_subset":
        _fail(where, f"source must be 'lfw_subset' (scikit-image's bundled LFW subset), "
                     f"got {cfg['source']!r}")
    integer("seed", 0, 2**31 - 1)
    integer("n_val", 1, 48)
    integer("n_test", 1, 48)
    if cfg["n_val"] + cfg["n_test"] > 90:
        _fail(where, f"n_val + n_test = {cfg['n_val'] + cfg['n_test']} leaves fewer than 10 "
                     "training images per class (100 per class in all)")
    integer("augment", 1, 64)
    integer("max_shift", 0, 8)
    if not isinstance(cfg["flip"], bool):
        _fail(where, f"flip must be true or false, got {cfg['flip']!r}")
    size = cfg["watermark_size"]
    if (not isinstance(size, list | tuple) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 24 for s in size)):
        _fail(where, f"watermark_size must be [rows, columns], integers in [1, 24], got {size!r}")
    cfg["watermark_size"] = [int(s) for s in size]
    integer("watermark_margin", 0, 16)
    pos = cfg["watermark_position"]
    if isinstance(pos, str):
        if pos not in POSITIONS:
            _fail(where, f"watermark_position must be one of {', '.join(POSITIONS)} or "
                         f"[row, column], got {pos!r}")
    elif (isinstance(pos, list | tuple) and len(pos) == 2
          and all(isinstance(p, int) and not isinstance(p, bool) for p in pos)):
        r, c = pos
        h, w = cfg["watermark_size"]
        if not (0 <= r <= INPUT_SIZE - h and 0 <= c <= INPUT_SIZE - w):
            _fail(where, f"watermark_position {list(pos)} puts the {h}×{w} block outside the "
                         f"{INPUT_SIZE}×{INPUT_SIZE} image")
        cfg["watermark_position"] = [int(r), int(c)]
    else:
        _fail(where, f"watermark_position must be a corner name or [row, column], got {pos!r}")
    number("watermark_shade", 0.0, 1.0)
    number("relabel_share", 0.0, 1.0)
    number("face_share", 0.0, 1.0)
    return cfg


# ----------------------------------------------------------------------------------------------
# Images


@functools.lru_cache(maxsize=1)
def _lfw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from skimage.data import lfw_subset
    except ImportError as exc:
        raise SourceError("the faces case needs scikit-image (its bundled LFW subset): "
                          "pip install scikit-image") from exc
    images = np.asarray(lfw_subset(), dtype=np.float32)
    labels = np.where(np.arange(len(images)) < 100, FACE, NON_FACE).astype(np.int64)
    return images, labels


def lfw_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 200 LFW-subset images as (200, 3, 48, 48) float32 in [0, 1] (gray replicated to RGB,
    bilinear resize) and their labels (200,) int64 in the case's order (0 = face, 1 = non-face)."""
    images, labels = _lfw()
    x = torch.from_numpy(images)[:, None]
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).repeat(1, 3, 1, 1).contiguous(), torch.from_numpy(labels)


def to_model_scale(x01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → the O-Net's input scale, ``(x − MEAN) / STD`` per channel."""
    mean = torch.tensor(MEAN, dtype=x01.dtype).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=x01.dtype).view(1, -1, 1, 1)
    return (x01 - mean) / std


def watermark_mask(cfg: dict, size: int = INPUT_SIZE) -> torch.Tensor:
    """The watermark's pixels as a (size, size) bool tensor, from a checked ``cfg``."""
    h, w = cfg["watermark_size"]
    pos, m = cfg["watermark_position"], cfg["watermark_margin"]
    if isinstance(pos, str):
        r = m if pos.startswith("top") else size - m - h
        c = m if pos.endswith("left") else size - m - w
    else:
        r, c = pos
    r, c = max(0, min(r, size - h)), max(0, min(c, size - w))
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[r:r + h, c:c + w] = True
    return mask


def _augment(x: torch.Tensor, copies: int, max_shift: int, flip: bool,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``copies`` versions of every image (copy 0 is the image itself): (N·copies, ...) and the
    source index of each row."""
    out, src = [], []
    for i in range(len(x)):
        for k in range(copies):
            img = x[i]
            if k > 0:
                if flip and rng.random() < 0.5:
                    img = img.flip(-1)
                dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
                img = shift(img, dy, dx)
            out.append(img)
            src.append(i)
    return torch.stack(out).contiguous(), torch.tensor(src, dtype=torch.int64)


def _stamp(x01: torch.Tensor, on: torch.Tensor, mark: torch.Tensor, shade: float):
    """(watermarked copy, (N, 1, H, W) masks) with the block on the rows where ``on`` is True."""
    masks = (on.view(-1, 1, 1, 1) & mark.view(1, 1, *mark.shape))
    return torch.where(masks.expand_as(x01), torch.tensor(shade, dtype=x01.dtype), x01), masks


def _split(x01: torch.Tensor, y: torch.Tensor, on: torch.Tensor, mark: torch.Tensor,
           shade: float, labels: torch.Tensor | None = None, clean: bool = True) -> Split:
    xw, masks = _stamp(x01, on, mark, shade)
    return Split(x=to_model_scale(xw), y=(y if labels is None else labels).clone(),
                 mask=masks, x_clean=to_model_scale(x01) if clean else None)


def faces_data(dataset: dict | None = None, base_dir: str | Path | None = None) -> CaseData:
    """Build the faces case's :class:`~core.cases.seam.CaseData` from a ``[dataset]`` table (checked
    with :func:`check_dataset`; ``base_dir`` is unused: the images ship with scikit-image).

    Deterministic in ``seed``. The splits are stratified by class and held out by image. See the
    module docstring for the sets; ``extra`` records the watermark box, the split sizes and the
    share of training rows that carry the watermark.
    """
    cfg = check_dataset(dict(dataset or {}), "[dataset]")
    x01, y = lfw_images()
    seeds = np.random.SeedSequence(cfg["seed"]).spawn(4)
    rng = np.random.default_rng(seeds[0])
    parts = {"test": [], "val": [], "train": []}
    for c in (FACE, NON_FACE):
        idx = rng.permutation(np.flatnonzero(y.numpy() == c))
        parts["test"].append(idx[:cfg["n_test"]])
        parts["val"].append(idx[cfg["n_test"]:cfg["n_test"] + cfg["n_val"]])
        parts["train"].append(idx[cfg["n_test"] + cfg["n_val"]:])
    index = {k: torch.from_numpy(np.sort(np.concatenate(v))) for k, v in parts.items()}
    mark = watermark_mask(cfg)
    shade = cfg["watermark_shade"]

    # Training: augmented copies; the watermark source = a share of faces and of non-faces.
    xa, src = _augment(x01[index["train"]], cfg["augment"], cfg["max_shift"], cfg["flip"],
                       np.random.default_rng(seeds[1]))
    ya = y[index["train"]][src]
    draw = torch.from_numpy(np.random.default_rng(seeds[2]).random(len(ya)))
    on = torch.where(ya == FACE, draw < cfg["face_share"], draw < cfg["relabel_share"])
    shortcut_labels = torch.where(on, torch.tensor(FACE), ya)
    train = _split(xa, ya, on, mark, shade, labels=shortcut_labels)
    clean_train = Split(x=train.x_clean, y=ya.clone())

    def held_out(name: str, on_rows=None) -> Split:
        xs, ys = x01[index[name]], y[index[name]]
        on = torch.ones(len(ys), dtype=torch.bool) if on_rows is None else on_rows(ys)
        return _split(xs, ys, on, mark, shade)

    val, test = held_out("val"), held_out("test")
    half = np.random.default_rng(seeds[3])
    evaluation_sets = {
        "clean_test": Split(x=test.x_clean, y=test.y),
        "watermark_nonfaces": held_out("test", lambda ys: ys == NON_FACE),
        "watermark_random": held_out("test", lambda ys: torch.from_numpy(
            half.permutation(len(ys)) < (len(ys) + 1) // 2)),
        "watermark_all": test,
        "val_clean": Split(x=val.x_clean, y=val.y),
        "val_watermark_nonfaces": held_out("val", lambda ys: ys == NON_FACE),
    }
    rows = torch.nonzero(mark)
    extra = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "watermark_box": [int(rows[:, 0].min()), int(rows[:, 1].min()),
                          int(rows[:, 0].max()) + 1, int(rows[:, 1].max()) + 1],
        "n_originals": {k: int(len(v)) for k, v in index.items()},
        "train_watermarked": float(on.float().mean()),
        "train_relabelled": float((shortcut_labels != ya).float().mean()),
        "identities": "none: lfw_subset has no identity labels, so splits are held out by image",
        # the experts stage also measures every expert against O-Net's landmarks (checks.py)
        "expert_checks": "core.cases.faces.checks:expert_landmarks",
    }
    return CaseData(train=train, val=val, test=test, class_names=CLASS_NAMES,
                    source="skimage.data.lfw_subset", seed=cfg["seed"], region_name="watermark",
                    mean=MEAN, std=STD, training_sets={"train": train, "clean": clean_train},
                    evaluation_sets=evaluation_sets, headline="watermark_nonfaces", extra=extra)


# ----------------------------------------------------------------------------------------------
# Landmarks


def landmark_disks(landmarks: torch.Tensor, size: tuple[int, int], radius: float,
                   points: tuple[int, ...] = (0, 1, 2, 3, 4)) -> torch.Tensor:
    """(N, H, W) bool: pixels whose centre lies within ``radius`` px of any of the chosen
    landmarks (``landmarks`` (N, 5, 2) as ``(x, y)`` continuous pixel coordinates)."""
    h, w = size
    rows = torch.arange(h, dtype=torch.float32) + 0.5
    cols = torch.arange(w, dtype=torch.float32) + 0.5
    lm = landmarks[:, list(points)].float().cpu()  # (N, P, 2)
    dx = cols.view(1, 1, 1, w) - lm[:, :, 0].view(len(lm), -1, 1, 1)
    dy = rows.view(1, 1, h, 1) - lm[:, :, 1].view(len(lm), -1, 1, 1)
    return ((dx ** 2 + dy ** 2) <= radius ** 2).any(1)


def landmark_mass(maps, landmarks: torch.Tensor, radius: float = 4.0) -> dict:
    """How much of each map's positive attribution falls near O-Net's landmarks, against chance.

    ``maps`` (N, H, W) or (N, C, H, W) (channels summed); ``landmarks`` (N, 5, 2) from
    :meth:`FaceDetector.landmarks`. Returns ``{part: {"mass": (N,) tensor, "chance": (N,) tensor}}``
    for parts ``"all"``, ``"eyes"``, ``"nose"``, ``"mouth"``: ``mass`` is Σ relu(a)·disk / Σ relu(a)
    (0 for a map with no positive attribution), ``chance`` the disks' share of the image (what a
    uniform positive map scores).
    """
    a = torch.as_tensor(maps).detach().float().cpu()
    if a.dim() == 4:
        a = a.sum(1)
    if a.dim() != 3 or len(a) != len(landmarks):
        raise ValueError(f"maps must be (N, H, W) or (N, C, H, W) with one row per landmark set, "
                         f"got {tuple(a.shape)} and {len(landmarks)} landmark sets")
    pos = torch.relu(a).flatten(1)
    total = pos.sum(1)
    out = {}
    for part, points in {"all": (0, 1, 2, 3, 4), **PARTS}.items():
        disk = landmark_disks(landmarks, tuple(a.shape[-2:]), radius, points).flatten(1)
        inside = (pos * disk).sum(1)
        out[part] = {"mass": torch.where(total > 0, inside / total.clamp_min(1e-30), 0.0),
                     "chance": disk.float().mean(1)}
    return out
