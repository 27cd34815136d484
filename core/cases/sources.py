"""Data adapters for a user's case: an image folder or a tensors file (DESIGN §9, issue 9).

A user's ``[dataset]`` table names a ``source``:

- ``"folder"``: ``<root>/<class>/<images>`` (split here, stratified, with ``split.seed``) or
  ``<root>/{train,val,test}/<class>/<images>`` (``val`` optional: carved from ``train``).
- ``"tensors"``: a ``.pt`` (``torch.save`` of a dict of tensors, read with ``weights_only=True``) or
  ``.npz`` (read with ``allow_pickle=False``) holding ``x`` (N, C, H, W) or (N, H, W) float or
  uint8, ``y`` (N,) int, optional ``mask`` (N, H, W) / (N, 1, H, W), ``split`` (N,) of 0/1/2 or
  "train"/"val"/"test", ``classes``.

``check_dataset`` / ``check_region`` validate a table without reading data; ``folder_data`` /
``tensors_data`` read it into a :class:`core.cases.seam.CaseData`; ``source_fingerprint`` is a cheap key
(paths, sizes, mtimes) of every file they read. Every problem is a one-line
:class:`core.cases.seam.SourceError` naming the key or file and what to change. Nothing is ever written.

Conventions: images become float32 (N, C, H, W) in [0, 1], resized to ``size`` (bilinear; masks
nearest), converted to ``channels`` (gray → RGB repeats the channel, RGB → gray is ITU-R 601
luma), then normalised ``(x − mean) / std`` when given (``CaseData.display`` undoes it). Labels
index ``classes`` (default: the sorted class folder names, torchvision's ImageFolder convention).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import stat
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.cases.seam import CaseData, SourceError, Split
from core.methods.training import load_weights_only
from core.storage.safeio import sha256_of

__all__ = [
    "DATASET_SCHEMA",
    "IMAGE_EXTENSIONS",
    "MAX_FILE_BYTES",
    "MAX_IMAGES",
    "MAX_TENSOR_BYTES",
    "MAX_TENSORS_FILE_BYTES",
    "REGION_SCHEMA",
    "REQUIRED",
    "check_dataset",
    "check_region",
    "folder_data",
    "load_data",
    "source_fingerprint",
    "tensors_data",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # the default of a key a table must give

_SPLIT_DEFAULT = {"val": 0.1, "test": 0.2, "seed": 0}
_COMMON = {
    "source": (str, REQUIRED),
    "classes": (list, None),
    "size": ((list, int), None),
    "channels": (int, None),
    "mean": (list, None),
    "std": (list, None),
    "split": (dict, _SPLIT_DEFAULT),
}
# {source: {key: (accepted types, default)}}; REQUIRED marks a key without a default. ``size`` None:
# the images' own size (all must agree); ``channels`` None: len(mean/std) if given, else the data's
# (folder: 1 when every image is grayscale, else 3).
DATASET_SCHEMA: dict[str, dict[str, tuple]] = {
    "folder": {**_COMMON, "root": (str, REQUIRED)},
    "tensors": {**_COMMON, "path": (str, REQUIRED)},
}
# ``masks`` is required for a folder source (a folder of masks, same relative paths as the images);
# for a tensors source it is optional: a folder of ``<split>/<index>.png`` (what ``discover --out``
# writes) that replaces the file's ``mask`` array.
REGION_SCHEMA: dict[str, tuple] = {"masks": (str, None), "name": (str, "region")}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
MAX_FILE_BYTES = 50 * 2**20          # per image / mask file
MAX_IMAGES = 100_000                 # images in one case
MAX_TENSOR_BYTES = 4 * 2**30         # the decoded float32 images of one case
MAX_TENSORS_FILE_BYTES = 4 * 2**30   # a tensors file
SPLIT_NAMES = ("train", "val", "test")
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------
# Validation (no data read)


def _tname(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_classes(classes, where: str) -> list[str]:
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise SourceError(f"{where}: classes must be a list of strings, e.g. [\"cat\", \"dog\"]")
    if not 2 <= len(classes) <= 1000:
        raise SourceError(f"{where}: classes has {len(classes)} names; give 2 to 1000")
    for c in classes:
        if not c.strip() or len(c) > 100:
            raise SourceError(f"{where}: classes entry {c[:40]!r} must be a non-empty name of at most "
                              "100 characters")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise SourceError(f"{where}: classes names {dup[0]!r} more than once; names must be distinct")
    return list(classes)


def _typed_table(section: dict, where: str) -> dict:
    """The table's keys checked against ``DATASET_SCHEMA[source]`` (unknown, missing, wrong type).

    Returns a new dict with every schema key: the given value, or a copy of the default (a dict
    default is copied so the schema is never shared). Values are not yet normalised.
    """
    if not isinstance(section, dict):
        raise SourceError(f"{where}: expected a table with source = \"folder\" or \"tensors\"")
    source = section.get("source")
    if source not in DATASET_SCHEMA:
        raise SourceError(f"{where}: source = {source!r} is not known; use one of "
                          f"{', '.join(map(repr, DATASET_SCHEMA))}")
    schema = DATASET_SCHEMA[source]
    for key in section:
        if key not in schema:
            raise SourceError(f"{where}: unknown key {key!r} for source = {source!r}; valid keys: "
                              f"{', '.join(schema)}")
    out: dict = {}
    for key, (types, default) in schema.items():
        if key not in section:
            if default is REQUIRED:
                raise SourceError(f"{where}: missing key {key!r} (source = {source!r} needs it)")
            out[key] = dict(default) if isinstance(default, dict) else default
            continue
        value = section[key]
        if value is None and default is None:  # a checked table passed again
            out[key] = None
            continue
        if not _is(value, types):
            raise SourceError(f"{where}: {key} must be {_tname(types)}, got {type(value).__name__}")
        out[key] = value
    return out


def _check_size(size, given, where: str) -> list[int] | None:
    """``size`` as ``[H, W]`` (an int means a square), or None; ``given`` is the table's own value,
    quoted in the error. Each side must be an integer from 8 to 1024."""
    if size is None:
        return None
    if isinstance(size, int):
        size = [size, size]
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size) \
            or not all(8 <= s <= 1024 for s in size):
        raise SourceError(f"{where}: size = {given!r}; give [H, W] with each side an "
                          "integer from 8 to 1024")
    return list(size)


def _check_stats(out: dict, where: str) -> None:
    """Check ``channels``, ``mean`` and ``std`` of ``out`` in place: channels 1 or 3 (inferred from
    the first of mean/std given, when absent), one finite value per channel, std > 0; the values
    become floats."""
    if out["channels"] is not None and out["channels"] not in (1, 3):
        raise SourceError(f"{where}: channels = {out['channels']!r}; use 1 (gray) or 3 (RGB)")
    for key in ("mean", "std"):
        vals = out[key]
        if vals is None:
            continue
        if not vals or not all(_number(v) for v in vals):
            raise SourceError(f"{where}: {key} must be a list of finite numbers, one per channel")
        if out["channels"] is None:
            if len(vals) not in (1, 3):
                raise SourceError(f"{where}: {key} has {len(vals)} values; give 1 (gray) or 3 (RGB)")
            out["channels"] = len(vals)
        if len(vals) != out["channels"]:
            raise SourceError(f"{where}: {key} has {len(vals)} values but channels = "
                              f"{out['channels']}; give one value per channel")
        if key == "std" and any(v <= 0 for v in vals):
            raise SourceError(f"{where}: std values must be > 0, got {vals!r}")
        out[key] = [float(v) for v in vals]


def _check_split(split: dict, where: str) -> dict:
    """The full ``{"val", "test", "seed"}`` split table (defaults from ``_SPLIT_DEFAULT``):
    fractions in [0, 0.9] as floats with val + test < 1, seed a non-negative integer."""
    for key in split:
        if key not in _SPLIT_DEFAULT:
            raise SourceError(f"{where}: unknown key {key!r} in split; valid keys: val, test, seed")
    split = {**_SPLIT_DEFAULT, **split}
    for key in ("val", "test"):
        if not _number(split[key]) or not 0 <= split[key] <= 0.9:
            raise SourceError(f"{where}: split.{key} = {split[key]!r}; give a fraction from 0 to 0.9")
    if split["val"] + split["test"] >= 1:
        raise SourceError(f"{where}: split.val + split.test = {split['val'] + split['test']:g}; "
                          "keep it below 1 so training images remain")
    if not isinstance(split["seed"], int) or isinstance(split["seed"], bool) or split["seed"] < 0:
        raise SourceError(f"{where}: split.seed = {split['seed']!r}; give a non-negative integer")
    return {"val": float(split["val"]), "test": float(split["test"]), "seed": split["seed"]}


def check_dataset(section: dict, where: str = "[dataset]") -> dict:
    """Validate a ``[dataset]`` table without reading any data; return it with defaults filled in.

    ``where`` prefixes every message (e.g. ``"case.toml [dataset]"``). The result has every key of
    ``DATASET_SCHEMA[source]``; ``size`` becomes ``[H, W]`` or None, ``split`` a full
    ``{"val", "test", "seed"}`` table, ``channels`` is inferred from ``mean``/``std`` when not
    given. Raises a one-line :class:`SourceError` naming the key: unknown key (listing the valid
    ones), wrong type, size outside 8–1024 per side, channels not 1 or 3, mean/std not one value
    per channel or std ≤ 0, split fractions outside [0, 0.9] or val + test ≥ 1, classes not 2–1000
    distinct non-empty names of at most 100 characters.
    """
    out = _typed_table(section, where)
    for key in ("root", "path"):
        if key in out and not out[key].strip():
            raise SourceError(f"{where}: {key} is empty; give a path relative to the TOML file")
    if out["classes"] is not None:
        out["classes"] = _check_classes(out["classes"], where)
    if out["size"] is not None:
        out["size"] = _check_size(out["size"], section["size"], where)
    _check_stats(out, where)
    out["split"] = _check_split(out["split"], where)
    return out


def check_region(section: dict, where: str = "[region]") -> dict:
    """Validate a ``[region]`` table without reading data; return it with defaults filled in.

    Keys: ``masks`` (str, a folder relative to the TOML file; needed by a folder source; for a
    tensors source a folder of ``<split>/<index>.png`` masks that replaces the file's ``mask``
    array) and ``name`` (str, how pages
    call the region; default ``"region"``, at most 64 characters). One-line :class:`SourceError`
    on an unknown key (listing the valid ones) or a wrong type.
    """
    if not isinstance(section, dict):
        raise SourceError(f"{where}: expected a table with masks = \"<folder>\" and name = \"...\"")
    out = {}
    for key in section:
        if key not in REGION_SCHEMA:
            raise SourceError(f"{where}: unknown key {key!r}; valid keys: {', '.join(REGION_SCHEMA)}")
    for key, (types, default) in REGION_SCHEMA.items():
        value = section.get(key, default)
        if value is not None and not _is(value, types):
            raise SourceError(f"{where}: {key} must be {_tname(types)}, got {type(value).__name__}")
        out[key] = value
    if out["masks"] is not None and not out["masks"].strip():
        raise SourceError(f"{where}: masks is empty; give a folder relative to the TOML file")
    if not out["name"].strip() or len(out["name"]) > 64:
        raise SourceError(f"{where}: name must be a non-empty name of at most 64 characters")
    return out


# ----------------------------------------------------------------------------------------------
# Safe file access


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _regular(path: Path, root: Path | None, base: Path, what: str = "file") -> os.stat_result:
    """stat of a regular file; under a ``root`` a symlink must resolve to one inside ``root``
    (``root`` None: a file the user named explicitly, symlinks followed anywhere)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) and root is None:
            st = os.stat(path)
        elif stat.S_ISLNK(st.st_mode):
            target = path.resolve(strict=True)
            if not _inside(target, root.resolve()):
                raise SourceError(f"{what} {_rel(path, base)!r} is a symlink pointing outside "
                                  f"{_rel(root, base)!r}; copy the file in instead")
            st = os.stat(target)
    except OSError as exc:
        raise SourceError(f"{what} {_rel(path, base)!r} cannot be read ({exc.strerror or exc})") \
            from exc
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{what} {_rel(path, base)!r} is not a regular file (a FIFO, device or "
                          "folder?); keep only image files there")
    return st


