"""Adversarial patches and their detection from influence alone (generic: any case can run it).

The attacker (white box): knows the classifier's weights and gradients, places a small square patch
at a random place in each image and optimises its pixels by projected sign-gradient steps (PGD)
towards a target class, pixels clipped to the valid input range. It does not know the detector
(except in :func:`adaptive_penalty`'s attack, which also pushes the influence profile toward the
class's own).

Detectors score an input (higher = more likely attacked); all are fit on clean *training* images
(and, for the combined influence detector, on attacks made on training images), never on the
split they are reported on:

- ``influence_naive``: cosine distance of the input's gradient × activation at one layer (quantity:
  its predicted class against the rest) to the predicted class's mean over clean training images.
- ``influence_max_z``: the largest z-scored influence feature, with no attacks needed to fit. The
  features, per layer: the cosine distance above for point influence and for distributional
  influence (a linear path at the slice, i.e. Integrated Gradients in attribution space), and the
  Mahalanobis distance of the per-unit attributions (a channel's map summed) to the predicted
  class's distribution over clean training images, for both.
- ``expert_concentration``: the top experts (units) of a layer for the predicted class are
  interpreted on the input (gradient × input of their summed activation over a linear path); the
  score is the largest share of that interpretation inside any ``window``×``window`` square.
- ``influence_combined``: a logistic regression over all the influence features (several layers,
  point and path, profile and unit distributions, concentration), fit on clean vs attacked
  *training* images.
- baselines that use no influence: ``max_softmax`` (1 − the largest softmax probability) and
  ``mahalanobis`` (class-conditional Gaussians with a shared, shrunk covariance on the same layer's
  activations; the distance to the predicted class), and ``mahalanobis_layers`` (the largest
  z-scored Mahalanobis distance over every layer's channel-pooled activations: a stronger one).

``mask_experts_region`` masks the square the experts point at and reports how often the prediction
returns to the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.engine.devices import eval_mode, model_device
from core.engine.distributions import LinearDoI, PointDoI
from core.engine.influence import activations, get_layer, influence, model_lock
from core.engine.quantities import ClassQoI, ComparativeQoI
from core.stages.base import Stage, StageContext

STAGE = Stage("detection", reads=("data", "models"), sections=("detection", "experts"),
              inputs=("seeds", "roles", "device"),
              quick={"steps": 20, "n_fit": 64, "n_attack_fit": 32, "n_eval": 128, "resolution": 4,
                     "adaptive": False})

__all__ = [
    "InfluenceFeatures",
    "adaptive_penalty",
    "build",
    "check_config",
    "expert_maps",
    "mahalanobis_scores",
    "mask_experts_region",
    "max_softmax_scores",
    "patch_attack",
    "roc",
    "window_concentration",
]

FPR_POINTS = (0.01, 0.05, 0.25)


# ----------------------------------------------------------------------------------------------
# The attack


def _bounds(bounds, x: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = bounds
    lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    if lo.dim() == 1:  # per channel
        lo, hi = lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)
    return lo, hi


def patch_masks(n: int, size: int, image: tuple[int, int], seed: int = 0) -> Tensor:
    """(n, 1, H, W) bool masks of a ``size``×``size`` square at a random place per image (seeded)."""
    h, w = image
    if not 1 <= size <= min(h, w):
        raise ValueError(f"patch size {size} does not fit a {h}×{w} image")
    g = torch.Generator().manual_seed(int(seed))
    rows = torch.randint(0, h - size + 1, (n,), generator=g)
    cols = torch.randint(0, w - size + 1, (n,), generator=g)
    r = torch.arange(h).view(1, h, 1)
    c = torch.arange(w).view(1, 1, w)
    m = ((r >= rows.view(-1, 1, 1)) & (r < rows.view(-1, 1, 1) + size)
         & (c >= cols.view(-1, 1, 1)) & (c < cols.view(-1, 1, 1) + size))
    return m[:, None]


def patch_attack(model: nn.Module, x: Tensor, target: Tensor, *, size: int = 12, steps: int = 80,
                 step_size: float | None = None, seed: int = 0, bounds=(0.0, 1.0),
                 penalty: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
                 penalty_weight: float = 1.0, batch_size: int = 256,
                 stats: dict | None = None) -> tuple[Tensor, Tensor]:
    """Targeted adversarial patches by projected sign-gradient descent.

    Each image gets a ``size``×``size`` square at a random place (seeded by ``seed``); the pixels
    inside start uniform at random in ``bounds`` and take ``steps`` steps of
    ``−step_size · sign(∇ loss)``, then are clipped to ``bounds`` (``(lo, hi)`` scalars or
    per-channel sequences in the model's input scale). The loss is the cross-entropy towards
    ``target`` (N,) plus ``penalty_weight · penalty(model, x_adv, target)`` (a per-image tensor;
    used by the adaptive attack). Pixels outside the patch never change. ``step_size`` defaults to
    1/16 of the range. The model runs in eval mode; its parameters get no gradients.

    An image's step is a deterministic function of its own patch alone, so once a patch repeats
    the one of one or two steps before (sign steps pinned at the bounds, or flipping back and
    forth), every later step repeats that cycle: the image leaves the batch and its patch after
    ``steps`` steps is read off the cycle (the same patch the full run gives; batches are refilled
    with images still moving). ``stats``, when given, receives ``{"image_steps": evaluated,
    "full": N · steps}``.

    Returns ``(x_adv, patch_mask)``: (N, C, H, W) attacked images (on the CPU) and (N, 1, H, W)
    bool masks of the patch.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    dev = model_device(model)
    x = x.detach().to(dev)
    target = torch.as_tensor(target).long().to(dev)
    lo, hi = _bounds(bounds, x)
    if step_size is None:
        step_size = float((hi - lo).max()) / 16
    masks = patch_masks(len(x), size, tuple(x.shape[-2:]), seed).to(dev)
    g = torch.Generator().manual_seed(int(seed) + 1)
    noise = torch.rand(x.shape, generator=g).to(dev, x.dtype)
    patch = (lo + noise * (hi - lo)).expand_as(x).clone()
    params = [p for p in model.parameters() if p.requires_grad]
    with model_lock(model), eval_mode(model):
        try:
            for p in params:
                p.requires_grad_(False)
            evaluated = _pgd_steps(model, x, masks, target, patch, lo, hi, float(step_size),
                                   steps, penalty, penalty_weight, batch_size)
        finally:
            for p in params:
                p.requires_grad_(True)
    if stats is not None:
        stats.update(image_steps=evaluated, full=len(x) * steps)
    x_adv = torch.where(masks.expand_as(x), patch, x).cpu()
    return x_adv, masks.cpu()


def _pgd_steps(model: nn.Module, x: Tensor, masks: Tensor, target: Tensor, patch: Tensor,
               lo: Tensor, hi: Tensor, step_size: float, steps: int, penalty, penalty_weight: float,
               batch_size: int) -> int:
    """:func:`patch_attack`'s steps, in place on ``patch`` (N, C, H, W): every image's patch
    after ``steps`` steps. Runs the images still moving in batches of ``batch_size``; an image
    whose patch equals the one of one step before (a fixed point) or two steps before (a cycle
    of two) leaves with the patch that cycle has after ``steps`` steps. Returns the number of
    (image, step) pairs evaluated."""
    n = len(x)
    done_steps = torch.zeros(n, dtype=torch.long, device=x.device)
    prev = patch.clone()  # each image's patch one step before its current one
    todo = torch.arange(n, device=x.device) if steps > 0 else torch.zeros(0, dtype=torch.long)
    evaluated = 0
    while len(todo):
        idx = todo[:batch_size]
        xb, tb, m = x[idx], target[idx], masks[idx].expand(len(idx), *x.shape[1:])
        cur = patch[idx].requires_grad_(True)
        adv = torch.where(m, cur, xb)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adv), tb, reduction="sum")
            if penalty is not None:
                loss = loss + penalty_weight * penalty(model, adv, tb).sum()
            (grad,) = torch.autograd.grad(loss, cur)
        cur = cur.detach()
        new = torch.maximum(torch.minimum(cur - step_size * grad.sign(), hi), lo)
        evaluated += len(idx)
        t = done_steps[idx] + 1
        done_steps[idx] = t
        fixed = (new == cur).flatten(1).all(1)
        flip = ~fixed & (new == prev[idx]).flatten(1).all(1)
        left = steps - t
        # a cycle of two from here: the patch after `steps` is `new` when an even number of
        # steps is left, else `cur`
        final = torch.where((flip & (left % 2 == 1)).view(-1, *([1] * (x.dim() - 1))), cur, new)
        prev[idx] = cur
        patch[idx] = final
        finished = (left == 0) | fixed | flip
        if finished.any():
            keep = torch.ones(len(todo), dtype=torch.bool, device=x.device)
            keep[:len(idx)] = ~finished
            todo = todo[keep]
        # the images that go on keep their current patch `new` (final == new for them)
    return evaluated


