"""Mask-free shortcut discovery: suspects from what the experts look at, confirmed by cause.

For the model under study and each class c (DESIGN §10, issue 20):

1. **Experts and maps.** The class's experts are the units of the expert layer with the largest
   distributional influence on the class logit over the class's training images (the paper's
   internal influence, :func:`core.engine.experts.experts`). Each image's map is the interpretation of
   those experts together: Integrated Gradients at the input of ``Σ_u w_u · a_u`` (``w_u`` the
   expert's influence, ``a_u`` its activation summed over space) from a blurred copy of the image
   (so dark marks on bright images get attribution too), positive part, channels summed.
2. **Groups.** The fit images of c (its training images; half of them, the other half is held out)
   are grouped by their maps, SpRAy-like: maps downsampled and L2-normalised, a k-nearest-neighbour
   cosine affinity, spectral clustering with k chosen by the largest eigengap of the normalised
   Laplacian. The whole class is always a group too. Held-out images (the other training half and
   the test images predicted as c) join the group whose centroid their map is closest to.
3. **Regions.** Per group three rules: ``fixed`` — one region where the group's mean map is at
   least ``threshold`` × its maximum, grown to the recurring pixels it touches (marks at one
   place); ``moving`` — per image, the connected blob of its own map above ``threshold`` × that
   map's maximum holding the most attribution (marks whose place varies); ``pattern`` — what
   recurs in the blobs' windows once aligned (normalised cross-correlation, windows may reach past
   the border), matched on each image wherever it is (a mark at a random place). Regions are
   closed (3 × 3) and their holes filled. ``pooled`` — one mark at several places (a patch in
   one of four corners splits the class into a cluster per corner, each with too few held-out
   images to decide alone): clusters whose ``fixed`` regions lie apart but hold alike content
   (:func:`content_alike` ≥ ``min_consistency``, joined transitively) become one candidate on
   all their images, each image's region the member region holding most of its map.
4. **Causal tests** on the group's held-out images, each against a control: the same region rolled
   to a random place (same size, same shape). *Necessity*: the region is removed (filled with the
   mean of a 2-pixel ring around it, per channel: ``fill = "local_mean"``; or a blurred copy:
   ``"blur"``) on the held-out images the model predicts as c: the share that lose c.
   *Sufficiency*: the region's content is pasted onto test images of other classes (label
   and prediction not c; topped up with such training images when the test split has too few):
   the share that become c; its control pastes what the same source image holds under the
   control region instead (so a mark that works anywhere is not its own control). A region
   whose place varies (``moving``, ``pattern``, ``pooled``) has a second sufficiency control,
   its content's specificity: what another image of the group holds under the same region,
   pasted at the same place (a mark that moves is elsewhere on that image; an object part the
   class's images share at that place is there too; for ``pooled``, that image is drawn among
   those whose own region lies elsewhere). All are paired (region vs control on the same images):
   one-sided exact McNemar tests; shares with Wilson intervals.
5. **Verdict** "suspected" when, with α Bonferroni-corrected over the candidates tested, both
   effects beat their control at p < α / m, necessity by at least ``min_effect`` and sufficiency
   by at least ``min_sufficiency`` (a region whose place varies: sufficiency also beats the
   specificity control by ``min_sufficiency``), the region is compact
   (mean share of the image ≤ ``max_share``, median ≤ ``max_components`` connected pieces) and
   its content recurs (consistency ≥ ``min_consistency``; a region at one place:
   :func:`content_consistency`, its spread across the group against the same place's spread
   across all images; a region whose place varies: :func:`aligned_consistency`, each region read
   in its own box, at its best small shift, against the group's medoid region);
   otherwise "not suspected" with the first condition on the evidence that failed — or, when
   every condition on the evidence holds and only the images are too few (a test on fewer than
   ``min_tested``, a p-value ≥ α / m), "not suspected" with ``reason_kind`` "power" and a reason
   that starts "too few images to decide" (:func:`verdict_detail`), never a clean bill. The
   rule and thresholds are in every row. Candidates are ranked by evidence (suspected first,
   then the smallest effect over its controls, then the p-value).

Everything reads the model, image tensors (N, C, H, W), labels and class names; nothing knows a
case, a size or a layer name. Bad input gives a row with a reason, never an exception.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.engine.devices import eval_mode, model_device
from core.engine.distributions import LinearDoI, PointDoI
from core.engine.experts import experts as rank_experts
from core.engine.influence import get_layer, influence, model_lock
from core.engine.quantities import ClassQoI, Quantity
from core.methods.metrics import gaussian_blur

__all__ = ["DEFAULTS", "ExpertsQoI", "check_config", "discover", "wilson", "binom_tail",
           "mcnemar_exact", "remove_region", "paste_region", "roll_masks", "region_masks",
           "write_masks", "eigengap_k", "verdict", "verdict_detail", "content_alike", "iou",
           "POWER"]

DEFAULTS: dict = {
    "max_fit": 96,          # training images of a class used to find its groups and regions
    "max_heldout": 160,     # held-out images of a class tested (test predicted as it + train half)
    "max_targets": 160,     # images of other classes the region is pasted onto
    "max_clusters": 5,      # largest k the eigengap may choose
    "min_group": 8,         # fit images a cluster needs to become a group
    "k_experts": 5,         # experts per class whose interpretation is the map
    "resolution": 12,       # Riemann points of the maps' Integrated Gradients
    "threshold": 0.3,       # region: map ≥ threshold × its maximum
    "fill": "local_mean",   # how necessity removes a region: "local_mean" or "blur"
    "alpha": 0.05,          # family-wise level (Bonferroni over the candidates tested)
    "min_effect": 0.15,     # necessity: region effect minus control effect
    "min_sufficiency": 0.10,  # sufficiency: the same margin; lower, since a pasted mark must
                            # outvote the target image's own object (DecoyMNIST's patch: 1.00
                            # necessity, 0.12 sufficiency, both against a 0.00 control)
    "max_share": 0.25,      # compact: mean share of the image the region covers
    "max_components": 3,    # compact: median connected pieces of a region
    "min_consistency": 0.75,  # a mark: its content varies across the group ≤ ¼ as much as the
                            # same place does across all training images (a region that moves:
                            # read in its own box, its distance to the group's medoid ≤ 1/16 of
                            # the same boxes' on random images, 1 − √ ≥ 0.75)
    "min_test": 10,         # test images the model must predict as a class to test it
    "min_tested": 8,        # held-out images a candidate needs for each test
    "seed": 0,
    "batch_size": 256,
}
_BOUNDS = {"max_fit": (8, 100000), "max_heldout": (4, 100000), "max_targets": (4, 100000),
           "max_clusters": (1, 20), "min_group": (2, 10000), "k_experts": (1, 10000),
           "resolution": (1, 1000), "threshold": (0.01, 0.99), "alpha": (1e-9, 0.5),
           "min_effect": (0.0, 1.0), "min_sufficiency": (0.0, 1.0), "max_share": (0.0, 1.0),
           "max_components": (1, 1000),
           "min_consistency": (0.0, 1.0),
           "min_test": (1, 100000), "min_tested": (1, 100000), "seed": (0, 2**31 - 1),
           "batch_size": (1, 1 << 20)}
FILLS = ("local_mean", "blur")
MIN_NCC = 0.6  # a pattern is present where its template correlates at least this well
MOVING = ("moving", "pattern", "pooled")  # region rules whose place varies from image to image
REFINE_PASSES = 2  # a pattern is re-matched with its refined template once more
SHIFT, MAX_SHIFT = 0.15, 3  # consistency: regions compared at their best shift (share of side)


def check_config(section: dict | None, where: str = "[discovery]") -> dict:
    """``section`` over :data:`DEFAULTS`; one-line ``ValueError`` for an unknown key, a wrong type
    or a value out of bounds. Returns the merged settings."""
    sec = dict(section or {})
    unknown = sorted(set(sec) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **sec}
    if out["fill"] not in FILLS:
        raise ValueError(f"{where}: fill must be one of {', '.join(FILLS)}, not {out['fill']!r}")
    for key, (lo, hi) in _BOUNDS.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{where}: {key} must be a number, got {v!r}")
        if isinstance(DEFAULTS[key], int) and not float(v).is_integer():
            raise ValueError(f"{where}: {key} must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"{where}: {key} = {v} is out of bounds [{lo}, {hi}]")
        out[key] = int(v) if isinstance(DEFAULTS[key], int) else float(v)
    return out


# ----------------------------------------------------------------------------------- statistics

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """Wilson score interval of a share ``k / n`` (95% for z = 1.96); (None, None) when n = 0."""
    if n <= 0:
        return None, None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def binom_tail(k: int, n: int, p: float = 0.5) -> float:
    """Exact P(X ≥ k) for X ~ Binomial(n, p) (1.0 for k ≤ 0)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    total = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
    return float(min(1.0, total))


def mcnemar_exact(region: np.ndarray, control: np.ndarray) -> dict:
    """One-sided exact McNemar test that the region's effect exceeds the control's on the same
    images. ``region``/``control``: bool arrays (the effect happened on image i). Returns
    ``{"n", "region_only", "control_only", "p_value"}`` with p = P(X ≥ region_only) for
    X ~ Binomial(region_only + control_only, ½) (1.0 when no pair is discordant)."""
    r = np.asarray(region, dtype=bool)
    c = np.asarray(control, dtype=bool)
    b = int((r & ~c).sum())
    d = int((~r & c).sum())
    return {"n": int(r.size), "region_only": b, "control_only": d,
            "p_value": binom_tail(b, b + d, 0.5) if b + d else 1.0}