def _read_bytes(path: Path, root: Path, base: Path, cap: int, what: str = "image") -> bytes:
    st = _regular(path, root, base, what)
    if st.st_size > cap:
        raise SourceError(f"{what} {_rel(path, base)!r} is {st.st_size / 2**20:.0f} MB, over the "
                          f"{cap / 2**20:.0f} MB limit; shrink it or leave it out")
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise SourceError(f"{what} {_rel(path, base)!r} is over the {cap / 2**20:.0f} MB limit")
    return data


def _decode(path: Path, root: Path, base: Path, what: str = "image"):
    """The fully loaded PIL image at ``path``; every decoding problem is a SourceError."""
    from PIL import Image, UnidentifiedImageError

    data = _read_bytes(path, root, base, MAX_FILE_BYTES, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SourceError(f"{what} {_rel(path, base)!r} has too many pixels (over Pillow's "
                          f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels); "
                          "downscale it") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        line = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
        raise SourceError(f"{what} {_rel(path, base)!r} cannot be decoded ({line}); is it a "
                          "complete image file?") from exc
    return img


# ----------------------------------------------------------------------------------------------
# Folder listing (shared by folder_data and source_fingerprint)


def _subdirs(folder: Path, root: Path, base: Path) -> list[str]:
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            target = path.resolve()
            if not target.is_dir():
                continue
            if not _inside(target, root.resolve()):
                raise SourceError(f"folder {_rel(path, base)!r} is a symlink pointing outside "
                                  f"{_rel(root, base)!r}; copy the folder in instead")
            names.append(entry.name)
        elif entry.is_dir():
            names.append(entry.name)
    return names


