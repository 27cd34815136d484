"""A working starting point for a user's case: ``write_example(dir)`` (``python -m core new-case``).

It writes four files and nothing else:

- ``nets.py``: ``SmallCNN(n_classes=3, in_channels=3)``, a small CNN with named layers, and
  ``MarkFree``, the same CNN trained without the mark (its corners painted over while it trains).
- ``make_images.py``: a deterministic script (NumPy + Pillow) that writes a 3-class RGB image
  folder ``data/images/{train,val,test}/<class>/`` (48×48; 80 / 20 / 40 images per class) with a
  planted mark whose colour follows the class 90% of the time in train and val and is random in
  test (the evaluation set that breaks the shortcut), and the marks' masks ``data/masks/...``.
- ``case.toml``: a folder source with that region, the model under study (``SmallCNN``) and the
  reference (``MarkFree``), settings that build every stage in about a minute on a CPU.
- ``README.txt``: the steps.

Measured (CPU, seed 0, the pipeline's build): vanilla 100% train, 92% val, 76% on the test split
that breaks the link (it leans on the mark); the reference 99% / 97% / 99%.
"""

from __future__ import annotations

from pathlib import Path

from core.cases.seam import SourceError

__all__ = ["EXAMPLE_FILES", "write_example"]

NETS_PY = '''"""The example case's model: a small CNN with named layers (the pages address them by name)."""

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks, global pooling to 4x4, two dense layers; any input size >= 16."""

    def __init__(self, n_classes: int = 3, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU()          # never inplace: hooks read the conv outputs
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AdaptiveAvgPool2d(4)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(64, n_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.pool3(self.relu3(self.conv3(x)))
        return self.fc2(self.relu4(self.fc1(self.flatten(x))))


class MarkFree(SmallCNN):
    """SmallCNN trained without the mark: while it trains (train mode), each image's four
    corner x corner corners, where the example's mark may be, are painted over with noise like the
    image's own background, so the mark never reaches the training; in eval mode the input is left
    as it is. The reference: a model that never learned the mark, shown the same images."""

    def __init__(self, n_classes: int = 3, in_channels: int = 3, width: int = 16, corner: int = 6):
        super().__init__(n_classes, in_channels, width)
        self.corner = corner

    def forward(self, x):
        if self.training and self.corner > 0:
            x = x.clone()
            c = self.corner
            mean, std = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True)
            for rows in (slice(0, c), slice(-c, None)):
                for cols in (slice(0, c), slice(-c, None)):
                    x[:, :, rows, cols] = mean + std * torch.randn_like(x[:, :, rows, cols])
        return super().forward(x)
'''

MAKE_IMAGES_PY = '''"""Write the example's images and masks next to this script (deterministic).

data/images/<split>/<class>/<i>.png: 48x48 RGB, a shape (the class) on a noisy background, and a
6x6 mark in a random corner. In train and val the mark's colour is the class's colour 90% of the
time (a shortcut a model can take instead of the shape); in test its colour is drawn at random, so
the test split breaks the link and shows what a model learned. data/masks/<split>/<class>/<i>.png:
white where the mark is, black elsewhere. Run it again to rewrite the same files.
"""

from pathlib import Path

import numpy as np
from PIL import Image

SIZE, MARK, SEED, LINK = 48, 6, 0, 0.9
PER_CLASS = {"train": 80, "val": 20, "test": 40}
CLASSES = ("circle", "square", "triangle")
MARK_COLOURS = ((230, 40, 40), (40, 200, 40), (40, 80, 230))


def shape_mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(18, SIZE - 18, size=2)
    r = int(rng.integers(9, 14))
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == "square":
        return (abs(yy - cy) <= r * 0.8) & (abs(xx - cx) <= r * 0.8)
    return (yy - cy >= -r) & (yy - cy <= r) & (abs(xx - cx) <= (yy - cy + r) / 2)


def main(root: Path) -> None:
    rng = np.random.default_rng(SEED)
    n = 0
    for split, per_class in PER_CLASS.items():
        for label, kind in enumerate(CLASSES):
            (root / "images" / split / kind).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split / kind).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.normal(90, 20, size=(SIZE, SIZE, 3))
                img[shape_mask(kind, rng)] = rng.normal(200, 15, size=3)
                linked = split != "test" and rng.random() < LINK
                colour = label if linked else int(rng.integers(len(CLASSES)))
                top = int(rng.integers(2)) * (SIZE - MARK)
                left = int(rng.integers(2)) * (SIZE - MARK)
                mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
                mask[top:top + MARK, left:left + MARK] = 255
                img[mask > 0] = MARK_COLOURS[colour]
                name = f"{i:03d}.png"
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    root / "images" / split / kind / name)
                Image.fromarray(mask).save(root / "masks" / split / kind / name)
                n += 1
    print(f"wrote {n} images and masks under {root}")


if __name__ == "__main__":
    main(Path(__file__).resolve().parent / "data")
'''

