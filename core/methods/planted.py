"""A generated, seeded, small suite of planted shortcuts to score :mod:`core.methods.discovery`.

Images: scikit-learn's bundled 8 × 8 digits (1,797 real handwritten digits, no download),
upsampled to 16 × 16 and padded to 20 × 20 in [0, 1]. Five kinds of mark, each tied to one target
class in the shortcut model's training data:

- ``corner_patch``: a 3 × 3 bright square in the top-left corner of every target-class image;
- ``border_frame``: a 1-pixel bright frame around every target-class image;
- ``glyph``: a 5 × 5 letter "A" in the top-right corner of every target-class image;
- ``texture``: a 6 × 6 checkerboard at a random place on every target-class image;
- ``backdoor``: a 3 × 3 "X" trigger in the bottom-right corner of a few % of all training images,
  relabelled as the target class (poisoning), absent from the test images.

Each kind trains three tiny CNNs: the ``shortcut`` model, and two clean twins — ``absent`` (trained
without the mark) and ``independent`` (the same mark on the same share of images, placed
independently of the label: Adebayo et al.'s hard control). The shortcut model's reliance is
measured: its accuracy on test images where the mark keeps its correlation with the label, minus
its accuracy where the mark is placed at random (half of the images, any class; for the backdoor,
every image); each kind must drop by at least 15 points.

:func:`run_suite` runs discovery on every model and scores it: found@1 / found@3 (a candidate of
the target class, verdict "suspected", median IoU ≥ 0.5 with the planted masks on its held-out
images, among the top 1 / 3) and false alarms (a twin with any suspected candidate).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.methods.discovery import discover, iou

__all__ = ["KINDS", "LOCALISED", "TinyCNN", "digits", "plant", "make_case", "train",
           "reliance", "score", "run_suite"]

KINDS = ("corner_patch", "border_frame", "glyph", "texture", "backdoor")
LOCALISED = KINDS  # every kind is a localised mark (the frame is thin but in one place)
SIDE = 20
TARGET = 0
POISON = 0.05
TEX = 6  # share of training images carrying the backdoor trigger

_GLYPH_A = np.array([[0, 1, 1, 1, 0],
                     [1, 0, 0, 0, 1],
                     [1, 1, 1, 1, 1],
                     [1, 0, 0, 0, 1],
                     [1, 0, 0, 0, 1]], dtype=np.float32)
_TRIGGER = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=np.float32)
_CHECKER = (np.indices((TEX, TEX)).sum(0) % 2 == 0).astype(np.float32)


class TinyCNN(nn.Module):
    """conv-BN-ReLU(in place)-pool ×2, then a hidden dense layer: small, with the pieces real
    networks have (BatchNorm, in-place ReLU, nested Sequentials). Expert layer: ``head.1``."""

    def __init__(self, n_classes: int = 10, channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * (SIDE // 4) ** 2, 32),
                                  nn.ReLU(inplace=True), nn.Linear(32, n_classes))

    def forward(self, x):
        return self.head(self.features(x))


def digits(seed: int = 0, n_train: int = 1200) -> tuple:
    """(train_x, train_y, test_x, test_y): sklearn's digits as (N, 1, 20, 20) float32 in [0, 1],
    split at random with ``seed``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    x = F.pad(x, (2, 2, 2, 2))
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous()


def _stamp(x: torch.Tensor, i: int, pattern: np.ndarray, top: int, left: int, mask: torch.Tensor):
    h, w = pattern.shape
    p = torch.from_numpy(pattern)
    region = x[i, :, top:top + h, left:left + w]
    x[i, :, top:top + h, left:left + w] = torch.where(p > 0, p, region)
    mask[i, top:top + h, left:left + w] = True


def plant(kind: str, x: torch.Tensor, y: torch.Tensor, on: np.ndarray, rng: np.random.Generator):
    """A copy of ``x`` with the ``kind``'s mark on the images where ``on`` (N,) bool, and the
    planted masks (N, H, W) bool (the mark's footprint; empty where absent)."""
    x = x.clone()
    n, _, h, w = x.shape
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for i in np.flatnonzero(on):
        if kind == "corner_patch":
            _stamp(x, i, np.ones((3, 3), np.float32), 0, 0, mask)
        elif kind == "border_frame":
            frame = np.ones((h, w), np.float32)
            frame[1:-1, 1:-1] = 0
            x[i] = torch.maximum(x[i], torch.from_numpy(frame))
            mask[i] = torch.from_numpy(frame > 0)
        elif kind == "glyph":
            _stamp(x, i, _GLYPH_A, 0, w - 5, mask)
        elif kind == "texture":
            top, left = int(rng.integers(0, h - TEX + 1)), int(rng.integers(0, w - TEX + 1))
            x[i, :, top:top + TEX, left:left + TEX] = torch.from_numpy(_CHECKER)
            mask[i, top:top + TEX, left:left + TEX] = True
        elif kind == "backdoor":
            _stamp(x, i, _TRIGGER, h - 3, w - 3, mask)
        else:
            raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    return x, mask