def _images_under(folder: Path, root: Path, base: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden names skipped, symlinked folders
    not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
        if len(found) > MAX_IMAGES:
            raise SourceError(f"{_rel(root, base)!r} holds more than {MAX_IMAGES} images; "
                              "use a subset")
    return found


def _layout(root: Path) -> str:
    parts = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    return "split" if parts else "flat"


def _list_folder(dataset: dict, base_dir: Path) -> dict:
    """``{"root", "layout", "classes", "files": [(split or None, label, path)]}``; raises on a
    missing root, unknown / empty class folders and too many images."""
    base_dir = Path(base_dir)
    root = base_dir / dataset["root"]
    if not root.is_dir():
        raise SourceError(f"[dataset] root folder {_rel(root, base_dir)!r} does not exist (paths "
                          "are relative to the TOML file)")
    layout = _layout(root)
    if layout == "split":
        have = [s for s in SPLIT_NAMES if (root / s).is_dir()]
        for need in ("train", "test"):
            if need not in have:
                raise SourceError(f"[dataset] root {_rel(root, base_dir)!r} has {'/'.join(have)} "
                                  f"folders but no {need!r}; give train and test (val optional) "
                                  "or put the class folders directly under root")
        parts = have
    else:
        parts = [None]
    top = root / "train" if layout == "split" else root
    found = _subdirs(top, root, base_dir)
    classes = dataset.get("classes")
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise SourceError(f"[dataset] {_rel(top, base_dir)!r} has {len(classes)} class "
                              "folder(s); a case needs at least 2 (one folder of images per class)")
    else:
        for c in classes:
            if c not in found:
                raise SourceError(f"[dataset] classes names {c!r} but {_rel(top / c, base_dir)!r} "
                                  "does not exist; fix the name or add the folder")
    index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[str | None, int, Path]] = []
    for part in parts:
        folder = root / part if part else root
        for name in _subdirs(folder, root, base_dir):
            if name not in index:
                raise SourceError(f"[dataset] folder {_rel(folder / name, base_dir)!r} is not a "
                                  f"class ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''});"
                                  " add it to classes or move it out of root")
        for c in classes:
            cdir = folder / c
            if part not in (None, "train") and not cdir.is_dir():
                continue  # a val/test split may lack a class
            images = _images_under(cdir, root, base_dir)
            if not images:
                raise SourceError(f"[dataset] class folder {_rel(cdir, base_dir)!r} has no images "
                                  f"({', '.join(IMAGE_EXTENSIONS[:4])}, ...); add some or remove it")
            files.extend((part, index[c], p) for p in images)
            if len(files) > MAX_IMAGES:
                raise SourceError(f"[dataset] root {_rel(root, base_dir)!r} holds more than "
                                  f"{MAX_IMAGES} images; use a subset")
    return {"root": root, "layout": layout, "classes": list(classes), "files": files}


def _mask_path(image: Path, root: Path, mask_root: Path) -> Path | None:
    """The mask file of ``image`` (same relative path, any image extension), or None when there is
    none: a missing mask is an empty region on that image (what ``discover --out`` writes)."""
    rel = image.relative_to(root)
    exact = mask_root / rel
    if exact.exists() or exact.is_symlink():
        return exact
    for ext in IMAGE_EXTENSIONS:
        for cand in (exact.with_suffix(ext), exact.with_suffix(ext.upper())):
            if cand.exists():
                return cand
    return None