def adaptive_penalty(model: nn.Module, layer: str, means: Tensor) -> Callable:
    """A penalty for :func:`patch_attack` that pushes the input's gradient × activation profile
    at ``layer`` (quantity: the target class against the rest) toward that class's mean profile
    ``means`` (classes, features) over clean training images: 1 − cosine similarity, per image.
    Differentiable (double back-propagation)."""
    module = get_layer(model, layer)

    def penalty(model_: nn.Module, adv: Tensor, target: Tensor) -> Tensor:
        store = {}
        handle = module.register_forward_hook(lambda m, a, out: store.__setitem__("z", out))
        try:
            logits = model_(adv)
        finally:
            handle.remove()
        z = store["z"]
        q = _contrast(logits, target).sum()
        (g,) = torch.autograd.grad(q, z, create_graph=True)
        prof = (g * z).flatten(1)
        ref = means.to(prof.device)[target]
        return 1 - F.cosine_similarity(prof, ref, dim=1)

    return penalty


def _contrast(logits: Tensor, cls: Tensor) -> Tensor:
    """y_c − max_{j≠c} y_j per row (for two classes: y_c − y_other)."""
    own = logits.gather(1, cls.view(-1, 1))[:, 0]
    other = logits.scatter(1, cls.view(-1, 1), float("-inf")).max(1).values
    return own - other


# ----------------------------------------------------------------------------------------------
# ROC


def roc(scores_clean, scores_attacked) -> dict:
    """ROC of a detector whose score is higher for attacked inputs.

    Returns ``{"fpr": [...], "tpr": [...], "auc": float, "tpr_at": {0.01: t, 0.05: t, 0.25: t},
    "n_clean", "n_attacked"}``: the curve over every threshold (from (0, 0) to (1, 1)), the area
    under it (ties count half), and at each FPR budget the largest TPR whose FPR does not exceed it.
    """
    c = np.asarray(torch.as_tensor(scores_clean).detach().cpu(), dtype=np.float64).ravel()
    a = np.asarray(torch.as_tensor(scores_attacked).detach().cpu(), dtype=np.float64).ravel()
    if len(c) == 0 or len(a) == 0:
        raise ValueError("roc needs at least one clean and one attacked score")
    if not (np.isfinite(c).all() and np.isfinite(a).all()):
        raise ValueError("roc scores must be finite")
    thresholds = np.unique(np.concatenate([c, a]))[::-1]
    fpr = [0.0] + [float((c >= t).mean()) for t in thresholds]
    tpr = [0.0] + [float((a >= t).mean()) for t in thresholds]
    auc = float(((a[:, None] > c[None, :]) + 0.5 * (a[:, None] == c[None, :])).mean())
    tpr_at = {}
    for budget in FPR_POINTS:
        ok = [t for f, t in zip(fpr, tpr, strict=True) if f <= budget + 1e-12]
        tpr_at[budget] = max(ok)
    return {"fpr": fpr, "tpr": tpr, "auc": auc, "tpr_at": tpr_at, "n_clean": int(len(c)),
            "n_attacked": int(len(a))}