def iou(a, b) -> float | None:
    """Intersection over union of two boolean masks; None when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    union = int((a | b).sum())
    return None if union == 0 else int((a & b).sum()) / union


# ----------------------------------------------------------------------------------- image ops

def _dilate(mask: Tensor, r: int) -> Tensor:
    """(N, H, W) bool → dilated by a (2r + 1)² square."""
    if r <= 0:
        return mask
    m = mask.float()[:, None]
    return F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)[:, 0] > 0.5


def remove_region(x: Tensor, mask: Tensor, fill: str = "local_mean") -> Tensor:
    """``x`` (N, C, H, W) with the pixels of ``mask`` (N, H, W) bool replaced.

    ``fill="local_mean"``: per image and channel, the mean of the 2-pixel ring around the region
    (the image's mean when the ring is empty); ``"blur"``: a Gaussian blur of the image with σ an
    eighth of its larger side. Pixels outside the mask are unchanged."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, not {fill!r}")
    mask = mask.to(x.device).bool()
    m = mask[:, None].to(x.dtype)
    if fill == "blur":
        filler = gaussian_blur(x, max(x.shape[-2:]) / 8)
    else:
        ring = (_dilate(mask, 2) & ~mask)[:, None].to(x.dtype)
        count = ring.sum((2, 3))
        ring_mean = (x * ring).sum((2, 3)) / count.clamp(min=1)
        whole = x.mean((2, 3))
        means = torch.where(count > 0, ring_mean, whole)
        filler = means[:, :, None, None].expand_as(x)
    return x * (1 - m) + filler * m


def paste_region(target: Tensor, source: Tensor, mask: Tensor) -> Tensor:
    """``target`` (N, C, H, W) with the pixels of ``mask`` (N, H, W) taken from ``source``
    (same shape): the region's content moved onto other images at the same place."""
    m = mask.to(target.device)[:, None].to(target.dtype)
    return target * (1 - m) + source.to(target.device) * m


def roll_masks(mask: Tensor, rng: np.random.Generator, tries: int = 24) -> tuple[Tensor, list]:
    """The control regions: each mask (N, H, W) rolled (cyclically shifted) by a random offset, so
    the control has the same size and shape at a random place. Of ``tries`` offsets the one that
    overlaps the region least is kept. Returns the rolled masks and the (dy, dx) offsets."""
    out = torch.zeros_like(mask)
    offsets = []
    h, w = mask.shape[-2:]
    for i in range(len(mask)):
        best, best_overlap = (0, 0), None
        for _ in range(tries):
            dy, dx = int(rng.integers(0, h)), int(rng.integers(0, w))
            if dy == 0 and dx == 0:
                continue
            rolled = torch.roll(mask[i], (dy, dx), (0, 1))
            overlap = int((rolled & mask[i]).sum())
            if best_overlap is None or overlap < best_overlap:
                best, best_overlap = (dy, dx), overlap
            if overlap == 0:
                break
        out[i] = torch.roll(mask[i], best, (0, 1))
        offsets.append(best)
    return out, offsets


def _tidy(mask: np.ndarray) -> np.ndarray:
    """A region closed with a 3 × 3 square and its holes no larger than itself filled (checkered
    marks become blocks; a frame stays a frame)."""
    from scipy import ndimage

    if not mask.any():
        return mask
    padded = np.pad(mask, 2)  # closing without the image border eroding the region
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3)))[2:-2, 2:-2] | mask
    holes = ndimage.binary_fill_holes(closed) & ~closed
    if holes.any():  # fill the small holes (a glyph's counter), not what a ring encloses
        lab, n = ndimage.label(holes)
        sizes = ndimage.sum(holes, lab, index=np.arange(1, n + 1))
        small = np.flatnonzero(sizes <= closed.sum()) + 1
        closed = closed | np.isin(lab, small)
    return closed


def _components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask, structure=np.ones((3, 3)))[1])


# ----------------------------------------------------------------------------------- the model

def _logits(out) -> Tensor:
    """The class scores of a model's output: the tensor itself, the first entry of a tuple/list,
    or a dict's ``"logits"`` (else its first value)."""
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    elif isinstance(out, tuple | list):
        out = out[0]
    return out


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted classes (N,) int64 on the CPU, eval mode (restored), under the model's lock."""
    dev = model_device(model)
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long)
    with model_lock(model), eval_mode(model):
        out = [_logits(model(x[i:i + batch_size].to(dev))).argmax(1).cpu()
               for i in range(0, len(x), batch_size)]
    return torch.cat(out)


class ExpertsQoI(Quantity):
    """``Σ_u w_u · a_u``: the experts' activations at ``layer`` (each channel summed over space, or
    a neuron of a flat layer) weighted by ``weights``: what the class's experts respond to."""

    def __init__(self, layer: str, units, weights):
        self.source = layer
        self.units = [int(u) for u in units]
        self.weights = torch.as_tensor(list(weights), dtype=torch.float32)
        self.element = None

    def __call__(self, activation: Tensor) -> Tensor:
        a = activation[:, self.units]
        if a.dim() > 2:
            a = a.flatten(2).sum(2)
        return (a * self.weights.to(a.device, a.dtype)).sum(1)

    def check(self, activation: Tensor) -> None:
        n = activation.shape[1] if activation.dim() >= 2 else 0
        if any(not 0 <= u < n for u in self.units):
            raise ValueError(f"expert units {self.units} out of range for layer {self.source!r} "
                             f"with {n} units")

    def __repr__(self) -> str:
        return f"ExpertsQoI({self.source!r}, {self.units})"


def _class_experts(model, x: Tensor, layer: str | None, cls: int, k: int) -> tuple[list, list]:
    """The class's top-k experts at ``layer`` by influence on its logit over ``x``: (units,
    weights); weights are the positive scores normalised to sum 1 (equal when none is positive)."""
    if layer is None:
        return [], []
    ranking = rank_experts(model, x, layer, ClassQoI(cls), PointDoI(), k=k)
    units = ranking.units
    scores = np.array([max(e.score, 0.0) for e in ranking.experts], dtype=np.float64)
    if scores.sum() <= 0:
        scores = np.ones(len(units))
    return units, (scores / scores.sum()).tolist()


def expert_maps(model: nn.Module, x: Tensor, layer: str | None, cls: int, units, weights, *,
                resolution: int = 12, batch_size: int | None = None) -> Tensor:
    """Each image's map (N, H, W) float ≥ 0: Integrated Gradients at the input, from a blurred copy
    of the image (σ = a sixth of its larger side), of the experts' :class:`ExpertsQoI` (or of the
    class logit when ``layer`` is None or there are no units), positive part, channels summed."""
    qoi = ExpertsQoI(layer, units, weights) if layer is not None and units else ClassQoI(cls)
    dev = model_device(model)
    xd = x.to(dev)
    base = gaussian_blur(xd, max(x.shape[-2:]) / 6)
    attr = influence(model, xd, None, qoi, LinearDoI(resolution, baseline=base), per_input=True,
                     multiply=True, batch_size=batch_size)
    return attr.sum(1).clamp(min=0).detach().cpu().float()


# ----------------------------------------------------------------------------------- grouping

def _features(maps: Tensor, side: int = 16) -> np.ndarray:
    """Downsampled (at most side × side), L2-normalised maps as rows (N, d)."""
    h, w = maps.shape[-2:]
    small = F.adaptive_avg_pool2d(maps[:, None], (min(h, side), min(w, side)))[:, 0]
    flat = small.flatten(1).double().numpy()
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norm > 0, norm, 1.0)


def _affinity(feat: np.ndarray) -> np.ndarray:
    """Symmetric k-nearest-neighbour cosine affinity (k = max(5, √N)), ≥ 0, zero diagonal."""
    n = len(feat)
    s = np.clip(feat @ feat.T, 0, None)
    np.fill_diagonal(s, 0)
    k = min(n - 1, max(5, int(round(math.sqrt(n)))))
    if k <= 0:
        return s
    keep = np.zeros_like(s, dtype=bool)
    idx = np.argsort(-s, axis=1)[:, :k]
    np.put_along_axis(keep, idx, True, axis=1)
    a = np.where(keep | keep.T, s, 0.0)
    return np.maximum(a, a.T)


def eigengap_k(affinity: np.ndarray, max_k: int) -> tuple[int, list[float]]:
    """The number of clusters by the largest eigengap of the normalised Laplacian
    L = I − D^-½ A D^-½: k = argmax_{1 ≤ k ≤ max_k} (λ_k − λ_{k−1}) (λ ascending, from 0).
    Returns k and the first max_k + 1 eigenvalues."""
    n = len(affinity)
    if n < 3 or max_k <= 1:
        return 1, []
    d = affinity.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0.0)
    lap = np.eye(n) - inv[:, None] * affinity * inv[None, :]
    lam = np.sort(np.linalg.eigvalsh(lap))[:max_k + 1]
    gaps = np.diff(lam)
    k = int(np.argmax(gaps[:max_k])) + 1 if len(gaps) else 1
    return k, [float(v) for v in lam]