# ----------------------------------------------------------------------------------------------
# Decoding and splitting


def _image_array(img, size: tuple[int, int], channels: int | None) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], resized to ``size`` (bilinear), C = channels (None: 1 for a
    gray image, 3 otherwise). 16-bit gray is divided by 65535; alpha is dropped."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / scale, 0, 1).astype(np.float32), mode="F")
    elif mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32), 0, 1), mode="F")
    elif mode in ("1", "L", "LA", "La"):
        img = img.convert("L")
    elif mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if img.mode != "F":
        arr = arr / 255.0
    arr = np.clip(arr, 0, 1)
    if arr.ndim == 2:
        arr = arr[..., None]
    want = channels or arr.shape[-1]
    if arr.shape[-1] == want:
        return arr
    if want == 3:
        return np.repeat(arr, 3, axis=-1)
    return (arr @ np.asarray(_LUMA, dtype=np.float32))[..., None]


def _mask_array(img, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(img)
    arr = arr.any(axis=-1) if arr.ndim == 3 else arr != 0
    if arr.shape != size:
        arr = np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize(
            (size[1], size[0]), Image.Resampling.NEAREST)) > 0
    return arr


def _stratified(labels: np.ndarray, fractions: list[float], rng: np.random.Generator,
                classes: list[str], what: str) -> list[np.ndarray]:
    """Per class, shuffle and cut off ``round(f * n)`` rows for each fraction; the rest is the
    last part (train). Every class keeps at least one row in the last part."""
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in range(len(classes)):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        start = 0
        for k, f in enumerate(fractions):
            n = int(round(f * idx.size))
            parts[k].extend(idx[start:start + n].tolist())
            start += n
        if start >= idx.size:
            raise SourceError(f"[dataset] split leaves class {classes[c]!r} with no training image "
                              f"({idx.size} {what} of it); lower split.val / split.test or add "
                              "images")
        parts[-1].extend(idx[start:].tolist())
    return [np.asarray(sorted(p), dtype=np.int64) for p in parts]


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    if mean is not None:
        x = x - torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    if std is not None:
        x = x / torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.contiguous()


def _make_splits(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                 tags: np.ndarray | None, split: dict, classes: list[str]) -> tuple[Split, ...]:
    """train / val / test Splits. ``tags`` (N,) of 0/1/2 when the data brings its own split
    (val carved from train with ``split.val`` when it has none), else stratified with the seed."""
    labels = y.numpy()
    rng = np.random.default_rng(split["seed"])
    if tags is None:
        test_i, val_i, train_i = _stratified(labels, [split["test"], split["val"]], rng, classes,
                                             "images")
    else:
        train_pool = np.flatnonzero(tags == 0)
        val_i, test_i = np.flatnonzero(tags == 1), np.flatnonzero(tags == 2)
        if val_i.size == 0 and split["val"] > 0:
            carved, kept = _stratified(labels[train_pool], [split["val"]], rng, classes,
                                       "training images")
            val_i, train_i = train_pool[carved], train_pool[kept]
        else:
            train_i = train_pool
        have = set(labels[train_i].tolist())
        for c, name in enumerate(classes):
            if c not in have:
                raise SourceError(f"[dataset] split leaves class {name!r} with no training image; "
                                  "add training images of it")

    def take(idx: np.ndarray) -> Split:
        t = torch.from_numpy(idx)
        return Split(x=x[t].contiguous(), y=y[t].contiguous(),
                     mask=None if mask is None else mask[t].contiguous())

    return take(train_i), take(val_i), take(test_i)


# ----------------------------------------------------------------------------------------------
# Folder source


def _decode_folder(files: list, root: Path, mask_root: Path | None, base_dir: Path,
                   size: tuple | None, dataset: dict) -> tuple:
    """Decode every listed image (and its mask, with a ``mask_root``) in file order.

    Returns ``(arrays, masks, missing, size)``: one (H, W, C) float32 array in [0, 1] per image
    (C as :func:`_image_array` gives it), one (H, W) bool mask per image or None without a
    ``mask_root`` (all False where the mask file is absent), the images without a mask file, and
    the (H, W) size used: ``size`` or the first image's own. The memory cap is checked on the
    first image, before the rest are decoded.
    """
    n = len(files)
    arrays: list[np.ndarray] = []
    masks: list[np.ndarray] | None = [] if mask_root is not None else None
    missing_masks: list[Path] = []
    first = None
    for path_tuple in files:
        path = path_tuple[2]
        img = _decode(path, root, base_dir)
        if first is None:
            first = (path, img.size)
            size = size or (img.size[1], img.size[0])
            need = n * (dataset["channels"] or 3) * size[0] * size[1] * 4
            if need > MAX_TENSOR_BYTES:
                raise SourceError(f"[dataset] {n} images of {size[0]}×{size[1]} would take "
                                  f"{need / 2**30:.1f} GiB (limit {MAX_TENSOR_BYTES / 2**30:.0f} GiB);"
                                  " lower size or use fewer images")
        elif dataset["size"] is None and img.size != first[1]:
            raise SourceError(f"[dataset] images differ in size: {_rel(first[0], base_dir)!r} is "
                              f"{first[1][0]}×{first[1][1]} but {_rel(path, base_dir)!r} is "
                              f"{img.size[0]}×{img.size[1]} (W×H); set size = [H, W] to resize")
        if masks is not None:
            mpath = _mask_path(path, root, mask_root)
            if mpath is None:  # no mask file: no region on this image
                masks.append(np.zeros(tuple(size), dtype=bool))
                missing_masks.append(path)
            else:
                mimg = _decode(mpath, mask_root, base_dir, "mask")
                if mimg.size != img.size:
                    raise SourceError(f"[region] mask {_rel(mpath, base_dir)!r} is {mimg.size[0]}×"
                                      f"{mimg.size[1]} but its image is {img.size[0]}×"
                                      f"{img.size[1]} (W×H); masks must match their images")
                masks.append(_mask_array(mimg, size))
        arrays.append(_image_array(img, size, dataset["channels"]))
    return arrays, masks, missing_masks, size