# ----------------------------------------------------------------------------------------------
# Baselines


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    dev = model_device(model)
    with eval_mode(model):
        return torch.cat([model(x[i:i + batch_size].to(dev)).cpu()
                          for i in range(0, len(x), batch_size)])


def max_softmax_scores(model: nn.Module, x: Tensor) -> Tensor:
    """1 − max softmax probability per input (Hendrycks & Gimpel 2017): (N,), higher = odder."""
    return 1 - _logits(model, x).softmax(1).max(1).values


def _activations(model: nn.Module, x: Tensor, layer: str, pool: bool = False) -> Tensor:
    a = activations(model, x, layer)
    if pool and a.dim() > 2:
        a = a.flatten(2).mean(2)
    return a.flatten(1).cpu().double()


class Gaussian:
    """Class-conditional Gaussians with one shared covariance, shrunk toward its diagonal by
    ``shrink`` (Lee et al. 2018), fit on features ``a`` (N, F) with classes ``y``; ``distance(a,
    cls)`` is the squared Mahalanobis distance of each row to its class's mean."""

    def __init__(self, a: Tensor, y: Tensor, n_classes: int, shrink: float = 0.1):
        a = a.double()
        self.means = torch.stack([a[y == c].mean(0) if (y == c).any() else a.mean(0)
                                  for c in range(n_classes)])
        centred = a - self.means[y]
        cov = centred.T @ centred / max(len(a) - 1, 1)
        diag = torch.diag(torch.diag(cov))
        cov = (1 - shrink) * cov + shrink * diag \
            + 1e-6 * float(torch.diag(cov).mean()) * torch.eye(len(cov), dtype=cov.dtype)
        self.precision = torch.linalg.pinv(cov)

    def distance(self, a: Tensor, cls: Tensor) -> Tensor:
        d = a.double() - self.means[cls]
        return ((d @ self.precision) * d).sum(1).float()


class Mahalanobis:
    """The Mahalanobis baseline on a layer's flattened activations (a :class:`Gaussian` fit on
    clean images); ``score`` is the squared distance to the predicted class's mean. ``pool=True``
    averages a conv layer's activations over space first (one value per channel)."""

    def __init__(self, model: nn.Module, layer: str, x: Tensor, y: Tensor, shrink: float = 0.1,
                 pool: bool = False):
        self.model, self.layer, self.pool = model, layer, pool
        a = _activations(model, x, layer, pool)
        self.gauss = Gaussian(a, y, int(max(int(y.max()) + 1, _logits(model, x[:1]).shape[1])),
                              shrink)

    def score(self, x: Tensor) -> Tensor:
        """(N,) squared distance to the predicted class's mean."""
        a = _activations(self.model, x, self.layer, self.pool)
        return self.gauss.distance(a, _logits(self.model, x).argmax(1))


def mahalanobis_scores(model: nn.Module, layer: str, fit_x: Tensor, fit_y: Tensor, x: Tensor,
                       shrink: float = 0.1) -> Tensor:
    """Mahalanobis baseline: fit on clean ``(fit_x, fit_y)``, score ``x``: (N,), higher = odder."""
    return Mahalanobis(model, layer, fit_x, fit_y, shrink).score(x)


# ----------------------------------------------------------------------------------------------
# Influence features


def _quantity(n_classes: int, c: int):
    """The predicted class's quantity: y_c − y_other for two classes, y_c otherwise."""
    return ComparativeQoI(c, 1 - c) if n_classes == 2 else ClassQoI(c)


def _per_class_influence(model: nn.Module, x: Tensor, pred: Tensor, layer: str | None, doi,
                         n_classes: int, multiply: bool = True) -> Tensor:
    """Per-input attribution (influence × activation) at ``layer`` for each input's own predicted
    class: (N, *slice shape)."""
    out = None
    for c in pred.unique().tolist():
        idx = (pred == c).nonzero().flatten()
        per = influence(model, x[idx], layer, _quantity(n_classes, c), doi, per_input=True,
                        multiply=multiply).detach().cpu()
        if out is None:
            out = torch.zeros(len(x), *per.shape[1:], dtype=per.dtype)
        out[idx] = per
    return out


def _per_class_point(model: nn.Module, x: Tensor, pred: Tensor, layers: Sequence[str],
                     n_classes: int) -> dict[str, Tensor]:
    """``{layer: (N, *slice shape)}``: each input's gradient × activation at every layer of
    ``layers`` for its own predicted class (as :func:`_per_class_influence` with a point DoI),
    every layer from one forward and one backward pass per class and chunk."""
    names = list(dict.fromkeys(layers))
    out: dict[str, Tensor] = {}
    for c in pred.unique().tolist():
        idx = (pred == c).nonzero().flatten()
        per = influence(model, x[idx], layers=names, qoi=_quantity(n_classes, c), doi=PointDoI(),
                        per_input=True, multiply=True)
        for name in names:
            t = per[name].detach().cpu()
            if name not in out:
                out[name] = torch.zeros(len(x), *t.shape[1:], dtype=t.dtype)
            out[name][idx] = t
    return out