def _cluster(feat: np.ndarray, cfg: dict) -> tuple[np.ndarray, int, list[float]]:
    """Cluster labels (N,) of the fit images, k and the eigenvalues."""
    n = len(feat)
    labels = np.zeros(n, dtype=np.int64)
    if n < 2 * cfg["min_group"]:
        return labels, 1, []
    aff = _affinity(feat)
    k, lam = eigengap_k(aff, min(cfg["max_clusters"], n // cfg["min_group"]))
    if k <= 1:
        return labels, 1, lam
    from sklearn.cluster import SpectralClustering

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = SpectralClustering(n_clusters=k, affinity="precomputed",
                                        random_state=cfg["seed"],
                                        assign_labels="cluster_qr").fit_predict(aff + 1e-9)
    except Exception:  # a degenerate graph: one group
        return np.zeros(n, dtype=np.int64), 1, lam
    return labels.astype(np.int64), k, lam


# ----------------------------------------------------------------------------------- regions

def _normalised(maps: Tensor) -> Tensor:
    top = maps.flatten(1).max(1).values.clamp(min=1e-12)
    return maps / top[:, None, None]


def _smooth(maps: Tensor) -> Tensor:
    """A 3 × 3 mean of each map (N, H, W): attribution that alternates pixel by pixel (strided
    convolutions, pooling) becomes one region."""
    return F.avg_pool2d(maps[:, None], 3, 1, 1, count_include_pad=False)[:, 0]


def _fixed_region(maps: Tensor, threshold: float) -> np.ndarray:
    """One region (H, W) bool: where the group's mean normalised, smoothed map ≥ threshold × its
    maximum."""
    mean = _smooth(_normalised(maps)).mean(0).numpy()
    if mean.max() <= 0:
        return np.zeros(mean.shape, dtype=bool)
    return _tidy(mean >= threshold * mean.max())


def _recurring(x_group: Tensor, x_all: Tensor) -> np.ndarray:
    """(H, W) bool: pixels whose content recurs in the group and is unusual there: across the
    group's images they vary ≤ ¼ as much as across all images, and their group mean is ≥ ½ of
    that all-images spread away from the all-images mean (in some channel)."""
    if len(x_group) < 2 or len(x_all) < 2:
        return np.zeros(x_group.shape[-2:], dtype=bool)
    mu_g, s_g = x_group.mean(0), x_group.std(0)
    mu_a, s_a = x_all.mean(0), x_all.std(0)
    rec = (s_a > 1e-6) & (s_g <= 0.25 * s_a) & ((mu_g - mu_a).abs() >= s_a)
    return rec.any(0).numpy()


def _grow(region: np.ndarray, recurring: np.ndarray) -> np.ndarray:
    """The recurring pixels connected (8-neighbours) to the region's recurring pixels, tidied; the
    region itself when none of it recurs (then the consistency test judges it)."""
    from scipy import ndimage

    seeds = region & recurring
    if not seeds.any():
        return region
    lab, _ = ndimage.label(recurring, structure=np.ones((3, 3)))
    keep = np.unique(lab[seeds])
    return _tidy(np.isin(lab, keep[keep > 0]))


def _blob_regions(maps: Tensor, threshold: float) -> np.ndarray:
    """Per image (N, H, W) bool: the connected piece of {smoothed map ≥ threshold × its max}
    holding the most attribution, tidied."""
    from scipy import ndimage

    out = np.zeros(maps.shape, dtype=bool)
    for i, a in enumerate(_smooth(maps).numpy()):
        if a.max() <= 0:
            continue
        above = a >= threshold * a.max()
        lab, n = ndimage.label(above, structure=np.ones((3, 3)))
        if n == 0:
            continue
        mass = ndimage.sum(a, lab, index=np.arange(1, n + 1))
        out[i] = _tidy(lab == int(np.argmax(mass)) + 1)
    return out


def _margin(template_shape) -> tuple[int, int]:
    """How far a template may reach past the image's border: half its height and width (a mark
    at the border is matched with at least half the template inside)."""
    return template_shape[-2] // 2, template_shape[-1] // 2


def _padded(x: Tensor, ph: int, pw: int) -> Tensor:
    """``x`` (N, C, H, W) padded with zeros by ``ph`` rows and ``pw`` columns on each side, so
    windows may reach past the border (zeros, not repeated edges: a mark at the border is not
    smeared outwards)."""
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw, pw, ph, ph))


def _ncc(x: Tensor, template: Tensor, margin: tuple[int, int] = (0, 0)) -> Tensor:
    """Normalised cross-correlation (N, H − h + 1 + 2·mh, W − w + 1 + 2·mw) of a template
    (C, h, w) with every window of the images ``x`` (N, C, H, W), windows reaching ``margin``
    = (mh, mw) pixels past the border (:func:`_padded`); entry (i, j) is the window whose top-left
    corner is (i − mh, j − mw). 0 where a window or the template is flat."""
    x = _padded(x, *margin)
    t = template - template.mean()
    tn = t.norm()
    c, h, w = template.shape
    if float(tn) <= 1e-8:
        return torch.zeros(len(x), x.shape[-2] - h + 1, x.shape[-1] - w + 1)
    num = F.conv2d(x, (t / tn)[None])[:, 0]
    ones = torch.ones(1, c, h, w, dtype=x.dtype)
    s1 = F.conv2d(x, ones)[:, 0]
    s2 = F.conv2d(x * x, ones)[:, 0]
    var = (s2 - s1 * s1 / (c * h * w)).clamp(min=0)
    den = var.sqrt()
    return torch.where(den > 1e-6, num / den.clamp(min=1e-6), torch.zeros_like(num))


def _best_windows(x: Tensor, template: Tensor) -> tuple[list, Tensor, Tensor]:
    """Where ``template`` (C, h, w) correlates best with each image of ``x`` (N, C, H, W), windows
    reaching up to :func:`_margin` past the border: (top-left corners [(top, left)] in image
    coordinates, may be negative; the windows (N, C, h, w) cut from the padded images; the best
    correlations (N,))."""
    mh, mw = _margin(template.shape)
    ncc = _ncc(x, template, (mh, mw))
    best, pos = ncc.flatten(1).max(1)
    width = ncc.shape[-1]
    xp = _padded(x, mh, mw)
    h, w = template.shape[-2:]
    corners, windows = [], []
    for i in range(len(x)):
        top, left = divmod(int(pos[i]), width)
        windows.append(xp[i, :, top:top + h, left:left + w])
        corners.append((top - mh, left - mw))
    return corners, torch.stack(windows) if windows else x[:, :, :h, :w], best


def _place(shape: np.ndarray, corners: list, size: tuple[int, int]) -> np.ndarray:
    """Masks (N, H, W) bool: ``shape`` (h, w) with its top-left corner at each corner (clipped
    to the image)."""
    masks = np.zeros((len(corners), *size), dtype=bool)
    sh, sw = shape.shape
    for i, (top, left) in enumerate(corners):
        t0, l0 = max(0, top), max(0, left)
        t1, l1 = min(size[0], top + sh), min(size[1], left + sw)
        if t1 > t0 and l1 > l0:
            masks[i, t0:t1, l0:l1] = shape[t0 - top:t1 - top, l0 - left:l1 - left]
    return masks


def _pattern_rule(x: Tensor, blobs: np.ndarray, x_ref: Tensor,
                  rng: np.random.Generator) -> dict | None:
    """A recurring pattern from the group's attribution blobs, or None.

    A window (the median blob box plus a 1-pixel margin) around each blob's centre (reaching past
    the border where the blob is near it); the medoid window (highest mean correlation with the
    others) is the first template. It is matched on every image of the group (best normalised
    cross-correlation, :func:`_best_windows`); of the aligned windows, the pixels that recur
    connected to the most attributed ones are the pattern (:func:`_refine`, ``REFINE_PASSES``
    times, each matching the last template): the template becomes their box (plus a 1-pixel
    margin) and its recurring pixels the region's shape. Without recurring pixels (or fewer than
    a quarter of the blob's) the last template and shape stay. Returns ``{"template",
    "shape"}`` as nested lists."""
    keep = [i for i in range(len(blobs)) if blobs[i].any()]
    if len(keep) < 2:
        return None
    h, w = blobs.shape[-2:]
    boxes = [_bbox(blobs[i]) for i in keep]
    wh = min(h, int(np.median([b[1] - b[0] for b in boxes])) + 2)
    ww = min(w, int(np.median([b[3] - b[2] for b in boxes])) + 2)
    xp = _padded(x, wh, ww)
    bp = np.pad(blobs, ((0, 0), (wh, wh), (ww, ww)))
    crops, shapes = [], []
    for i in keep:
        rows, cols = np.nonzero(blobs[i])
        top = int(round(rows.mean() - (wh - 1) / 2)) + wh
        left = int(round(cols.mean() - (ww - 1) / 2)) + ww
        crops.append(xp[i, :, top:top + wh, left:left + ww])
        shapes.append(bp[i, top:top + wh, left:left + ww])
    flat = torch.stack(crops).flatten(1).double()
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-8)
    sim = (flat @ flat.T).numpy()
    np.fill_diagonal(sim, np.nan)
    medoid = int(np.nanargmax(np.nanmean(sim, axis=1)))
    template, shape = crops[medoid], _tidy(shapes[medoid])
    for _ in range(REFINE_PASSES):
        refined = _refine(x, template, shape, x_ref, rng)
        if refined is None:
            break
        template, shape = refined
    if not shape.any():
        return None
    return {"template": template.tolist(), "shape": shape.tolist()}