def _stack_images(arrays: list, channels: int, size: tuple) -> torch.Tensor:
    """The (N, channels, H, W) float32 tensor of the (H, W, C) ``arrays``; gray arrays among RGB
    ones are repeated to ``channels``. Frees each array as it is copied (``arrays`` is emptied
    to Nones) so peak memory stays near one copy."""
    x = torch.empty((len(arrays), channels, *size), dtype=torch.float32)
    for i, arr in enumerate(arrays):
        if arr.shape[-1] != channels:  # inferred channels: gray images among RGB ones
            arr = np.repeat(arr, channels, axis=-1)
        x[i] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        arrays[i] = None
    return x


def folder_data(dataset: dict, region: dict | None, base_dir: Path) -> CaseData:
    """Read an image folder into a :class:`CaseData` (``source="folder"``).

    ``dataset`` is a ``[dataset]`` table (checked again with :func:`check_dataset`), ``region`` a
    ``[region]`` table or None, ``base_dir`` the TOML file's folder (all paths are relative to it).
    Layouts: ``root/<class>/**/<image>`` (a stratified split per class with ``split``: test and val
    take ``round(fraction × n)`` images each, the seed's permutation, rows sorted by file order) or
    ``root/{train,val,test}/<class>/...`` (val carved from train with ``split.val`` when there is
    no ``val`` folder; ``split.test`` then does not apply). Images: float32 (N, C, H, W) in [0, 1]
    resized to ``size`` (default: the images' own size, which must then agree), converted to
    ``channels``, normalised with ``mean``/``std``. Region masks: ``[region] masks`` holds one mask
    per image at the same relative path (any image extension); non-zero pixels are the region;
    ``Split.mask`` is (N, 1, H, W) bool (nearest resize), ``x_clean`` None. ``extra`` holds
    ``{"root": <root relative to base_dir>, "layout": "flat" | "split", "n_files": int}``.
    Raises a one-line :class:`SourceError` naming the file or key on any bad input.
    """
    base_dir = Path(base_dir)
    dataset = check_dataset({**dataset, "source": "folder"}, "[dataset]")
    region = _folder_region(region)
    listing = _list_folder(dataset, base_dir)
    root, classes, files = listing["root"], listing["classes"], listing["files"]
    mask_root = None
    if region is not None:
        mask_root = base_dir / region["masks"]
        if not mask_root.is_dir():
            raise SourceError(f"[region] masks folder {_rel(mask_root, base_dir)!r} does not exist "
                              "(paths are relative to the TOML file)")
    size = tuple(dataset["size"]) if dataset["size"] else None
    n = len(files)
    arrays, masks, missing_masks, size = _decode_folder(files, root, mask_root, base_dir, size,
                                                        dataset)
    channels = dataset["channels"] or max(a.shape[-1] for a in arrays)
    x = _stack_images(arrays, channels, size)
    if masks is not None and n and len(missing_masks) == n:
        # not one image has a mask: a wrong folder, not a region that is absent everywhere
        raise SourceError(f"[region] no mask for any image in {_rel(mask_root, base_dir)!r}: "
                          f"expected e.g. {_rel(mask_root / missing_masks[0].relative_to(root), base_dir)!r} "
                          "(same relative paths as the images; a missing file = no region there)")
    mask = None if masks is None else torch.from_numpy(np.stack(masks))[:, None]
    x = _normalise(x, dataset["mean"], dataset["std"])
    y = torch.tensor([label for _, label, _ in files], dtype=torch.int64)
    tags = None
    if listing["layout"] == "split":
        tags = np.asarray([SPLIT_NAMES.index(part) for part, _, _ in files], dtype=np.int64)
    train, val, test = _make_splits(x, y, mask, tags, dataset["split"], classes)
    return CaseData(train=train, val=val, test=test, class_names=tuple(classes), source="folder",
                    seed=dataset["split"]["seed"],
                    region_name=region["name"] if region is not None else None,
                    mean=_tuple(dataset["mean"]), std=_tuple(dataset["std"]),
                    extra={"root": _rel(root, base_dir), "layout": listing["layout"],
                           "n_files": n})


def _tuple(v):
    return None if v is None else tuple(float(a) for a in v)


def _folder_region(region: dict | None) -> dict | None:
    if region is None:
        return None
    region = check_region(region, "[region]")
    if region["masks"] is None:
        raise SourceError("[region]: missing key 'masks' (a folder of masks, same relative paths "
                          "as the images); remove [region] for a case without one")
    return region


# ----------------------------------------------------------------------------------------------
# Tensors source

_TENSOR_KEYS = ("x", "y", "mask", "split", "classes")