CASE_TOML = '''# An example case: shapes with a planted coloured mark. Paths are relative to this file.
title = "Example: shapes with a planted mark"
description = """Three shapes; a corner mark whose colour follows the class 90% of the time in \
training and validation, and is random in test (the set that breaks the shortcut)."""

[dataset]
source = "folder"
root = "data/images"              # <root>/{train,val,test}/<class>/<images>, by make_images.py
classes = ["circle", "square", "triangle"]   # the models' output order
size = [48, 48]
channels = 3

[region]
masks = "data/masks"              # same relative paths as the images; non-zero pixels = the region
name = "mark"

[models.vanilla]                  # the first model is the one under study
factory = "nets:SmallCNN"         # module:callable, the module next to this file
kwargs = { n_classes = 3, in_channels = 3 }

[models.reference]                # never sees the mark while it trains; or checkpoint = "ref.pt"
factory = "nets:MarkFree"
kwargs = { n_classes = 3, in_channels = 3, corner = 6 }

[training]
epochs = 30
lr = 0.002
batch_size = 16

# Lighter than the defaults, so that every stage builds in about a minute on a CPU.
[representations]
n_images = 40
n_mprt = 4
n_reference = 20

[corrections]
n_explain = 40

[essence]
n_rank = 40
random_draws = 10

[detection]
steps = 20
n_fit = 60
n_attack_fit = 30
n_eval = 60
'''

README_TXT = '''An example Influence Casebook case
==================================

1. Write the images and masks (deterministic, a few seconds):

       python make_images.py

   This creates data/images/{train,val,test}/<class>/*.png and the masks under data/masks/.
   In test the mark's colour is random: that split shows what a model learned.

2. Build the case (trains both models, then every stage; results are cached):

       python -m core build case.toml

3. Look at it in the app (choose this case), or print the report:

       python -m core report case.toml

To use your own data, point [dataset] root at a folder with one sub-folder per class (or
train/val/test sub-folders holding those), set size and channels, and either drop [region] or point
its masks at a folder with one mask per image (same relative paths). To use your own model, put a
module next to case.toml and name it as factory = "module:callable"; give checkpoint = "file.pt"
(a state dict) to load trained weights instead of training.
'''

EXAMPLE_FILES = {"nets.py": NETS_PY, "make_images.py": MAKE_IMAGES_PY, "case.toml": CASE_TOML,
                 "README.txt": README_TXT}


def write_example(dir: Path) -> list[Path]:
    """Write the example case (``EXAMPLE_FILES``: nets.py, make_images.py, case.toml, README.txt)
    into ``dir`` (created when missing); return the written paths in that order.

    Refuses to overwrite: when any of the four files already exists nothing is written and a
    one-line :class:`SourceError` names it. The images themselves are made by running
    ``make_images.py``.
    """
    dir = Path(dir)
    if dir.exists() and not dir.is_dir():
        raise SourceError(f"{str(dir)!r} exists and is not a folder; choose a new folder")
    for name in EXAMPLE_FILES:
        if (dir / name).exists() or (dir / name).is_symlink():
            raise SourceError(f"{str(dir / name)!r} already exists; choose an empty folder (nothing "
                              "was written)")
    dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in EXAMPLE_FILES.items():
        path = dir / name
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written