def expert_maps(model: nn.Module, x: Tensor, layer: str, pred: Tensor, *, k: int = 5,
                resolution: int = 8, n_classes: int | None = None,
                per: Tensor | None = None) -> Tensor:
    """The interpretation of each input's own top-``k`` experts of ``layer``: (N, H, W).

    The experts are the units (channels, or neurons of a flat layer) with the largest gradient ×
    activation for the input's predicted class ``pred``; their summed activation (channels
    summed over space) is attributed to the input over a linear path from zeros (``resolution``
    midpoints), times the input, summed over channels: Integrated Gradients of the experts.
    ``per``: that gradient × activation (N, *slice shape) when the caller already has it.
    """
    n_classes = n_classes or int(_logits(model, x[:1]).shape[1])
    dev = model_device(model)
    if per is None:
        per = _per_class_influence(model, x, pred, layer, PointDoI(), n_classes)  # (N, F)
    module = get_layer(model, layer)
    store: dict = {}
    maps = []
    with model_lock(model), eval_mode(model):
        handle = module.register_forward_hook(lambda m, a, o: store.__setitem__("z", o))
        try:
            for i in range(0, len(x), 128):
                xb = x[i:i + 128].to(dev)
                grads = torch.zeros_like(xb)
                for r in range(resolution):
                    pt = ((r + 0.5) / resolution * xb).requires_grad_(True)
                    with torch.enable_grad():
                        model(pt)
                        z = store.pop("z")
                        units = per[i:i + 128].reshape(len(xb), z.shape[1], -1).sum(2)
                        top = units.topk(min(k, z.shape[1]), dim=1).indices.to(dev)
                        sel = z.flatten(2).sum(2) if z.dim() > 2 else z
                        (g,) = torch.autograd.grad(sel.gather(1, top).sum(), pt)
                    grads += g
                maps.append((grads / resolution * xb).sum(1).detach().cpu())
        finally:
            handle.remove()
    return torch.cat(maps)


def window_concentration(maps: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Largest share of a map's positive mass inside any ``window``×``window`` square.

    Returns ``(share (N,), corner (N, 2))``: the share in [0, 1] (0 for an all-nonpositive map)
    and that square's top-left (row, column).
    """
    pos = torch.relu(maps.float())[:, None]
    sums = F.avg_pool2d(pos, window, stride=1) * window * window  # (N, 1, H−w+1, W−w+1)
    best = sums.flatten(1).max(1)
    total = pos.flatten(1).sum(1)
    share = torch.where(total > 0, best.values / total.clamp_min(1e-30), 0.0)
    width = sums.shape[-1]
    corner = torch.stack((best.indices // width, best.indices % width), 1)
    return share.clamp(0, 1), corner


def _units(per: Tensor) -> Tensor:
    """(N, C, ...) → (N, C): each unit's attribution (a channel's map summed)."""
    return per.flatten(2).sum(2) if per.dim() > 2 else per


def _cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    return 1 - F.cosine_similarity(a.double(), b.double(), dim=1).float()


class InfluenceFeatures:
    """Influence features of inputs relative to clean training images of their predicted class.

    ``fit(x, y)`` stores, per layer, each class's mean point profile (gradient × activation) and
    mean path profile (Integrated Gradients at the slice), a :class:`Gaussian` of each profile's
    unit scores (a channel's map summed), plus each feature's clean mean and spread (for z-scores).
    ``features(x)`` returns ``(features (N, F), names)``: per layer and profile the cosine distance
    to the class mean (``point:``/``path:``) and the Mahalanobis distance of the unit scores to the
    class's distribution over clean images (``units-point:``/``units-path:``), then the experts'
    concentration at ``expert_layer``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, expert_layer: str | None = None,
                 k: int = 5, resolution: int = 8, window: int = 12, n_classes: int | None = None):
        self.model, self.layers = model, list(layers)
        self.expert_layer = expert_layer or self.layers[-1]
        self.k, self.resolution, self.window = k, resolution, window
        self.n_classes = n_classes
        self.means: dict[tuple[str, str], Tensor] = {}
        self.gauss: dict[tuple[str, str], Gaussian] = {}
        self.shrink = 0.1
        self.mu = self.sd = None

    def _profiles(self, x: Tensor, pred: Tensor) -> dict:
        out = {}
        point = _per_class_point(self.model, x, pred, self.layers, self.n_classes)
        for layer in self.layers:
            out[(layer, "point")] = point[layer]
            out[(layer, "path")] = _per_class_influence(
                self.model, x, pred, layer, LinearDoI(self.resolution, at="layer"), self.n_classes)
        return out

    def fit(self, x: Tensor, y: Tensor | None = None) -> InfluenceFeatures:
        """Fit on clean images ``x`` (their predicted classes define the class means)."""
        logits = _logits(self.model, x)
        self.n_classes = self.n_classes or int(logits.shape[1])
        pred = logits.argmax(1)
        profiles = self._profiles(x, pred)
        for key, prof in profiles.items():
            flat = prof.flatten(1)
            self.means[key] = torch.stack([flat[pred == c].mean(0) if (pred == c).any()
                                           else flat.mean(0) for c in range(self.n_classes)])
            self.gauss[key] = Gaussian(_units(prof), pred, self.n_classes, self.shrink)
        feats, _, _ = self._features(x, pred, profiles)
        self.mu, self.sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
        return self

    def _features(self, x: Tensor, pred: Tensor,
                  profiles: dict) -> tuple[Tensor, list[str], Tensor]:
        cols, names = [], []
        for (layer, kind), prof in profiles.items():
            cols.append(_cosine_distance(prof.flatten(1), self.means[(layer, kind)][pred]))
            names.append(f"{kind}:{layer}")
            cols.append(self.gauss[(layer, kind)].distance(_units(prof), pred))
            names.append(f"units-{kind}:{layer}")
        maps = expert_maps(self.model, x, self.expert_layer, pred, k=self.k,
                           resolution=self.resolution, n_classes=self.n_classes,
                           per=profiles.get((self.expert_layer, "point")))
        share, _ = window_concentration(maps, self.window)
        cols.append(share)
        names.append(f"concentration:{self.expert_layer}")
        return torch.stack(cols, 1), names, maps

    def features(self, x: Tensor, return_maps: bool = False):
        """``(features (N, F), names)``: the raw features and their names (see the class
        docstring); with ``return_maps`` also the experts' maps (N, H, W) the concentration
        feature reads (:func:`expert_maps` of the predicted classes)."""
        if self.mu is None:
            raise ValueError("call fit(clean_images) first")
        pred = _logits(self.model, x).argmax(1)
        feats, names, maps = self._features(x, pred, self._profiles(x, pred))
        return (feats, names, maps) if return_maps else (feats, names)

    def zscores(self, feats: Tensor) -> Tensor:
        """Features standardised by their clean training mean and spread."""
        return (feats - self.mu) / self.sd