def _load_tensors_file(path: Path, base: Path) -> dict:
    shown = _rel(path, base)
    hint = ("save a dict of plain tensors / arrays, e.g. torch.save({'x': x, 'y': y}, 'data.pt') "
            "or numpy.savez('data.npz', x=x, y=y)")
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".pth", ".npz"):
        raise SourceError(f"[dataset] path {shown!r}: use a .pt / .pth (torch.save) or .npz file")
    if not os.path.lexists(path):
        raise SourceError(f"[dataset] tensors file {shown!r} does not exist (paths are relative to "
                          "the TOML file)")
    st = _regular(path, None, base, "tensors file")
    if st.st_size > MAX_TENSORS_FILE_BYTES:
        raise SourceError(f"[dataset] tensors file {shown!r} is {st.st_size / 2**30:.1f} GiB, over "
                          f"the {MAX_TENSORS_FILE_BYTES / 2**30:.0f} GiB limit; use a subset")
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise SourceError(f"[dataset] tensors file {shown!r} holds pickled (object) arrays; "
                                  f"{hint}") from exc
            raise SourceError(f"[dataset] tensors file {shown!r} cannot be read "
                              f"({str(exc).splitlines()[0][:100]}); {hint}") from exc
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise SourceError(f"[dataset] tensors file {shown!r} is not a readable .npz (truncated "
                              f"or corrupt?); {hint}") from exc

    data = load_weights_only(path, f"[dataset] tensors file {shown!r}", hint, SourceError)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SourceError(f"[dataset] tensors file {shown!r} holds a {type(data).__name__}, not a "
                          f"dict with keys x and y; {hint}")
    return data


def _as_tensor(value, key: str, shown: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.ascontiguousarray(value))
    kind = type(value).__name__ + (f" of {value.dtype}" if hasattr(value, "dtype") else "")
    raise SourceError(f"[dataset] tensors file {shown!r}: {key!r} must be a numeric tensor / array, "
                      f"got {kind}")


def _strings(value, key: str, shown: str) -> list[str] | None:
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        return [str(v) for v in value.reshape(-1)]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _tensors_region(region: dict | None, base_dir: Path) -> tuple[dict | None, Path | None]:
    """The checked ``[region]`` table (or None) and its masks folder (None when it names none)."""
    mask_root = None
    if region is not None:
        region = check_region(region, "[region]")
        if region["masks"] is not None:
            mask_root = base_dir / region["masks"]
            if not mask_root.is_dir():
                raise SourceError(f"[region] masks folder {_rel(mask_root, base_dir)!r} does not "
                                  "exist (relative to the TOML file)")
    return region, mask_root


def _tensor_images(data: dict, shown: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The file's images and labels checked: ``x`` float32 (N, C, H, W) with C 1 or 3 (uint8 is
    divided by 255, float must be finite; (N, H, W) gains C = 1) and ``y`` int64 (N,). Checks the
    file's keys first (unknown ones, missing x or y)."""
    for key in data:
        if key not in _TENSOR_KEYS:
            raise SourceError(f"[dataset] tensors file {shown!r} has an unknown key {key!r}; valid "
                              f"keys: {', '.join(_TENSOR_KEYS)}")
    for key in ("x", "y"):
        if key not in data:
            raise SourceError(f"[dataset] tensors file {shown!r} has no {key!r} (keys: "
                              f"{', '.join(data) or 'none'}); it needs x (N, C, H, W) and y (N,)")
    x = _as_tensor(data["x"], "x", shown)
    y = _as_tensor(data["y"], "y", shown)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise SourceError(f"[dataset] tensors file {shown!r}: x has shape {tuple(x.shape)}; give "
                          "(N, C, H, W) with C 1 or 3, or (N, H, W)")
    n, c, h, w = x.shape
    if n > MAX_IMAGES:
        raise SourceError(f"[dataset] tensors file {shown!r} holds {n} images, over the "
                          f"{MAX_IMAGES} limit; use a subset")
    if n == 0 or h < 1 or w < 1:
        raise SourceError(f"[dataset] tensors file {shown!r}: x has shape {tuple(x.shape)}, no images")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all():
            raise SourceError(f"[dataset] tensors file {shown!r}: x holds NaN or inf values")
    else:
        raise SourceError(f"[dataset] tensors file {shown!r}: x is {x.dtype}; give float in [0, 1] "
                          "or uint8 in [0, 255]")
    if y.dim() != 1 or y.shape[0] != n or y.is_floating_point() or y.dtype == torch.bool:
        raise SourceError(f"[dataset] tensors file {shown!r}: y has shape {tuple(y.shape)} and dtype "
                          f"{y.dtype}; give (N,) = ({n},) integer class indices")
    return x, y.long()