def _refine(x: Tensor, template: Tensor, shape: np.ndarray, x_ref: Tensor,
            rng: np.random.Generator, grow: int = 2) -> tuple[Tensor, np.ndarray] | None:
    """One refinement of a pattern: ``template`` (C, h, w) is matched on every image of ``x``
    (:func:`_best_windows`); the aligned windows, ``grow`` pixels larger on each side, are
    compared with the same windows on random images of ``x_ref``, and the pixels that recur
    there (:func:`_recurring`; inside the image in at least half the windows) connected to
    ``shape`` (h, w) are the new shape; the new template
    is the aligned windows' mean over its box plus a 1-pixel margin. Returns (template, shape),
    or None when nothing recurs (or less than a quarter of ``shape``)."""
    corners, _, _ = _best_windows(x, template)
    h, w = template.shape[-2:]
    wh, ww = h + 2 * grow, w + 2 * grow
    xp = _padded(x, wh, ww)
    inside_p = _padded(torch.ones(1, 1, *x.shape[-2:]), wh, ww)[0, 0]
    cuts = [(slice(top + wh - grow, top + 2 * wh - grow), slice(left + ww - grow, left + 2 * ww - grow))
            for top, left in corners]
    aligned = torch.stack([xp[i, :, r, c] for i, (r, c) in enumerate(cuts)])
    inside = torch.stack([inside_p[r, c] for r, c in cuts]).mean(0).numpy() >= 0.5
    # the control: the same windows on random images (a background every image shares there,
    # such as a margin, does not count as the pattern)
    rp = _padded(x_ref[torch.as_tensor(rng.integers(0, len(x_ref), len(cuts)))], wh, ww)
    ref = torch.stack([rp[i, :, r, c] for i, (r, c) in enumerate(cuts)])
    rec = _recurring(aligned, ref) & inside  # what lies past the border cannot recur
    seed = np.pad(shape, grow)
    grown = _grow(seed, rec) if (seed & rec).any() else rec
    if not (grown.any() and (grown & rec).any() and grown.sum() >= 0.25 * shape.sum()):
        return None
    t, b, left, r = _bbox(grown)
    t0, b0 = max(0, t - 1), min(wh, b + 1)
    l0, r0 = max(0, left - 1), min(ww, r + 1)
    return aligned.mean(0)[:, t0:b0, l0:r0], grown[t0:b0, l0:r0]


def _match(x: Tensor, rule: dict) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N, H, W) bool, best correlation (N,)) of a pattern rule: its shape placed where the
    template correlates best with each image (the template may reach past the border by
    :func:`_margin`; the mask is clipped to the image)."""
    template = torch.as_tensor(rule["template"], dtype=x.dtype)
    shape = np.asarray(rule["shape"], dtype=bool)
    corners, _, best = _best_windows(x, template)
    return _place(shape, corners, tuple(x.shape[-2:])), best.numpy()


def _mass_share(maps: Tensor, masks: np.ndarray) -> np.ndarray:
    """Share of each map's (positive) mass inside its mask (N,)."""
    m = maps.numpy()
    total = m.reshape(len(m), -1).sum(1)
    inside = (m * masks).reshape(len(m), -1).sum(1)
    return np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0)