def fit_logistic(pos: Tensor, neg: Tensor, l2: float = 1e-2, steps: int = 200) -> tuple[Tensor, float]:
    """A logistic regression (L2-penalised, LBFGS) separating ``pos`` (N, F) from ``neg`` (M, F),
    classes weighted equally. Returns ``(weights (F,), bias)``; score = x @ w + b."""
    x = torch.cat([pos, neg]).double()
    t = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    wt = torch.cat([torch.full((len(pos),), 0.5 / len(pos)), torch.full((len(neg),), 0.5 / len(neg))])
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (wt * F.binary_cross_entropy_with_logits(x @ w + b, t, reduction="none")).sum() \
            + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), float(b.detach())


# ----------------------------------------------------------------------------------------------
# Masking the experts' region


def mask_experts_region(model: nn.Module, x: Tensor, y: Tensor, layer: str, *, k: int = 5,
                        resolution: int = 8, window: int = 12, fill: float = 0.0,
                        maps: Tensor | None = None) -> dict:
    """Mask the ``window``×``window`` square where each input's own top experts' interpretation
    concentrates (see :func:`expert_maps`), filled with ``fill`` in the model's input scale.
    ``maps``: those interpretations (N, H, W) for the predicted classes when the caller already
    has them (e.g. from :meth:`InfluenceFeatures.features` with the same ``k`` and resolution).

    Returns ``{"recovered": share of inputs whose prediction equals ``y`` after masking,
    "before": share equal to ``y`` before, "pred": (N,) predictions after, "mask": (N, 1, H, W)}``.
    """
    pred = _logits(model, x).argmax(1)
    if maps is None:
        maps = expert_maps(model, x, layer, pred, k=k, resolution=resolution)
    _, corner = window_concentration(maps, window)
    h, w = x.shape[-2:]
    r = torch.arange(h).view(1, h, 1)
    c = torch.arange(w).view(1, 1, w)
    r0, c0 = corner[:, 0].view(-1, 1, 1), corner[:, 1].view(-1, 1, 1)
    mask = ((r >= r0) & (r < r0 + window) & (c >= c0) & (c < c0 + window))[:, None]
    masked = torch.where(mask.expand_as(x), torch.tensor(fill, dtype=x.dtype), x)
    after = _logits(model, masked).argmax(1)
    return {"recovered": float((after == y).float().mean()), "before": float((pred == y).float().mean()),
            "pred": after, "mask": mask}


# ----------------------------------------------------------------------------------------------
# The stage

DEFAULTS: dict = {
    "model": None,          # the model attacked and guarded; None: the study's subject
    "train_set": "train",   # training set (data.training_sets) the detectors are fit on
    "eval_set": "test",     # held-out set the figures use: "test", "val" or an evaluation set
    "layers": None,         # influence layers; None: [experts] layers
    "layer": None,          # the baselines' and the naive profile's layer; None: the last of layers
    "expert_layer": None,   # whose experts' interpretation is measured/masked; None: layer
    "patch_size": None,     # side of the square patch in pixels; None: a quarter of the image side
    "steps": 80,            # PGD steps
    "step_size": None,      # per step in the input scale; None: 1/16 of the input range
    "n_fit": 200,           # clean training images for the class profiles and Mahalanobis
    "n_attack_fit": 100,    # training images attacked to fit the combined detector
    "n_eval": None,         # held-out images used (None: all)
    "resolution": 8,        # points of the path (distributional influence, expert interpretation)
    "k": 5,                 # experts per input
    "window": None,         # concentration window side; None: patch_size
    "shrink": 0.1,          # Mahalanobis covariance shrinkage toward its diagonal
    "adaptive": True,       # also run one adaptive attack (pushes the influence profile too)
    "adaptive_weight": 1.0,
    "n_examples": 8,        # attacked held-out images kept for figures
    "seed": 0,
}


def _int(cfg, key, where, low, high, none=False):
    v = cfg[key]
    if none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ValueError(f"{where}: {key} must be an integer in [{low}, {high}]"
                         f"{' or absent' if none else ''}, got {v!r}")