def _tensor_classes(data: dict, classes: list[str] | None, y: torch.Tensor, shown: str) -> list[str]:
    """The class names: ``[dataset] classes`` (given as ``classes``), else the file's ``classes``,
    else "0" … str(max(y)). Every label must lie in range; at least 2 classes."""
    if classes is None and "classes" in data:
        classes = _strings(data["classes"], "classes", shown)
        if classes is None:
            raise SourceError(f"[dataset] tensors file {shown!r}: 'classes' must be a list of strings")
        classes = _check_classes(classes, f"[dataset] tensors file {shown!r}")
    n_classes = len(classes) if classes is not None else int(y.max()) + 1
    bad = torch.nonzero((y < 0) | (y >= n_classes)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise SourceError(f"[dataset] tensors file {shown!r}: label y[{i}] = {int(y[i])} is out of "
                          f"range 0..{n_classes - 1} ({bad.numel()} such labels)"
                          + ("; fix y or classes" if classes is not None else ""))
    if classes is None:
        if n_classes < 2:
            raise SourceError(f"[dataset] tensors file {shown!r}: y has {n_classes} class; a case "
                              "needs at least 2")
        classes = [str(i) for i in range(n_classes)]
    return classes


def _tensor_mask(data: dict, shape: tuple, needed: bool, shown: str) -> torch.Tensor | None:
    """The file's ``mask`` as (N, 1, H, W) bool (non-zero = region) for images of ``shape`` (N, C,
    H, W), or None without one; ``needed``: a ``[region]`` without a masks folder, which then
    requires the file's mask."""
    n, _, h, w = shape
    if "mask" in data:
        mask = _as_tensor(data["mask"], "mask", shown)
        if mask.dim() == 3:
            mask = mask[:, None]
        if mask.dim() != 4 or tuple(mask.shape) != (n, 1, h, w):
            raise SourceError(f"[dataset] tensors file {shown!r}: mask has shape {tuple(mask.shape)}"
                              f"; give ({n}, {h}, {w}) or ({n}, 1, {h}, {w}) like x")
        return mask != 0
    if needed:
        raise SourceError(f"[region] is set but tensors file {shown!r} has no 'mask' array; add "
                          "mask (N, H, W), name a masks folder, or remove [region]")
    return None


def _tensor_tags(data: dict, n: int, shown: str) -> np.ndarray | None:
    """The file's own split as (N,) int64 of 0 (train) / 1 (val) / 2 (test), from numbers or the
    names train / val / test; None when the file has no ``split``."""
    if "split" not in data:
        return None
    raw = data["split"]
    names = _strings(raw, "split", shown)
    if names is not None:
        unknown = sorted(set(names) - set(SPLIT_NAMES))
        if unknown:
            raise SourceError(f"[dataset] tensors file {shown!r}: split value {unknown[0]!r} is "
                              "not train / val / test")
        tags = np.asarray([SPLIT_NAMES.index(s) for s in names], dtype=np.int64)
    else:
        t = _as_tensor(raw, "split", shown)
        if t.is_floating_point() or not set(t.unique().tolist()) <= {0, 1, 2}:
            raise SourceError(f"[dataset] tensors file {shown!r}: split must hold 0 (train), "
                              "1 (val), 2 (test) or the strings train / val / test")
        tags = t.long().numpy().reshape(-1)
    if tags.shape != (n,):
        raise SourceError(f"[dataset] tensors file {shown!r}: split has {tags.size} values for "
                          f"{n} images")
    return tags


def _fit_tensors(x: torch.Tensor, mask: torch.Tensor | None, dataset: dict) -> tuple:
    """``(x, mask)`` converted to ``[dataset] channels`` (gray → RGB repeats, RGB → gray by luma),
    resized to ``size`` (bilinear, antialiased when shrinking; masks nearest) and normalised with
    ``mean``/``std``. The memory cap is checked before any conversion."""
    n, c, h, w = x.shape
    size = tuple(dataset["size"]) if dataset["size"] else (h, w)
    channels = dataset["channels"] or c
    need = n * channels * size[0] * size[1] * 4
    if need > MAX_TENSOR_BYTES:
        raise SourceError(f"[dataset] {n} images of {size[0]}×{size[1]}×{channels} would take "
                          f"{need / 2**30:.1f} GiB (limit {MAX_TENSOR_BYTES / 2**30:.0f} GiB); lower size")
    if channels != c:
        x = x.repeat(1, 3, 1, 1) if channels == 3 else \
            (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                          antialias=size[0] < h or size[1] < w)
        if mask is not None:
            mask = F.interpolate(mask.float(), size=size, mode="nearest") > 0.5
    return _normalise(x.contiguous(), dataset["mean"], dataset["std"]), mask


def tensors_data(dataset: dict, region: dict | None, base_dir: Path) -> CaseData:
    """Read a tensors file into a :class:`CaseData` (``source="tensors"``).

    ``dataset["path"]`` (relative to ``base_dir``) is a ``.pt``/``.pth`` dict loaded with
    ``torch.load(weights_only=True)`` or an ``.npz`` loaded with ``allow_pickle=False``. Keys: ``x``
    (N, C, H, W) with C 1 or 3, or (N, H, W); uint8 (divided by 255) or float (taken as [0, 1],
    must be finite); ``y`` (N,) integers in [0, n_classes); optional ``mask`` (N, H, W) or
    (N, 1, H, W) (non-zero = region), ``split`` (N,) of 0/1/2 or "train"/"val"/"test" (else the
    stratified ``[dataset] split``; val carved from train when the file's split has none) and
    ``classes`` (names; ``[dataset] classes`` wins). n_classes = len(classes), else max(y) + 1
    with names "0", "1", ... ``size``/``channels``/``mean``/``std`` act as for a folder. The
    region exists when the file has ``mask``, or when ``[region] masks`` names a folder of
    ``<split>/<index>.png`` masks (index: the row in the split; a missing file is an empty region
    on that image; what ``discover --out`` writes), which then replaces the file's ``mask``.
    ``extra = {"path": <file relative to base_dir>}``. One-line :class:`SourceError` on any bad
    input (missing keys, wrong shapes, labels out of range, pickled objects).
    """
    base_dir = Path(base_dir)
    dataset = check_dataset({**dataset, "source": "tensors"}, "[dataset]")
    region, mask_root = _tensors_region(region, base_dir)
    path = base_dir / dataset["path"]
    shown = _rel(path, base_dir)
    data = _load_tensors_file(path, base_dir)
    x, y = _tensor_images(data, shown)
    classes = _tensor_classes(data, dataset["classes"], y, shown)
    mask = _tensor_mask(data, tuple(x.shape), region is not None and mask_root is None, shown)
    tags = _tensor_tags(data, x.shape[0], shown)
    x, mask = _fit_tensors(x, mask, dataset)
    train, val, test = _make_splits(x, y, mask, tags, dataset["split"], classes)
    if mask_root is not None:
        train, val, test = _split_masks({"train": train, "val": val, "test": test}, mask_root,
                                        base_dir)
        mask = train.mask
    return CaseData(train=train, val=val, test=test, class_names=tuple(classes), source="tensors",
                    seed=dataset["split"]["seed"],
                    region_name=(region["name"] if region is not None else "region")
                    if mask is not None else None,
                    mean=_tuple(dataset["mean"]), std=_tuple(dataset["std"]),
                    extra={"path": shown})


def _split_mask_files(mask_root: Path, split: str, n: int) -> list[Path | None]:
    """Row i of ``split``'s mask file ``<mask_root>/<split>/<i>.<ext>``, or None (no region)."""
    folder = mask_root / split
    out: list[Path | None] = []
    for i in range(n):
        found = None
        for ext in IMAGE_EXTENSIONS:
            cand = folder / f"{i}{ext}"
            if cand.exists() or cand.is_symlink():
                found = cand
                break
        out.append(found)
    return out


def _split_masks(splits: dict, mask_root: Path, base_dir: Path) -> tuple:
    """The splits with their masks read from ``<mask_root>/<split>/<index>.png`` (resized to the
    images, nearest; non-zero = region; a missing file = an empty region). One-line
    :class:`SourceError` when no split has a single mask file (a wrong folder)."""
    out, found = [], 0
    for name in ("train", "val", "test"):
        sp = splits[name]
        h, w = sp.x.shape[-2:]
        masks = np.zeros((sp.n, 1, h, w), dtype=bool)
        for i, mpath in enumerate(_split_mask_files(mask_root, name, sp.n)):
            if mpath is not None:
                masks[i, 0] = _mask_array(_decode(mpath, mask_root, base_dir, "mask"), (h, w))
                found += 1
        out.append(dataclasses.replace(sp, mask=torch.from_numpy(masks)))
    if not found:
        raise SourceError(f"[region] no mask for any image in {_rel(mask_root, base_dir)!r}: "
                          "expected <split>/<index>.png files (e.g. test/0.png), as "
                          "discover --out writes them; a missing file = no region there")
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Fingerprint


_DIGESTS: dict[tuple, str] = {}  # (path, dev, inode, size, mtime_ns, ctime_ns) -> sha256 hex


def _file_digest(path: Path, st: os.stat_result, cap: int, base: Path) -> str:
    """sha256 hex of a regular file's bytes (``st`` from :func:`_regular`), remembered per
    process on its identity; a file over ``cap`` bytes is a one-line :class:`SourceError`."""
    ident = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _DIGESTS.get(ident)
    if known is not None:
        return known
    if st.st_size > cap:
        raise SourceError(f"file {_rel(path, base)!r} is {st.st_size / 2**20:.0f} MB, over the "
                          f"{cap / 2**20:.0f} MB limit; shrink it or leave it out")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SourceError(f"file {_rel(path, base)!r} is not a regular file")
            digest, read = sha256_of(f, cap + 1)  # one byte past the cap: the file grew
    except OSError as exc:
        raise SourceError(f"file {_rel(path, base)!r} cannot be read ({exc.strerror or exc})") \
            from exc
    if read > cap:
        raise SourceError(f"file {_rel(path, base)!r} is over the {cap / 2**20:.0f} MB limit")
    if len(_DIGESTS) > 4 * MAX_IMAGES:
        _DIGESTS.clear()
    _DIGESTS[ident] = digest
    return digest


def source_fingerprint(dataset: dict, region: dict | None, base_dir: Path) -> str:
    """sha256 hex of the tables and of every file the adapter reads (relative path, size and
    the sha256 of its bytes), without decoding anything: the key of the data stage. Replacing,
    adding or removing an image or mask changes it, also when the new file has the old one's
    size and mtime (``cp -p``, ``rsync -t``, ``tar x``). Each file's hash is remembered per
    process on its (device, inode, size, mtime, ctime), so a second call reads no bytes. Files are
    checked to be regular and within the adapters' size limits before a byte is read. Raises
    :class:`SourceError` like the adapters do for a missing root / file and for bad tables."""
    base_dir = Path(base_dir)
    dataset = check_dataset(dataset, "[dataset]")
    region = check_region(region, "[region]") if region is not None else None
    h = hashlib.sha256(json.dumps({"dataset": dataset, "region": region}, sort_keys=True).encode())

    def add(path: Path, root: Path | None, cap: int = MAX_FILE_BYTES) -> None:
        st = _regular(path, root, base_dir)
        h.update(f"{_rel(path, base_dir)}|{st.st_size}|{_file_digest(path, st, cap, base_dir)}\n"
                 .encode())

    if dataset["source"] == "tensors":
        path = base_dir / dataset["path"]
        if not os.path.lexists(path):
            raise SourceError(f"[dataset] tensors file {_rel(path, base_dir)!r} does not exist")
        add(path, None, MAX_TENSORS_FILE_BYTES)
        if region is not None and region["masks"]:
            mask_root = base_dir / region["masks"]
            if not mask_root.is_dir():
                raise SourceError(f"[region] masks folder {_rel(mask_root, base_dir)!r} does not "
                                  "exist")
            for split in SPLIT_NAMES:  # every mask file the adapter could read, in its order
                folder = mask_root / split
                names = sorted(e.name for e in os.scandir(folder)) if folder.is_dir() else []
                for name in names:
                    if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                        add(folder / name, mask_root)
        return h.hexdigest()
    listing = _list_folder(dataset, base_dir)
    root = listing["root"]
    mask_root = base_dir / region["masks"] if region is not None and region["masks"] else None
    if mask_root is not None and not mask_root.is_dir():
        raise SourceError(f"[region] masks folder {_rel(mask_root, base_dir)!r} does not exist")
    for _, _, path in listing["files"]:
        add(path, root)
        if mask_root is not None:
            mpath = _mask_path(path, root, mask_root)
            if mpath is None:  # no mask: an empty region, keyed as such
                h.update(f"{_rel(path, base_dir)}|no mask\n".encode())
            else:
                add(mpath, mask_root)
    return h.hexdigest()


def load_data(dataset: dict, region: dict | None, base_dir: Path) -> CaseData:
    """:func:`folder_data` or :func:`tensors_data` by ``dataset["source"]`` (checked first with
    :func:`check_dataset`); the same return value and errors."""
    dataset = check_dataset(dataset, "[dataset]")
    adapter = folder_data if dataset["source"] == "folder" else tensors_data
    return adapter(dataset, region, Path(base_dir))