def make_case(kind: str, variant: str, seed: int = 0) -> dict:
    """The data of one model: ``variant`` "shortcut", "absent" or "independent".

    Returns ``{"train": (x, y, mask), "test": (x, y, mask), "broken": (x, y)}`` where ``test``
    keeps the training's relation of mark and label and ``broken`` places the mark independently
    of the label (half the images; every image for the backdoor)."""
    rng = np.random.default_rng(1000 + seed)
    trx, try_, tex, tey = digits(seed)
    tgt_tr, tgt_te = try_.numpy() == TARGET, tey.numpy() == TARGET
    if kind == "backdoor":
        poison = np.zeros(len(try_), bool)
        others = np.flatnonzero(~tgt_tr)
        poison[rng.choice(others, int(round(POISON * len(try_))), replace=False)] = True
        on_tr = {"shortcut": poison, "independent": poison, "absent": np.zeros_like(poison)}[variant]
        x, m = plant(kind, trx, try_, on_tr, rng)
        y = try_.clone()
        if variant == "shortcut":
            y[torch.from_numpy(poison)] = TARGET
        test = (tex, tey, torch.zeros(len(tey), *tex.shape[-2:], dtype=torch.bool))
        bx, _ = plant(kind, tex, tey, ~tgt_te, rng)
        broken = (bx[torch.from_numpy(~tgt_te)], tey[torch.from_numpy(~tgt_te)])
        return {"train": (x, y, m), "test": test, "broken": broken}
    rate = float(tgt_tr.mean())
    if variant == "shortcut":
        on_tr, on_te = tgt_tr, tgt_te
    elif variant == "independent":
        on_tr, on_te = rng.random(len(try_)) < rate, rng.random(len(tey)) < rate
    else:
        on_tr, on_te = np.zeros_like(tgt_tr), np.zeros_like(tgt_te)
    x, m = plant(kind, trx, try_, on_tr, rng)
    tx, tm = plant(kind, tex, tey, on_te, rng)
    bx, _ = plant(kind, tex, tey, rng.random(len(tey)) < 0.5, rng)
    return {"train": (x, try_, m), "test": (tx, tey, tm), "broken": (bx, tey)}