def check_config(section: dict | None, where: str = "[detection]") -> dict:
    """The ``[detection]`` table with defaults (see ``DEFAULTS``); a bad key or value raises a
    one-line ``ValueError`` starting with ``where``. Returns a new plain dict."""
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a table, got {type(section).__name__}")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **section}
    for key in ("model", "layer", "expert_layer"):
        if cfg[key] is not None and (not isinstance(cfg[key], str) or not cfg[key]):
            raise ValueError(f"{where}: {key} must be a non-empty string, got {cfg[key]!r}")
    for key in ("train_set", "eval_set"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise ValueError(f"{where}: {key} must be a non-empty string, got {cfg[key]!r}")
    layers = cfg["layers"]
    if layers is not None and (not isinstance(layers, list | tuple) or not layers
                               or not all(isinstance(v, str) and v for v in layers)):
        raise ValueError(f"{where}: layers must be a non-empty list of layer names, got {layers!r}")
    cfg["layers"] = None if layers is None else list(layers)
    _int(cfg, "patch_size", where, 1, 4096, none=True)
    _int(cfg, "window", where, 1, 4096, none=True)
    _int(cfg, "steps", where, 0, 10_000)
    _int(cfg, "n_fit", where, 2, 100_000)
    _int(cfg, "n_attack_fit", where, 2, 100_000)
    _int(cfg, "n_eval", where, 2, 100_000, none=True)
    _int(cfg, "resolution", where, 1, 1000)
    _int(cfg, "k", where, 1, 100_000)
    _int(cfg, "n_examples", where, 0, 1000)
    _int(cfg, "seed", where, 0, 2**31 - 1)
    for key, low, high in (("shrink", 0.0, 1.0), ("adaptive_weight", 0.0, 1e6)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
            raise ValueError(f"{where}: {key} must be a number in [{low}, {high}], got {v!r}")
        cfg[key] = float(v)
    v = cfg["step_size"]
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not v > 0):
        raise ValueError(f"{where}: step_size must be a positive number or absent, got {v!r}")
    if not isinstance(cfg["adaptive"], bool):
        raise ValueError(f"{where}: adaptive must be true or false, got {cfg['adaptive']!r}")
    return cfg


def input_bounds(data) -> tuple:
    """The valid input range in the model's scale: [0, 1] mapped through the case's mean/std
    (per channel), or (0, 1) when the case has no normalisation."""
    c = data.channels
    mean = data.mean if data.mean is not None else (0.0,) * c
    std = data.std if data.std is not None else (1.0,) * c
    lo = [(0 - m) / s for m, s in zip(mean, std, strict=True)]
    hi = [(1 - m) / s for m, s in zip(mean, std, strict=True)]
    return lo, hi


def _eval_split(data, name: str):
    if name in data.evaluation_sets:
        return data.evaluation_sets[name]
    if name in ("test", "val"):
        return getattr(data, name)
    raise ValueError(f"[detection]: eval_set {name!r} is not an evaluation set "
                     f"({', '.join(data.evaluation_sets)}) nor test/val")


def _targets(y: Tensor, n_classes: int, seed: int) -> Tensor:
    """A class other than ``y`` per image (the other class when there are two), seeded."""
    g = torch.Generator().manual_seed(int(seed))
    shift = torch.randint(1, n_classes, (len(y),), generator=g)
    return (y + shift) % n_classes


def _row(name: str, r: dict, uses_influence: bool, layer: str | None, what: str) -> dict:
    return {"detector": name, "uses_influence": uses_influence, "layer": layer, "what": what,
            "auc": r["auc"], "tpr_at_1": r["tpr_at"][0.01], "tpr_at_5": r["tpr_at"][0.05],
            "tpr_at_25": r["tpr_at"][0.25], "n_clean": r["n_clean"], "n_attacked": r["n_attacked"]}


class Detectors:
    """Every detector of this module fit on one model and clean training images (plus attacks
    on training images for the combined one); ``scores(x)`` gives each detector's (N,) scores."""

    def __init__(self, model: nn.Module, layers: Sequence[str], layer: str, expert_layer: str, *,
                 k: int = 5, resolution: int = 8, window: int = 12, shrink: float = 0.1):
        self.model, self.layer = model, layer
        self.features = InfluenceFeatures(model, layers, expert_layer=expert_layer, k=k,
                                          resolution=resolution, window=window)
        self.shrink = self.features.shrink = shrink
        self.mahalanobis = None
        self.w = self.b = None

    def fit(self, clean_x: Tensor, clean_y: Tensor, lr_clean: Tensor, lr_attacked: Tensor,
            progress: Callable[[str], None] | None = None) -> Detectors:
        """Profiles and Mahalanobis from ``clean_x``; the combined detector's logistic regression
        from features of other clean images ``lr_clean`` vs attacked ``lr_attacked``."""
        note = progress or (lambda msg: None)
        note("class profiles on clean training images")
        self.features.fit(clean_x)
        self.mahalanobis = Mahalanobis(self.model, self.layer, clean_x, clean_y, self.shrink)
        self.pooled = {name: Mahalanobis(self.model, name, clean_x, clean_y, self.shrink, pool=True)
                       for name in self.features.layers}
        d = torch.stack([m.score(clean_x) for m in self.pooled.values()], 1)
        self.pooled_mu, self.pooled_sd = d.mean(0), d.std(0).clamp_min(1e-6)
        note("features of training attacks")
        fc, self.names = self.features.features(lr_clean)
        fa, _ = self.features.features(lr_attacked)
        self.w, self.b = fit_logistic(self.features.zscores(fa), self.features.zscores(fc))
        return self

    def scores(self, x: Tensor) -> dict[str, Tensor]:
        """{detector: (N,) scores, higher = more likely attacked}, the raw ``features`` and the
        ``expert_maps`` (N, H, W) the concentration feature read."""
        feats, names, maps = self.features.features(x, return_maps=True)
        z = self.features.zscores(feats)
        naive = names.index(f"point:{self.layer}")
        return {"influence_combined": z @ self.w + self.b,
                "influence_naive": feats[:, naive],
                "influence_max_z": z.max(1).values,
                "expert_concentration": feats[:, -1],
                "max_softmax": max_softmax_scores(self.model, x),
                "mahalanobis": self.mahalanobis.score(x),
                "mahalanobis_layers": ((torch.stack([m.score(x) for m in self.pooled.values()], 1)
                                        - self.pooled_mu) / self.pooled_sd).max(1).values,
                "features": feats, "expert_maps": maps}


DESCRIPTIONS = {
    "influence_combined": "logistic regression (fit on training attacks) over point and path "
                          "influence-profile and unit-distribution distances at every layer and "
                          "the experts' concentration",
    "influence_max_z": "largest z-scored influence feature (no attacks needed to fit)",
    "influence_naive": "cosine distance of gradient × activation to the predicted class's mean",
    "expert_concentration": "largest share of the top experts' interpretation in one window",
    "max_softmax": "1 − max softmax probability (no influence)",
    "mahalanobis": "Mahalanobis distance of the layer's activations to the predicted class "
                   "(no influence)",
    "mahalanobis_layers": "largest z-scored Mahalanobis distance over every layer's "
                          "channel-pooled activations (no influence; a stronger baseline)",
}
INFLUENCE = {"influence_combined", "influence_max_z", "influence_naive", "expert_concentration"}


def _detection_layers(cfg: dict, ctx: StageContext, model: nn.Module) -> tuple[list[str], str, str]:
    """``(layers, layer, expert_layer)``: the slices the profile features read (default the
    experts layers), the one the single-layer detectors read (default the last of them) and the
    one whose experts are interpreted (default ``layer``); each must be a layer of ``model``."""
    layers = cfg["layers"] or ctx.layers
    if not layers:
        raise ValueError("[detection]: no layers (set detection.layers or experts.layers)")
    layer = cfg["layer"] or layers[-1]
    expert_layer = cfg["expert_layer"] or layer
    for lname in {*layers, layer, expert_layer}:
        get_layer(model, lname)
    return layers, layer, expert_layer


def _draw_images(cfg: dict, data, seed: int) -> tuple:
    """``(train, held, fit_idx, lr_idx, n_fit)``: the training set, the held-out images (a
    random ``n_eval`` of the evaluation set when that is smaller), and two disjoint random parts
    of the training set: ``n_fit`` (at most half) clean images to fit the profiles on, and the
    first ``n_attack_fit`` of the rest to attack for the combined detector's regression. One
    CPU generator seeded with ``seed`` draws the training order, then the held-out subset."""
    if cfg["train_set"] not in data.training_sets:
        raise ValueError(f"[detection]: train_set {cfg['train_set']!r} is not a training set "
                         f"({', '.join(data.training_sets)})")
    train = data.training_sets[cfg["train_set"]]
    held = _eval_split(data, cfg["eval_set"])
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train.n, generator=g)
    n_fit = min(cfg["n_fit"], train.n // 2)
    fit_idx = order[:n_fit]
    rest = order[n_fit:]
    lr_idx = rest[:cfg["n_attack_fit"]]
    if cfg["n_eval"] is not None and cfg["n_eval"] < held.n:
        held = held.subset(torch.randperm(held.n, generator=g)[:cfg["n_eval"]])
    return train, held, fit_idx, lr_idx, n_fit


def _detector_layer(det: str, layers: list[str], layer: str, expert_layer: str) -> str | None:
    """The slice(s) detector ``det`` reads, as shown in its row (None for max softmax)."""
    if det == "max_softmax":
        return None
    if det == "expert_concentration":
        return expert_layer
    if det in ("influence_combined", "influence_max_z", "mahalanobis_layers"):
        return ", ".join(layers)
    return layer


def _detector_rows(dets: Detectors, clean_scores: dict, att_scores: dict, layers: list[str],
                   layer: str, expert_layer: str) -> tuple[list[dict], dict, list[dict]]:
    """``(rows, curves, feature_rows)``: per detector its ROC summary row and ROC curve (clean
    negatives vs attacked positives), and per feature of the combined detector its own AUC and
    its logistic-regression weight."""
    rows, curves = [], {}
    for det in DESCRIPTIONS:
        r = roc(clean_scores[det], att_scores[det])
        rows.append(_row(det, r, det in INFLUENCE, _detector_layer(det, layers, layer, expert_layer),
                         DESCRIPTIONS[det]))
        curves[det] = {"fpr": r["fpr"], "tpr": r["tpr"]}
    feature_rows = [{"feature": n, "auc": roc(clean_scores["features"][:, j],
                                              att_scores["features"][:, j])["auc"],
                     "weight": float(dets.w[j])} for j, n in enumerate(dets.names)]
    return rows, curves, feature_rows


def _success_rates(ok: Tensor, held, class_names) -> dict:
    """The attack's success rate overall and per class of the held-out images (classes with
    none left out)."""
    success = {"overall": float(ok.float().mean())}
    for c, cname in enumerate(class_names):
        sel = held.y == c
        if sel.any():
            success[cname] = float(ok[sel].float().mean())
    return success


def _masking(model: nn.Module, adv: Tensor, held, ok: Tensor, patch: Tensor, cfg: dict,
             expert_layer: str, window: int, maps_attacked: Tensor | None = None,
             maps_clean: Tensor | None = None) -> dict:
    """Masking the experts' region of the successful attacks: the share recovered, what the
    same masking does to the clean images, and how often the mask hits the patch; {} when no
    attack succeeded. ``maps_attacked``/``maps_clean``: the experts' maps of ``adv[ok]`` and of
    ``held.x`` when the scores already computed them."""
    if not ok.any():
        return {}
    res = mask_experts_region(model, adv[ok], held.y[ok], expert_layer, k=cfg["k"],
                              resolution=cfg["resolution"], window=window, maps=maps_attacked)
    kept = mask_experts_region(model, held.x, held.y, expert_layer, k=cfg["k"],
                               resolution=cfg["resolution"], window=window, maps=maps_clean)
    hit = (res["mask"] & patch[ok]).flatten(1).any(1).float().mean()
    return {"recovered": res["recovered"], "clean_still_correct": kept["recovered"],
            "clean_correct_before": kept["before"], "window": window,
            "hits_patch": float(hit), "n_attacked": int(ok.sum())}


def _adaptive(model: nn.Module, dets: Detectors, held, target: Tensor, clean_scores: dict,
              attack: dict, bounds, cfg: dict, layer: str) -> dict:
    """One adaptive attack: the held-out patch attack again (same targets and seed) with
    :func:`adaptive_penalty` pushing the slice's gradient × activation profile toward the
    target class's clean mean, and every detector's ROC summary against its successful attacks
    (clean negatives as before)."""
    seed = attack["seed"]
    means = dets.features.means[(layer, "point")]
    pen = adaptive_penalty(model, layer, means)
    adv2, _ = patch_attack(model, held.x, target, bounds=bounds, penalty=pen,
                           penalty_weight=cfg["adaptive_weight"],
                           **{**attack, "seed": seed + 1})
    ok2 = _logits(model, adv2).argmax(1) != held.y
    adaptive = {"success": float(ok2.float().mean()), "weight": cfg["adaptive_weight"],
                "layer": layer, "rows": []}
    if ok2.any():
        s2 = dets.scores(adv2[ok2])
        for det in DESCRIPTIONS:
            r = roc(clean_scores[det], s2[det])
            adaptive["rows"].append(_row(det, r, det in INFLUENCE, None, DESCRIPTIONS[det]))
    return adaptive


def _examples(model: nn.Module, data, held, adv: Tensor, patch: Tensor, pred_adv: Tensor,
              ok: Tensor, cfg: dict, expert_layer: str) -> dict:
    """The first ``n_examples`` successful attacks for display: attacked and clean images
    un-normalised to [0, 1] ((n, H, W) or (n, H, W, 3)), the patch masks, labels, predictions
    and, when there are any, the experts' maps of the attacked images."""
    n_ex = min(cfg["n_examples"], int(ok.sum()))
    idx = ok.nonzero().flatten()[:n_ex]
    show = (lambda t: torch.from_numpy(data.display(t.detach().cpu())).float()) \
        if hasattr(data, "display") else (lambda t: t.detach().cpu().float())
    examples = {"x": show(adv[idx]), "x_clean": show(held.x[idx]), "patch": patch[idx],
                "y": held.y[idx], "pred": pred_adv[idx]}
    if n_ex:
        examples["expert_map"] = expert_maps(model, adv[idx], expert_layer, pred_adv[idx],
                                             k=cfg["k"], resolution=cfg["resolution"])
    return examples


def build(ctx: StageContext) -> dict:
    """Attack the model under study with adversarial patches and detect the attacks.

    Fits every detector on the training set (clean images, and attacks made on *other* training
    images for the combined detector), then reports on held-out images: per detector AUC and TPR
    at 1/5/25% FPR (``rows``), the ROC curves, the attack's success, masking the experts' region,
    and one adaptive attack. Positives are the successful attacks on held-out images; negatives
    the same held-out images, clean. Returns a plain payload (dicts, lists, str, numbers, tensors).
    """
    cfg = check_config(ctx.section)
    data = ctx.data
    name = cfg["model"] or ctx.subject
    model = ctx.model(name)
    layers, layer, expert_layer = _detection_layers(cfg, ctx, model)
    h, w = data.size
    size = cfg["patch_size"] or max(1, round(min(h, w) / 4))
    window = cfg["window"] or size
    bounds = input_bounds(data)
    seed = cfg["seed"]
    total, done = 7 + int(cfg["adaptive"]), 0

    def step(msg: str):
        nonlocal done
        done += 1
        ctx.progress(min(done, total), total, msg)

    train, held, fit_idx, lr_idx, n_fit = _draw_images(cfg, data, seed)
    n_classes = data.n_classes
    attack = {"size": size, "steps": cfg["steps"], "step_size": cfg["step_size"], "seed": seed}

    step("attacking training images")
    x_lr, y_lr = train.x[lr_idx], train.y[lr_idx]
    adv_lr, _ = patch_attack(model, x_lr, _targets(y_lr, n_classes, seed), bounds=bounds,
                             **attack)
    ok_lr = _logits(model, adv_lr).argmax(1) != y_lr
    if not ok_lr.any():
        raise ValueError("[detection]: no attack on the training images succeeded; raise steps "
                         "or patch_size")
    dets = Detectors(model, layers, layer, expert_layer, k=cfg["k"], resolution=cfg["resolution"],
                     window=window, shrink=cfg["shrink"])
    dets.fit(train.x[fit_idx], train.y[fit_idx], x_lr, adv_lr[ok_lr], progress=step)

    step("attacking held-out images")
    target = _targets(held.y, n_classes, seed + 1)
    adv, patch = patch_attack(model, held.x, target, bounds=bounds, **{**attack, "seed": seed + 1})
    pred_adv = _logits(model, adv).argmax(1)
    ok = pred_adv != held.y
    step("scoring held-out images")
    clean_scores = dets.scores(held.x)
    rows, curves, feature_rows, att_scores = [], {}, [], {}
    if ok.any():
        att_scores = dets.scores(adv[ok])
        rows, curves, feature_rows = _detector_rows(dets, clean_scores, att_scores,
                                                    layers, layer, expert_layer)
    success = _success_rates(ok, held, data.class_names)

    step("masking the experts' region")
    masking = _masking(model, adv, held, ok, patch, cfg, expert_layer, window,
                       att_scores.get("expert_maps"), clean_scores["expert_maps"])
    adaptive: dict = {}
    if cfg["adaptive"]:
        step("adaptive attack")
        adaptive = _adaptive(model, dets, held, target, clean_scores, attack, bounds, cfg, layer)
    step("done")

    examples = _examples(model, data, held, adv, patch, pred_adv, ok, cfg, expert_layer)
    return {"rows": rows, "roc": curves, "features": feature_rows,
            "attack": {**attack, "success": success, "n_held_out": held.n, "model": name,
                       "knows": "white box: the model's weights and gradients; not the detector",
                       "positives": "successful attacks on held-out images",
                       "negatives": "the same held-out images, clean"},
            "masking": masking, "adaptive": adaptive, "examples": examples,
            "config": {k: v for k, v in cfg.items() if v is not None},
            "fit": {"train_set": cfg["train_set"], "eval_set": cfg["eval_set"], "n_fit": int(n_fit),
                    "n_attack_fit": int(ok_lr.sum()), "layers": layers, "layer": layer,
                    "expert_layer": expert_layer, "weights": [float(v) for v in dets.w],
                    "feature_names": list(dets.names)}}