def _apply_rule(rule: dict, maps: Tensor | None, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N, H, W) bool, present (N,) bool) of a candidate's region rule on new images ``x``
    and their maps: a ``pattern`` is present where the template correlates ≥ ``min_ncc``; other
    regions where their share of the map's mass is at least half the group's median."""
    if rule["mode"] == "pattern":
        masks, best = _match(x, rule)
        return masks, best >= rule["min_ncc"]
    if rule["mode"] == "fixed":
        masks = np.broadcast_to(np.asarray(rule["region"], dtype=bool), maps.shape).copy()
    elif rule["mode"] == "pooled":
        masks = _pooled_masks(rule["regions"], maps)[0]
    else:
        masks = _blob_regions(maps, rule["threshold"])
    share = _mass_share(maps, masks)
    present = (share >= 0.5 * rule["median_mass"]) & masks.reshape(len(masks), -1).any(1)
    return masks, present


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _boxes_at(x: Tensor, masks: np.ndarray, corners: list, size: tuple[int, int],
              shift: int) -> tuple[Tensor, Tensor]:
    """Windows (n, C, h + 2·shift, w + 2·shift) of the images ``x`` (n, C, H, W) whose central
    h × w box has its top-left corner at ``corners`` [(top, left)] (zero outside the image), and
    the masks (n, h, w) bool of ``masks`` (n, H, W) in those central boxes."""
    h, w = size
    p = shift + max(h, w)
    xp = F.pad(x, (p, p, p, p))
    mp = np.pad(np.asarray(masks, dtype=bool), ((0, 0), (p, p), (p, p)))
    wins, cores = [], []
    for i, (top, left) in enumerate(corners):
        wins.append(xp[i, :, top + p - shift:top + p + h + shift,
                       left + p - shift:left + p + w + shift])
        cores.append(mp[i, top + p:top + p + h, left + p:left + p + w])
    return torch.stack(wins), torch.as_tensor(np.stack(cores))


def _shifted_distance(windows: Tensor, template: Tensor, weight: Tensor, shift: int) -> Tensor:
    """(n,) each window's smallest mean squared difference to ``template`` (C, h, w) over the
    pixels of ``weight`` (h, w), its central box moved by up to ``shift`` pixels each way."""
    h, w = template.shape[-2:]
    total = weight.sum().clamp(min=1)
    best = None
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            d = ((windows[:, :, dy:dy + h, dx:dx + w] - template) ** 2).mean(1)
            d = (d * weight).sum((1, 2)) / total
            best = d if best is None else torch.minimum(best, d)
    return best


def aligned_consistency(x: Tensor, masks: np.ndarray, x_ref: Tensor,
                        rng: np.random.Generator, max_medoids: int = 24) -> float:
    """How much a region's content recurs, wherever it is: 1 − √(D_group / D_control).

    Each region of ``masks`` (n, H, W) on the images ``x`` (n, C, H, W) is read in a box of the
    median box size centred on its own box, so a mark that moves is compared with itself. The
    regions are split at random in halves: the template is the medoid of the first half (of up
    to ``max_medoids`` tried, the one with the smallest median distance to the others in it);
    D_group is the median over the second half (so the choice of template does not flatter
    it) of the mean squared difference to it over the template's region pixels (all regions
    when there are fewer than 4), each box moved to its best
    shift of up to ``SHIFT`` × its larger side (1–``MAX_SHIFT`` pixels; a mark found a pixel
    off, or a texture at another phase, is still the same). D_control: the same boxes on random
    images of ``x_ref`` (e.g. every class's training images), given the same shifts. 1: the same
    content every time (a mark); ≤ 0: it varies as much as any image does there (an object
    part). 0 for fewer than 2 regions, and when most random images hold the template's content
    there too (D_control = 0: a background every image shares is not a mark)."""
    keep = [i for i in range(len(masks)) if masks[i].any()]
    if len(keep) < 2 or len(x_ref) < 2:
        return 0.0
    masks = np.asarray(masks, dtype=bool)[keep]
    boxes = [_bbox(m) for m in masks]
    h = max(1, int(np.median([b[1] - b[0] for b in boxes])))
    w = max(1, int(np.median([b[3] - b[2] for b in boxes])))
    shift = int(np.clip(round(SHIFT * max(h, w)), 1, MAX_SHIFT))
    corners = [((b[0] + b[1] - h) // 2, (b[2] + b[3] - w) // 2) for b in boxes]
    wins, cores = _boxes_at(x[torch.as_tensor(keep)], masks, corners, (h, w), shift)
    ref_i = torch.as_tensor(rng.integers(0, len(x_ref), len(keep)))
    ref_wins, _ = _boxes_at(x_ref[ref_i], masks, corners, (h, w), shift)
    order = rng.permutation(len(keep))
    fit, held = (order[:len(order) // 2], order[len(order) // 2:]) if len(order) >= 4 \
        else (order, order)
    best = None
    for i in fit[:max_medoids]:
        template = wins[i, :, shift:shift + h, shift:shift + w]
        d = _shifted_distance(wins[torch.as_tensor(fit)], template, cores[i].float(), shift)
        score = float(np.median(d.numpy()[fit != i])) if len(fit) > 1 else 0.0
        if best is None or score < best[0]:
            best = (score, int(i))
    i = best[1]
    template, weight = wins[i, :, shift:shift + h, shift:shift + w], cores[i].float()
    others = held[held != i]
    within = float(_shifted_distance(wins[torch.as_tensor(others)], template, weight,
                                     shift).mean())
    control = float(np.median(_shifted_distance(ref_wins, template, weight, shift).numpy()))
    if control <= 1e-12:  # most images hold the same there (a shared background): no mark
        return 0.0
    return float(1 - math.sqrt(within / control))


def _crops(x: Tensor, masks: np.ndarray, boxes: list, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Each image's box resized (nearest) to ``size``: contents (n, C, h, w) and masks (n, h, w)."""
    cs, ms = [], []
    for i, (t, b, left, r) in enumerate(boxes):
        crop = x[i:i + 1, :, t:b, left:r]
        m = torch.as_tensor(masks[i][t:b, left:r], dtype=torch.float32)[None, None]
        cs.append(F.interpolate(crop, size=size, mode="nearest")[0])
        ms.append(F.interpolate(m, size=size, mode="nearest")[0, 0] > 0.5)
    return torch.stack(cs), torch.stack(ms)


def _box3(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def content_consistency(x: Tensor, masks: np.ndarray, x_ref: Tensor,
                        rng: np.random.Generator) -> float:
    """How much a region's content recurs: 1 − (its pixels' spread across the images ``x`` (n, C,
    H, W) with regions ``masks`` (n, H, W)) / (the spread of the same boxes at the same places
    across random images of ``x_ref``, e.g. every class's training images).

    The images are first smoothed with a 3 × 3 mean (a pattern found one pixel off, or a
    checkerboard at another phase, still counts as the same); each region's bounding box is
    resized (nearest) to the median box size; the spread is the
    standard deviation across images, averaged over the positions inside at least half the
    regions and over channels. 1: the same pattern every time (a mark); ≤ 0: it varies as much as
    any image does there (an object part). 0 for fewer than 2 regions."""
    keep = [i for i in range(len(masks)) if masks[i].any()]
    if len(keep) < 2 or len(x_ref) < 2:
        return 0.0
    boxes = [_bbox(masks[i]) for i in keep]
    size = (max(1, int(np.median([b[1] - b[0] for b in boxes]))),
            max(1, int(np.median([b[3] - b[2] for b in boxes]))))
    xs = _box3(x[torch.as_tensor(keep)])
    crops, cm = _crops(xs, masks[keep], boxes, size)
    ref_i = torch.as_tensor(rng.integers(0, len(x_ref), len(keep)))
    ref, _ = _crops(_box3(x_ref[ref_i]), masks[keep], boxes, size)
    inside = cm.float().mean(0) >= 0.5
    if not bool(inside.any()):
        return 0.0
    within = crops.std(0)[:, inside].mean()
    spread = ref.std(0)[:, inside].mean()
    if float(spread) <= 1e-8:
        return 1.0 if float(within) <= 1e-8 else 0.0
    return float(1 - within / spread)


# ----------------------------------------------------------------------------------- tests

def causal_tests(model: nn.Module, cls: int, x_group: Tensor, masks: np.ndarray, x_targets: Tensor,
                 *, fill: str = "local_mean", seed: int = 0, batch_size: int = 256,
                 same_place: bool | str = False) -> dict:
    """Necessity and sufficiency of the regions ``masks`` (N, H, W) bool on ``x_group`` (images the
    model predicts as ``cls``), each against a rolled control of the same shape.

    Necessity: share of ``x_group`` that lose ``cls`` once the region is removed (``fill``).
    Sufficiency: share of ``x_targets`` (other classes' images) that become ``cls`` once the region's
    content of a group image (taken in turn) is pasted onto them at the same place; its control
    pastes the same image's content under the control region instead. Returns the
    shares, their Wilson intervals, the controls' and the McNemar tests (one-sided: region > control).

    ``same_place`` (for regions whose place varies from image to image): a second sufficiency
    control, the content specificity — what *another* image of the group (at random, never the
    same one) holds under the same region, pasted at the same place. A mark that moves is
    somewhere else on that image, so its content there is not the mark; an object part the
    class's images hold at the same place (a digit's stroke) is there too and works as well.
    ``same_place="elsewhere"`` (a mark pooled from several places): that other image is drawn
    among those whose own region lies elsewhere (overlapping the source's by less than half),
    when there are any, so the control holds what the class has there without the mark.
    Adds ``control_same_place`` (share, ``_ci``), ``same_place_p`` and ``same_place_pairs``
    (paired with the region's sufficiency on the same targets); None/1.0 when not run or when
    the group has one image."""
    rng = np.random.default_rng(seed)
    m = torch.as_tensor(np.asarray(masks, dtype=bool))
    ctrl, _ = roll_masks(m, rng)
    lost = _predict(model, remove_region(x_group, m, fill), batch_size) != cls
    lost_c = _predict(model, remove_region(x_group, ctrl, fill), batch_size) != cls
    out = {"fill": fill}
    out.update(_effect("necessity", lost.numpy(), lost_c.numpy()))
    if len(x_targets):
        j = torch.arange(len(x_targets)) % len(x_group)
        src, sm = x_group[j], m[j]
        pasted = paste_region(x_targets, src, sm)
        # the control pastes what the same image holds under the control region (same size and
        # shape, a random place): content that is not the candidate, so a mark that works
        # anywhere (a texture) is not its own control
        pasted_c = paste_region(x_targets, src, ctrl[j])
        became = _predict(model, pasted, batch_size) == cls
        became_c = _predict(model, pasted_c, batch_size) == cls
        out.update(_effect("sufficiency", became.numpy(), became_c.numpy()))
        if same_place and len(x_group) > 1:
            other = (j + torch.as_tensor(rng.integers(1, len(x_group), len(j)))) % len(x_group)
            if same_place == "elsewhere":
                other = _elsewhere(m, j, other, rng)
            became_o = _predict(model, paste_region(x_targets, x_group[other], sm),
                                batch_size) == cls
            out.update(_same_place(became.numpy(), became_o.numpy()))
    else:
        out.update(_effect("sufficiency", np.zeros(0, bool), np.zeros(0, bool)))
    out.setdefault("control_same_place", None)
    out.setdefault("control_same_place_ci", [None, None])
    out.setdefault("same_place_p", 1.0 if same_place else None)
    out.setdefault("same_place_pairs", [0, 0])
    return out


def _elsewhere(m: Tensor, j: Tensor, other: Tensor, rng: np.random.Generator) -> Tensor:
    """For each source ``j[t]``, another image whose region (``m``, (N, H, W) bool) overlaps the
    source's by less than half of the smaller one, drawn at random; ``other[t]`` where none does."""
    flat = m.flatten(1).float()
    inter = flat @ flat.T
    size = flat.sum(1)
    apart = inter < 0.5 * torch.minimum(size[:, None], size[None, :]).clamp(min=1)
    out = other.clone()
    for t, src in enumerate(j.tolist()):
        pool = torch.nonzero(apart[src]).flatten()
        if len(pool):
            out[t] = pool[int(rng.integers(len(pool)))]
    return out


def _same_place(region: np.ndarray, control: np.ndarray) -> dict:
    """The content-specificity control's fields (see :func:`causal_tests`)."""
    test = mcnemar_exact(region, control)
    n, kc = int(control.size), int(control.sum())
    return {"control_same_place": kc / n if n else None,
            "control_same_place_ci": list(wilson(kc, n)), "same_place_p": test["p_value"],
            "same_place_pairs": [test["region_only"], test["control_only"]]}


def _effect(name: str, region: np.ndarray, control: np.ndarray) -> dict:
    n = int(region.size)
    k, kc = int(region.sum()), int(control.sum())
    lo, hi = wilson(k, n)
    clo, chi = wilson(kc, n)
    test = mcnemar_exact(region, control)
    return {name: k / n if n else None, f"{name}_ci": [lo, hi], f"{name}_n": n,
            f"control_{name}": kc / n if n else None, f"control_{name}_ci": [clo, chi],
            f"{name}_p": test["p_value"],
            f"{name}_pairs": [test["region_only"], test["control_only"]]}


def rule_text(cfg: dict) -> str:
    """The verdict rule in words, with its thresholds."""
    return (f"suspected when necessity and sufficiency exceed their same-shape random-place "
            f"control by ≥ {cfg['min_effect']:g} and ≥ {cfg['min_sufficiency']:g}, each with a "
            f"one-sided exact McNemar p < α/m "
            f"(α = {cfg['alpha']:g}, m = candidates tested, Bonferroni), each on ≥ "
            f"{cfg['min_tested']} held-out images, and the region is compact (mean share of the "
            f"image ≤ {cfg['max_share']:g}, median ≤ {cfg['max_components']} connected pieces) "
            f"and its content recurs (consistency ≥ {cfg['min_consistency']:g}). A region at one "
            f"place: consistency = 1 − its spread across the group's images / the spread of the "
            f"same place across all training images. A region whose place varies (moving, "
            f"pattern) is compared with itself wherever it is: 1 − √(D_group / D_control), "
            f"D_group the median over the group's regions of the mean squared difference to the "
            f"group's medoid region, each region read in its own box at its best shift of "
            f"≤ {SHIFT:.0%} of the box (≤ {MAX_SHIFT} px), D_control the same for those boxes on "
            f"random training images; and its content is specific: pasted onto other classes' "
            f"images it makes them the class more often, by ≥ {cfg['min_sufficiency']:g} with "
            f"p < α/m, than what another image of the class holds at the same place does (an "
            f"object part the class's images share there works as well; a mark that moves does "
            f"not); necessity removes the region ({cfg['fill'].replace('_', ' ')} fill). A candidate "
            f"that meets every condition on the evidence but a p-value or the number of images "
            f"is not suspected for now: too few images to decide")


POWER = "power"  # reason_kind of a candidate that could not be decided for lack of images


def verdict(row: dict, cfg: dict, m: int) -> tuple[str, str]:
    """("suspected" | "not suspected", reason) of one tested candidate under the rule with ``m``
    candidates tested (see :func:`rule_text`); :func:`verdict_detail` also says whether the
    reason is a lack of images."""
    word, reason, _ = verdict_detail(row, cfg, m)
    return word, reason


def verdict_detail(row: dict, cfg: dict, m: int) -> tuple[str, str, str]:
    """(verdict, reason, reason_kind) of one tested candidate. ``reason_kind``: ``"suspected"``;
    :data:`POWER` when every condition on the evidence holds (each effect beats its control by
    its margin, the region is compact, its content recurs) and only the images are too few — a
    test on fewer than ``min_tested`` images, or a p-value ≥ α/m — so that more images could
    decide it (the reason then starts "too few images to decide"); ``"evidence"`` otherwise,
    the reason being the first condition on the evidence that failed."""
    level = cfg["alpha"] / max(m, 1)
    power: list[str] = []
    evidence: list[str] = []
    effs = {"necessity": cfg["min_effect"], "sufficiency": cfg["min_sufficiency"]}
    for name in ("necessity", "sufficiency"):
        n = row.get(f"{name}_n") or 0
        if n < cfg["min_tested"]:
            power.append(f"too few images to test {name} ({n} < {cfg['min_tested']})")
            continue
        gain, eff = row[name] - row[f"control_{name}"], effs[name]
        if gain < eff:
            evidence.append(f"{name} {row[name]:.2f} does not beat its control "
                            f"{row[f'control_{name}']:.2f} by {eff:g}")
        elif row[f"{name}_p"] >= level:
            power.append(f"{name} beats its control by {gain:.2f} but p = "
                         f"{row[f'{name}_p']:.2g} ≥ {level:.2g} on {n} images")
    if row.get("same_place_p") is not None:  # a region whose place varies
        why = _specificity_failure(row, cfg["min_sufficiency"], level)
        if why is not None:
            (evidence if "does not beat" in why else power).append(why)
    if row["share_of_image"] > cfg["max_share"]:
        evidence.append(f"the region is not compact: it covers {row['share_of_image']:.0%}"
                        f" of the image (> {cfg['max_share']:.0%})")
    if row["components"] > cfg["max_components"]:
        evidence.append(f"the region is not compact: {row['components']:g} pieces "
                        f"(> {cfg['max_components']})")
    if row["consistency"] < cfg["min_consistency"]:
        evidence.append(f"the region's content does not recur across the group "
                        f"(consistency {row['consistency']:.2f} < "
                        f"{cfg['min_consistency']:g}): an object part, not a mark")
    if evidence:
        return "not suspected", evidence[0], "evidence"
    if power:
        return "not suspected", "too few images to decide: " + power[0], POWER
    return "suspected", ("both effects beat the control, the region is compact and its content "
                         "recurs"), "suspected"


def _specificity_failure(row: dict, margin: float, level: float) -> str | None:
    """Why a moving region fails the content-specificity control, or None when it passes."""
    ctrl = row.get("control_same_place")
    if ctrl is None:
        return ("its content's specificity could not be tested (one image in the group, or no "
                "other class's image to paste onto)")
    gain = row["sufficiency"] - ctrl
    if gain < margin:
        return (f"sufficiency {row['sufficiency']:.2f} does not beat {ctrl:.2f} by {margin:g}, "
                f"what another image of the class holds at the same place: the class's own "
                f"content there, not a mark that moves")
    if row["same_place_p"] >= level:
        return (f"sufficiency beats what another image of the class holds at the same place by "
                f"{gain:.2f} but p = {row['same_place_p']:.2g} ≥ {level:.2g}")
    return None


# ----------------------------------------------------------------------------------- discovery

def _note(cls, name, reason: str, **extra) -> dict:
    return {"kind": "note", "class": name, "class_index": cls, "verdict": "not suspected",
            "reason": reason, **extra}


def discover(model: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
             class_names, layer: str | None = None, *, device=None, config: dict | None = None,
             progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Mask-free shortcut candidates of ``model`` (see the module's docstring for the method).

    ``train_x``/``test_x`` (N, C, H, W) in the model's input scale, ``train_y``/``test_y`` (N,) class
    indices into ``class_names``; ``layer`` a ``named_modules()`` name whose units are the experts
    (None, or a layer that cannot be read: the class logit's own maps). ``device``: where to
    compute (a copy of the model is moved there; None: the model's own). ``config``: keys of
    :data:`DEFAULTS`. ``progress(done, total, message)`` per class.

    Returns ``{"candidates": [...], "notes": [...], "rule": str, "config": dict, "layer": str,
    "n_tested": m, "k_per_class": {class name: k}}``. Each candidate (ranked, best first, ``rank``
    from 1) is plain JSON except ``"_rule"`` (what :func:`region_masks` needs: the class, units,
    weights, mode, threshold, fixed region) and ``"_heldout"`` (held-out indices and masks).
    Notes are rows for classes that could not be tested, with the reason.
    """
    cfg = check_config(config)
    names = [str(c) for c in class_names]
    out = {"candidates": [], "notes": [], "rule": rule_text(cfg), "config": cfg,
           "layer": layer, "n_tested": 0, "k_per_class": {}}
    if device is not None and torch.device(device) != model_device(model):
        model = copy.deepcopy(model).to(device)
    data = (train_x.detach().cpu().float(), train_y.detach().cpu().long(),
            test_x.detach().cpu().float(), test_y.detach().cpu().long())
    ready = _ready(model, data, names, layer, cfg, out)
    if ready is None:
        return out
    pred_train, pred_test, layer = ready
    out["layer"] = layer
    rng = np.random.default_rng(cfg["seed"])
    raw: list[dict] = []
    for c, name in enumerate(names):
        if progress is not None:
            progress(c, len(names), f"class {name}")
        n_pred = int((pred_test == c).sum())
        if n_pred < cfg["min_test"]:
            out["notes"].append(_note(c, name, f"too few images to test: the model predicts "
                                      f"{name!r} for {n_pred} test images (need {cfg['min_test']})",
                                      n_images=n_pred))
            continue
        try:
            found, k = _class_candidates(model, c, name, data[0], data[1], pred_train, data[2],
                                         data[3], pred_test, layer, cfg, rng)
        except Exception as exc:  # a method that cannot run on this model: a row, go on
            out["notes"].append(_note(c, name, f"could not run: {_first_line(exc)}"))
            continue
        out["k_per_class"][name] = k
        raw.extend(found)
    if progress is not None:
        progress(len(names), len(names), "verdicts")
    out["n_tested"] = len(raw)
    out["candidates"] = _judge_and_rank(raw, cfg, out["rule"])
    return out


def _ready(model, data: tuple, names: list[str], layer: str | None, cfg: dict,
           out: dict) -> tuple[Tensor, Tensor, str | None] | None:
    """The checks before any class is tested: (training predictions, test predictions, the layer
    to read — None when ``layer`` cannot be read, with a note), or None when nothing can be
    tested (one class, a model that fails on the images or predicts one class; a note in
    ``out["notes"]`` says why)."""
    train_x, _, test_x, _ = data
    if len(names) < 2:
        out["notes"].append(_note(None, names[0] if names else None,
                                  "the case has one class: there is no other class to test a "
                                  "shortcut against"))
        return None
    try:
        pred_test = _predict(model, test_x, cfg["batch_size"])
        pred_train = _predict(model, train_x, cfg["batch_size"])
    except Exception as exc:  # the model cannot run on these images
        out["notes"].append(_note(None, None, f"could not run: the model fails on the images "
                                  f"({_first_line(exc)})"))
        return None
    if len(pred_test) and bool((pred_test == pred_test[0]).all()):
        out["notes"].append(_note(None, names[int(pred_test[0])] if int(pred_test[0]) < len(names)
                                  else str(int(pred_test[0])),
                                  f"the model predicts one class for every test image "
                                  f"({len(pred_test)} images): a constant model has no shortcut "
                                  "to test"))
        return None
    if layer is not None:
        try:
            get_layer(model, layer)
        except ValueError as exc:
            out["notes"].append(_note(None, None, f"layer {layer!r} cannot be read "
                                      f"({_first_line(exc)}); maps of the class logit instead"))
            layer = None
    return pred_train, pred_test, layer


def _judge_and_rank(raw: list[dict], cfg: dict, rule: str) -> list[dict]:
    """The tested candidates ``raw`` with their verdicts (Bonferroni over all of them), the rule
    and thresholds, ranked by evidence, a candidate whose region repeats a better one's dropped;
    ``rank`` and ``masks`` from 1. Returns the kept rows, best first."""
    m = len(raw)
    for row in raw:
        row["verdict"], row["reason"], row["reason_kind"] = verdict_detail(row, cfg, m)
        row["rule"] = rule
        row["thresholds"] = {k: cfg[k] for k in ("alpha", "min_effect", "min_sufficiency",
                                                 "max_share",
                                                 "max_components", "min_consistency",
                                                 "min_tested")}
        row["alpha_corrected"] = cfg["alpha"] / max(m, 1)
    ranked = sorted(raw, key=_evidence, reverse=True)
    kept: list[dict] = []
    for row in ranked:
        if any(_same(row, other) for other in kept):
            continue
        kept.append(row)
    for i, row in enumerate(kept):
        row["rank"] = i + 1
        row["masks"] = str(i + 1)
    return kept


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _evidence(row: dict) -> tuple:
    gain = min(row["necessity"] - row["control_necessity"],
               row["sufficiency"] - row["control_sufficiency"],
               row["sufficiency"] - (row.get("control_same_place") or 0.0))
    return (row["verdict"] == "suspected", round(gain, 2), row["consistency"], -row["p_value"])


def _same(a: dict, b: dict) -> bool:
    """Two candidates of one class whose regions agree: mean IoU ≥ 0.6 on their shared held-out
    images (a pooled candidate: over all the images either holds, 0 where only one does)."""
    if a["class_index"] != b["class_index"]:
        return False
    ia, ib = a["_heldout"]["index"], b["_heldout"]["index"]
    common = np.intersect1d(ia, ib)
    if len(common) == 0:
        return False
    pa = {int(v): i for i, v in enumerate(ia)}
    pb = {int(v): i for i, v in enumerate(ib)}
    scores = [iou(a["_heldout"]["masks"][pa[int(v)]], b["_heldout"]["masks"][pb[int(v)]]) or 0.0
              for v in common]
    if "pooled" in (a.get("mode"), b.get("mode")):  # a pooled mark holds its members' images:
        # the same only where it covers no more than they do (images of one only count as 0)
        return float(np.sum(scores)) / len(np.union1d(ia, ib)) >= 0.6
    return float(np.mean(scores)) >= 0.6


def _take(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(idx)[:n]) if len(idx) > n else np.sort(idx)


def _class_split(c: int, name: str, train_y: Tensor, pred_test: Tensor, n_test: int, cfg: dict,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices into the training images — half of class ``c``'s, at most ``max_fit`` —,
    held-out indices into a pool that stacks test then train images: test i → i, train j →
    ``n_test`` + j; the test images predicted as ``c`` and the other training half, at most
    ``max_heldout``). Raises ``ValueError`` when the class has too few training images."""
    own = np.flatnonzero(train_y.numpy() == c)
    own = rng.permutation(own)
    half = len(own) // 2
    fit_i = np.sort(own[:half])[:cfg["max_fit"]]
    held_test = np.flatnonzero(pred_test.numpy() == c)
    held_train = np.sort(own[half:])
    held = np.concatenate([held_test, n_test + held_train])
    held = _take(held, cfg["max_heldout"], rng)
    if len(fit_i) < 2:
        raise ValueError(f"class {name!r} has {len(own)} training images; discovery needs at "
                         "least 4")
    return fit_i, held


def _groups(maps_fit: Tensor, maps_held: Tensor, cfg: dict) -> tuple[list[tuple], int]:
    """The groups of a class: ``[(name, in fit (N_fit,) bool, in held-out (N_held,) bool)]`` —
    the whole class, then each spectral cluster with at least ``min_group`` fit images (held-out
    images join the nearest centroid) — and the eigengap's k."""
    feat_fit, feat_held = _features(maps_fit), _features(maps_held)
    labels, k, _ = _cluster(feat_fit, cfg)
    groups = [("all", np.ones(len(maps_fit), bool), np.ones(len(maps_held), bool))]
    if k > 1:
        cents = np.stack([feat_fit[labels == g].mean(0) for g in range(k)])
        assign = np.argmax(feat_held @ cents.T, axis=1)
        for g in range(k):
            if (labels == g).sum() >= cfg["min_group"]:
                groups.append((f"cluster {g + 1} of {k}", labels == g, assign == g))
    return groups, k


def _targets(c: int, train_x: Tensor, train_y: Tensor, pred_train: Tensor, test_x: Tensor,
             test_y: Tensor, pred_test: Tensor, cfg: dict, rng: np.random.Generator) -> Tensor:
    """Other classes' images for sufficiency (M, C, H, W): test images whose label and prediction
    are not ``c``, topped up with such training images when the test split has too few (a model
    that gives almost every test image the class leaves few to paste onto)."""
    tgt = np.flatnonzero((test_y.numpy() != c) & (pred_test.numpy() != c))
    tgt = _take(tgt, cfg["max_targets"], rng)
    x_tgt = test_x[torch.as_tensor(tgt, dtype=torch.long)]
    if len(tgt) < cfg["max_targets"]:
        more = np.flatnonzero((train_y.numpy() != c) & (pred_train.numpy() != c))
        more = _take(more, cfg["max_targets"] - len(tgt), rng)
        x_tgt = torch.cat([x_tgt, train_x[torch.as_tensor(more, dtype=torch.long)]])
    return x_tgt


def _class_candidates(model, c, name, train_x, train_y, pred_train, test_x, test_y, pred_test,
                      layer, cfg, rng) -> tuple[list[dict], int]:
    """Every tested candidate of class ``c`` (before verdicts) and the eigengap's k."""
    n_test = len(test_x)
    fit_i, held = _class_split(c, name, train_y, pred_test, n_test, cfg, rng)
    pool_x = torch.cat([test_x, train_x])
    pool_pred = torch.cat([pred_test, pred_train])
    x_fit = train_x[torch.as_tensor(fit_i)]
    units, weights = _class_experts(model, x_fit, layer, c, cfg["k_experts"])
    x_held = pool_x[torch.as_tensor(held)]
    maps_all = expert_maps(model, torch.cat([x_fit, x_held]), layer, c, units, weights,
                           resolution=cfg["resolution"])
    maps_fit, maps_held = maps_all[:len(fit_i)], maps_all[len(fit_i):]
    groups, k = _groups(maps_fit, maps_held, cfg)
    x_tgt = _targets(c, train_x, train_y, pred_train, test_x, test_y, pred_test, cfg, rng)
    x_ref = train_x[torch.as_tensor(_take(np.arange(len(train_x)), 512, rng))]
    ctx = {"model": model, "c": c, "name": name, "layer": layer, "units": units,
           "weights": weights, "cfg": cfg, "rng": rng, "pool_x": pool_x, "pool_pred": pool_pred,
           "x_tgt": x_tgt, "x_ref": x_ref, "train_x": train_x, "n_test": n_test}
    found, fixed = [], []
    for gname, in_fit, in_held in groups:
        hidx = held[in_held]
        if len(hidx) == 0:
            continue
        group = {"name": gname, "maps_fit": maps_fit[torch.as_tensor(in_fit)],
                 "maps_held": maps_held[torch.as_tensor(in_held)], "hidx": hidx,
                 "x_fit": x_fit[torch.as_tensor(in_fit)], "n_fit": int(in_fit.sum())}
        blobs = None
        for mode in ("fixed", "moving", "pattern"):
            region_rule = _region_rule(mode, group, blobs, ctx)
            if region_rule is None:
                continue
            rule, fit_masks, fit_present = region_rule
            if mode == "moving":
                blobs = fit_masks
            if mode == "fixed" and gname != "all":
                fixed.append((rule, in_fit, in_held, gname))
            row = _test_candidate(rule, fit_masks, fit_present, group, ctx)
            if row is not None:
                found.append(row)
    for members in _pool_sets(fixed, x_fit, ctx):
        row = _pooled_candidate(members, x_fit, maps_fit, maps_held, held, ctx)
        if row is not None:
            found.append(row)
    return found, k


def content_alike(xa: Tensor, ra: np.ndarray, xb: Tensor, rb: np.ndarray, x_ref: Tensor,
                  rng: np.random.Generator) -> float:
    """How alike two regions' contents are, each read at its own place: 1 − √(D_ab / D_control).

    ``xa`` (n, C, H, W) are the images of one group with its region ``ra`` (H, W) bool, ``xb``
    those of another with ``rb``. Both regions are read in a box of the larger height and width,
    centred on each region's box; the template is the pixel-wise median of the first group's
    boxes; D_ab is the median over the second group's boxes of the mean squared difference to it
    over ``ra``'s pixels, each at its best shift (twice :func:`aligned_consistency`'s: two groups'
    regions are found apart, each a pixel or two off the mark); D_control
    the same for the boxes at ``rb``'s place on random images of ``x_ref``. Symmetric: the smaller
    of the two directions. 1: one content at two places (a mark that moves); ≤ 0: the second
    place holds what any image holds there. 0 when a group has no image or a region is empty, or
    when most random images hold the template's content there too."""
    if len(xa) == 0 or len(xb) == 0 or len(x_ref) < 2 or not ra.any() or not rb.any():
        return 0.0
    ba, bb = _bbox(ra), _bbox(rb)
    h, w = max(ba[1] - ba[0], bb[1] - bb[0]), max(ba[3] - ba[2], bb[3] - bb[2])
    # two groups' regions may be found a pixel or two apart from the mark: twice the shift
    shift = int(np.clip(round(2 * SHIFT * max(h, w)), 1, 2 * MAX_SHIFT))

    def windows(x: Tensor, region: np.ndarray, box: tuple) -> tuple[Tensor, Tensor]:
        corner = ((box[0] + box[1] - h) // 2, (box[2] + box[3] - w) // 2)
        return _boxes_at(x, np.broadcast_to(region, (len(x), *region.shape)),
                         [corner] * len(x), (h, w), shift)

    def one_way(x1, r1, b1, x2, r2, b2) -> float:
        w1, c1 = windows(x1, r1, b1)
        w2, _ = windows(x2, r2, b2)
        ref, _ = windows(x_ref[torch.as_tensor(rng.integers(0, len(x_ref), len(x2)))], r2, b2)
        template = w1[:, :, shift:shift + h, shift:shift + w].median(0).values
        weight = c1[0].float()
        within = float(np.median(_shifted_distance(w2, template, weight, shift).numpy()))
        control = float(np.median(_shifted_distance(ref, template, weight, shift).numpy()))
        return 0.0 if control <= 1e-12 else float(1 - math.sqrt(within / control))

    return min(one_way(xa, ra, ba, xb, rb, bb), one_way(xb, rb, bb, xa, ra, ba))


def _pool_sets(fixed: list[tuple], x_fit: Tensor, ctx: dict) -> list[list[tuple]]:
    """The groups whose one-place regions hold alike content (:func:`content_alike` ≥
    ``min_consistency``, joined transitively): one mark at several places, each set of at least
    two groups to be tested as one candidate. ``fixed``: [(rule, in fit, in held-out, name)]."""
    n = len(fixed)
    if n < 2:
        return []
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    regions = [np.asarray(f[0]["region"], dtype=bool) for f in fixed]
    for i in range(n):
        for j in range(i + 1, n):
            if (regions[i] & regions[j]).sum() >= 0.5 * min(regions[i].sum(), regions[j].sum()):
                continue  # the same place: not one mark at several places
            score = content_alike(x_fit[torch.as_tensor(fixed[i][1])], regions[i],
                                  x_fit[torch.as_tensor(fixed[j][1])], regions[j],
                                  ctx["x_ref"], ctx["rng"])
            if score >= ctx["cfg"]["min_consistency"]:
                parent[root(j)] = root(i)
    sets: dict[int, list] = {}
    for i in range(n):
        sets.setdefault(root(i), []).append(fixed[i])
    return [members for members in sets.values() if len(members) > 1]


def _pooled_masks(regions: list, maps: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image (masks (N, H, W) bool, share of the map's mass inside (N,)): of the pooled
    one-place ``regions``, the one holding the most of the image's map."""
    stack = np.stack([np.asarray(r, dtype=bool) for r in regions])
    shares = np.stack([_mass_share(maps, np.broadcast_to(r, maps.shape)) for r in stack], 1)
    best = shares.argmax(1) if len(shares) else np.zeros(0, int)
    return stack[best], shares[np.arange(len(best)), best] if len(best) else np.zeros(0)


def _pooled_candidate(members: list[tuple], x_fit: Tensor, maps_fit: Tensor, maps_held: Tensor,
                      held: np.ndarray, ctx: dict) -> dict | None:
    """One candidate for a mark found at several places (:func:`_pool_sets`): the members' images
    together, each image's region the member region holding most of its map (``pooled`` rule),
    tested like any candidate whose place varies. None when no held-out image holds it."""
    in_fit = np.any([m[1] for m in members], axis=0)
    in_held = np.any([m[2] for m in members], axis=0)
    if not in_held.any():
        return None
    first = members[0][0]
    regions = [m[0]["region"] for m in members]
    mf = maps_fit[torch.as_tensor(in_fit)]
    fit_masks, share = _pooled_masks(regions, mf)
    rule = {**{k: first[k] for k in ("class", "layer", "units", "weights", "threshold",
                                     "resolution")},
            "mode": "pooled", "region": None, "regions": regions,
            "median_mass": float(np.median(share))}
    group = {"name": "pooled: " + " + ".join(m[3] for m in members), "maps_fit": mf,
             "maps_held": maps_held[torch.as_tensor(in_held)], "hidx": held[in_held],
             "x_fit": x_fit[torch.as_tensor(in_fit)], "n_fit": int(in_fit.sum())}
    return _test_candidate(rule, fit_masks, share >= 0.5 * rule["median_mass"], group, ctx)


def _region_rule(mode: str, group: dict, blobs: np.ndarray | None,
                 ctx: dict) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """One region rule of a group: (the rule :func:`_apply_rule` reads, the fit images' masks
    (N, H, W) bool, which fit images hold the region (N,) bool), or None when the mode finds no
    region. ``blobs``: the ``moving`` rule's fit masks (the ``pattern`` rule starts from them)."""
    cfg, mf, x_group = ctx["cfg"], group["maps_fit"], group["x_fit"]
    pattern = None
    if mode == "pattern":
        pattern = _pattern_rule(x_group, blobs, ctx["x_ref"], ctx["rng"])
        if pattern is None:
            return None
        region = None
        fit_masks, fit_ncc = _match(x_group, pattern)
    elif mode == "fixed":
        region = _fixed_region(mf, cfg["threshold"])
        if not region.any():
            return None
        region = _grow(region, _recurring(x_group, ctx["x_ref"]))
        fit_masks = np.broadcast_to(region, mf.shape)
    else:
        region = None
        fit_masks = _blob_regions(mf, cfg["threshold"])
    rule = {"class": ctx["c"], "layer": ctx["layer"], "units": list(ctx["units"]),
            "weights": list(ctx["weights"]), "mode": mode, "threshold": cfg["threshold"],
            "resolution": cfg["resolution"],
            "region": None if region is None else region.tolist(),
            "median_mass": float(np.median(_mass_share(mf, fit_masks)))}
    if pattern is not None:
        rule.update(pattern, min_ncc=MIN_NCC)
        fit_present = fit_ncc >= MIN_NCC
    else:
        fit_present = _mass_share(mf, fit_masks) >= 0.5 * rule["median_mass"]
    return rule, fit_masks, fit_present


def _test_candidate(rule: dict, fit_masks: np.ndarray, fit_present: np.ndarray, group: dict,
                    ctx: dict) -> dict | None:
    """One candidate's row before its verdict: its region on the group's held-out images, the
    content consistency on the fit images, the causal tests on the held-out images the model
    predicts as the class; None when no such image holds the region."""
    cfg, c, hidx, pool_x = ctx["cfg"], ctx["c"], group["hidx"], ctx["pool_x"]
    masks, present = _apply_rule(rule, group["maps_held"], pool_x[torch.as_tensor(hidx)])
    use = present & (ctx["pool_pred"][torch.as_tensor(hidx, dtype=torch.long)].numpy() == c)
    if use.sum() == 0:
        return None
    moves = rule["mode"] in MOVING
    # a region at one place is compared at that place; one that moves, with itself wherever it is
    recurs = aligned_consistency if moves else content_consistency
    consistency = recurs(group["x_fit"][fit_present], np.asarray(fit_masks)[fit_present],
                         ctx["train_x"], ctx["rng"])
    xs = pool_x[torch.as_tensor(hidx[use])]
    tests = causal_tests(ctx["model"], c, xs, masks[use], ctx["x_tgt"], fill=cfg["fill"],
                         seed=int(ctx["rng"].integers(2**31)), batch_size=cfg["batch_size"],
                         same_place="elsewhere" if rule["mode"] == "pooled" else moves)
    pm = masks[present]
    share = float(pm.reshape(len(pm), -1).mean(1).mean()) if len(pm) else 0.0
    comps = float(np.median([_components(q) for q in pm])) if len(pm) else 0.0
    row = {"kind": "candidate", "class": ctx["name"], "class_index": c, "group": group["name"],
           "source": "experts' maps", "mode": rule["mode"], "layer": ctx["layer"],
           "units": [int(u) for u in ctx["units"]], "n_images": int(use.sum()),
           "n_fit": group["n_fit"], "n_present": int(present.sum()),
           "share_of_image": share, "components": comps,
           "consistency": consistency, **tests}
    row["p_value"] = max(row["necessity_p"], row["sufficiency_p"])
    if row["necessity"] is None or row["sufficiency"] is None:
        row["necessity"] = row["necessity"] or 0.0
        row["sufficiency"] = row["sufficiency"] or 0.0
        row["control_necessity"] = row["control_necessity"] or 0.0
        row["control_sufficiency"] = row["control_sufficiency"] or 0.0
    row["_rule"] = rule
    # pool indices: < n_test are test rows, the rest training rows
    row["_heldout"] = {"index": hidx[present], "masks": masks[present], "n_test": ctx["n_test"]}
    return row


# ----------------------------------------------------------------------------------- masks

def public_row(row: dict) -> dict:
    """A candidate or note without its private fields (plain JSON)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def region_masks(model: nn.Module, x: Tensor, candidate: dict, *,
                 batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A candidate's region on new images ``x`` (N, C, H, W): (masks (N, H, W) bool, present (N,)
    bool). Applies its rule (:func:`discover`'s ``"_rule"``) to the images' expert maps; a region is
    present where it holds at least half the group's median share of the map's mass."""
    rule = candidate["_rule"]
    if len(x) == 0:
        h, w = x.shape[-2:]
        return np.zeros((0, h, w), bool), np.zeros(0, bool)
    if rule["mode"] == "pattern":
        return _apply_rule(rule, None, x.detach().cpu().float())
    maps = expert_maps(model, x, rule["layer"], rule["class"], rule["units"], rule["weights"],
                       resolution=rule["resolution"], batch_size=batch_size)
    return _apply_rule(rule, maps, x.detach().cpu().float())


def write_masks(out_dir: str | Path, masks: np.ndarray, present: np.ndarray,
                relpaths: list[str]) -> int:
    """Write PNG masks (255 = region) under ``out_dir`` at ``relpaths`` (one per image, with the
    image's extension replaced by ``.png``) for every image where ``present``; a missing file means
    no region there. Returns the number of files written."""
    from PIL import Image

    out_dir = Path(out_dir)
    n = 0
    for mask, here, rel in zip(masks, present, relpaths, strict=True):
        if not here or not mask.any():
            continue
        path = out_dir / Path(rel).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(path)
        n += 1
    return n