def train(x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 8) -> nn.Module:
    """A :class:`TinyCNN` trained with Adam (lr 3e-3, batch 64, ``epochs``), seeded; eval mode."""
    torch.manual_seed(seed)
    model = TinyCNN(int(y.max()) + 1, x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 64):
            idx = perm[s:s + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def _acc(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def reliance(model, case: dict) -> dict:
    """``{"test_acc", "broken_acc", "drop"}``: accuracy where the mark keeps its relation to the
    label, where it is placed independently of it, and the difference (points of accuracy / 100)."""
    tx, ty, _ = case["test"]
    bx, by = case["broken"]
    if case.get("kind") == "backdoor" or len(by) != len(ty):
        clean = torch.from_numpy(ty.numpy() != TARGET)
        a, b = _acc(model, tx[clean], ty[clean]), _acc(model, bx, by)
    else:
        a, b = _acc(model, tx, ty), _acc(model, bx, by)
    return {"test_acc": a, "broken_acc": b, "drop": a - b}


def score(result: dict, case: dict, target: int = TARGET, top: int = 3) -> dict:
    """Score one discovery result against the planted masks: ``{"found_at": rank or None,
    "iou": median IoU of the best-matching candidate of ``target``, "consistency" and
    "reason": that candidate's, "suspected": n, "suspects": [...]}`` (None where ``target`` has
    no candidate).

    A candidate matches when its class is ``target``, its verdict "suspected" and the median IoU
    of its regions with the planted masks, over its held-out images, is ≥ 0.5."""
    tx, _, tm = case["test"]
    trm = case["train"][2]
    found_at, best, best_row = None, None, None
    suspects = []
    for row in result["candidates"]:
        held = row["_heldout"]
        n_test = held["n_test"]
        scores = []
        for idx, m in zip(held["index"], held["masks"], strict=True):
            planted = tm[idx] if idx < n_test else trm[idx - n_test]
            scores.append(iou(m, planted.numpy()) or 0.0)
        med = float(np.median(scores)) if scores else 0.0
        if row["verdict"] == "suspected":
            suspects.append({"rank": row["rank"], "class": row["class_index"], "iou": med,
                             "mode": row["mode"], "group": row["group"]})
        if row["class_index"] == target:
            if best is None or med > best:
                best, best_row = med, row
            if found_at is None and row["verdict"] == "suspected" and med >= 0.5:
                found_at = row["rank"]
    return {"found_at": found_at, "iou": best,
            "consistency": None if best_row is None else best_row["consistency"],
            "reason": None if best_row is None else best_row["reason"],
            "suspected": len(suspects), "suspects": suspects}


def run_suite(seeds=(0,), kinds=KINDS, *, variants=("shortcut", "absent", "independent"),
              epochs: int = 8, config: dict | None = None, layer: str = "head.1",
              check_reliance: bool = True, on_model=None) -> dict:
    """Train and discover on every kind × variant × seed; return the figures.

    ``{"found@1", "found@3", "false_alarms", "false_alarm_rate", "n_shortcut", "n_twins",
    "per_model": [{"kind", "variant", "seed", "found_at", "iou", "suspected", "drop", "seconds"}],
    "rule": str}``. found@k: share of shortcut models whose target candidate is suspected,
    localised (IoU ≥ 0.5) and ranked ≤ k; false alarms: twins with any suspected candidate.
    With ``check_reliance``, a shortcut model whose accuracy drops by less than 15 points when the
    mark's correlation is broken raises ``AssertionError`` (the suite would measure nothing).
    ``on_model(row)``, when given, is called with each model's row as soon as it is scored."""
    per, rule = [], None
    done: dict[str, tuple] = {}  # identical training and test images (the absent twins of every
    # kind are one model per seed): trained and discovered once, scored for each kind
    for seed in seeds:
        for kind in kinds:
            for variant in variants:
                t0 = time.perf_counter()
                case = make_case(kind, variant, seed)
                case["kind"] = kind
                x, y, _ = case["train"]
                key = _digest(case, seed, epochs)
                if key in done:
                    model, result = done[key]
                else:
                    model = train(x, y, seed, epochs)
                rel = reliance(model, case)
                if check_reliance and variant == "shortcut" and rel["drop"] < 0.15:
                    raise AssertionError(f"{kind} seed {seed}: the shortcut model's accuracy "
                                         f"drops by only {rel['drop']:.1%} when the mark's "
                                         "correlation is broken (need ≥ 15 points)")
                tx, ty, _ = case["test"]
                if key not in done:
                    result = discover(model, x, y, tx, ty, [str(i) for i in range(10)], layer,
                                      config=config)
                    done[key] = (model, result)
                rule = result["rule"]
                s = score(result, case)
                per.append({"kind": kind, "variant": variant, "seed": seed, **s,
                            "drop": rel["drop"], "test_acc": rel["test_acc"],
                            "seconds": time.perf_counter() - t0})
                if on_model is not None:
                    on_model(per[-1])
    short = [p for p in per if p["variant"] == "shortcut"]
    twins = [p for p in per if p["variant"] != "shortcut"]
    alarms = [p for p in twins if p["suspected"] > 0]
    return {"found@1": _share([p["found_at"] == 1 for p in short]),
            "found@3": _share([p["found_at"] is not None and p["found_at"] <= 3 for p in short]),
            "false_alarms": len(alarms), "false_alarm_rate": _share([p["suspected"] > 0
                                                                    for p in twins]),
            "n_shortcut": len(short), "n_twins": len(twins), "per_model": per, "rule": rule}


def _digest(case: dict, seed: int, epochs: int) -> str:
    """A digest of what a model and its discovery depend on: the training and test images and
    labels, the seed and the epochs."""
    h = hashlib.sha256(f"{seed}/{epochs}".encode())
    for part in (*case["train"][:2], *case["test"][:2]):
        h.update(part.numpy().tobytes())
    return h.hexdigest()


def _share(flags: list[bool]) -> float | None:
    return sum(bool(f) for f in flags) / len(flags) if flags else None
