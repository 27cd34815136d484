"""Adversarial patches and their detection from influence alone: the measurements (any model,
plain tensors; the detection stage, :mod:`core.stages.detection`, runs them on a case).

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

The evaluation (issue 18): several attacks per held-out image (patch sizes × positions, on benign
views of the image) and several clean views of it are correlated, so every interval resamples
*held-out images* (:func:`image_bootstrap`), and :func:`rank_detectors` ranks two detectors only
where the bootstrap interval of their paired AUC difference excludes 0; a baseline at AUC 1 makes
the table saturated ("cannot rank").
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
from core.methods.pixels import shift

__all__ = [
    "DESCRIPTIONS",
    "Detectors",
    "FPR_POINTS",
    "INFLUENCE",
    "InfluenceFeatures",
    "LayerPenalty",
    "SATURATED",
    "adaptive_penalty",
    "attack_targets",
    "benign_views",
    "expert_maps",
    "fit_logistic",
    "image_bootstrap",
    "interval",
    "mahalanobis_penalty",
    "mahalanobis_scores",
    "mask_experts_region",
    "max_softmax_scores",
    "patch_attack",
    "patch_masks",
    "rank_detectors",
    "roc",
    "summed_penalty",
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


def patch_masks(n: int, size: int | Sequence[int] | Tensor, image: tuple[int, int],
                seed: int = 0) -> Tensor:
    """(n, 1, H, W) bool masks of a square at a random place per image (seeded by ``seed``).

    ``size``: one side for every image (the corners drawn with ``randint``), or ``n`` sides, one
    per image (each corner uniform over the places where that square fits). Raises
    ``ValueError`` when a side does not fit the ``image`` (H, W)."""
    h, w = image
    sizes = torch.as_tensor(size, dtype=torch.long)
    if sizes.dim() > 1 or (sizes.dim() == 1 and len(sizes) != n):
        raise ValueError(f"patch sizes: one side or {n}, got shape {tuple(sizes.shape)}")
    if len(sizes.flatten()) and not (1 <= int(sizes.min()) and int(sizes.max()) <= min(h, w)):
        raise ValueError(f"patch size {sizes.tolist()} does not fit a {h}×{w} image")
    g = torch.Generator().manual_seed(int(seed))
    if sizes.dim() == 0:
        side = int(sizes)
        rows = torch.randint(0, h - side + 1, (n,), generator=g)
        cols = torch.randint(0, w - side + 1, (n,), generator=g)
        side_t = torch.full((n,), side, dtype=torch.long)
    else:
        side_t = sizes
        rows = (torch.rand(n, generator=g, dtype=torch.float64) * (h - sizes + 1)).long()
        cols = (torch.rand(n, generator=g, dtype=torch.float64) * (w - sizes + 1)).long()
        rows, cols = torch.minimum(rows, h - sizes), torch.minimum(cols, w - sizes)
    r = torch.arange(h).view(1, h, 1)
    c = torch.arange(w).view(1, 1, w)
    rows, cols, side_t = rows.view(-1, 1, 1), cols.view(-1, 1, 1), side_t.view(-1, 1, 1)
    m = (r >= rows) & (r < rows + side_t) & (c >= cols) & (c < cols + side_t)
    return m[:, None]


def patch_attack(model: nn.Module, x: Tensor, target: Tensor, *,
                 size: int | Sequence[int] | Tensor = 12, steps: int = 80,
                 step_size: float | None = None, seed: int = 0, bounds=(0.0, 1.0),
                 penalty: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
                 penalty_weight: float = 1.0, batch_size: int = 256,
                 stats: dict | None = None) -> tuple[Tensor, Tensor]:
    """Targeted adversarial patches by projected sign-gradient descent.

    Each image gets a ``size``×``size`` square at a random place (seeded by ``seed``; ``size``
    one side or one per image, see :func:`patch_masks`); the pixels
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
            if isinstance(penalty, LayerPenalty):   # one forward for the loss and the penalty
                pen, logits = penalty.forward(model, adv, tb)
                loss = F.cross_entropy(logits, tb, reduction="sum") + penalty_weight * pen.sum()
            else:
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


class LayerPenalty:
    """A penalty for :func:`patch_attack` computed from the logits and the activation ``z`` at the
    output of ``module`` (a layer of the attacked model): ``fn(logits, z, target) -> (N,)``.
    ``forward(model, adv, target)`` gives ``(penalty, logits)`` from one forward pass (the
    attack's loss reuses those logits); calling it gives the penalty alone. The hook lives only
    inside that pass."""

    def __init__(self, module: nn.Module, fn: Callable[[Tensor, Tensor, Tensor], Tensor]):
        self.module, self.fn = module, fn

    def forward(self, model_: nn.Module, adv: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(penalty (N,), logits (N, classes))`` from one forward pass of ``adv``."""
        store = {}
        handle = self.module.register_forward_hook(lambda m, a, out: store.__setitem__("z", out))
        try:
            logits = model_(adv)
        finally:
            handle.remove()
        return self.fn(logits, store["z"], target), logits

    def __call__(self, model_: nn.Module, adv: Tensor, target: Tensor) -> Tensor:
        return self.forward(model_, adv, target)[0]


def adaptive_penalty(model: nn.Module, layer: str, means: Tensor) -> LayerPenalty:
    """A penalty for :func:`patch_attack` that pushes the input's gradient × activation profile
    at ``layer`` (quantity: the target class against the rest) toward that class's mean profile
    ``means`` (classes, features) over clean training images: 1 − cosine similarity, per image.
    Differentiable (double back-propagation)."""

    def fn(logits: Tensor, z: Tensor, target: Tensor) -> Tensor:
        q = _contrast(logits, target).sum()
        (g,) = torch.autograd.grad(q, z, create_graph=True)
        prof = (g * z).flatten(1)
        ref = means.to(prof.device)[target]
        return 1 - F.cosine_similarity(prof, ref, dim=1)

    return LayerPenalty(get_layer(model, layer), fn)


def mahalanobis_penalty(model: nn.Module, layer: str, gauss: Gaussian, *, scale: float = 1.0,
                        pool: bool = False) -> LayerPenalty:
    """A penalty for :func:`patch_attack` that pulls the activations at ``layer`` toward the
    target class under ``gauss`` (a :class:`Gaussian` fit on clean images, as the Mahalanobis
    baseline's): the squared Mahalanobis distance to the target class's mean divided by
    ``scale`` (e.g. the clean images' median distance, so that a typical clean image costs 1),
    per image. ``pool``: average a conv layer over space first (as ``Mahalanobis(pool=True)``).
    The attack that uses it knows the baseline: it is adaptive to the Mahalanobis detector."""
    means = gauss.means.float()
    precision = None if gauss.precision is None else gauss.precision.float()
    low_rank = None if gauss.low_rank is None else tuple(t.float() for t in gauss.low_rank)
    scale = float(scale) if scale > 0 else 1.0

    def fn(logits: Tensor, z: Tensor, target: Tensor) -> Tensor:
        a = (z.flatten(2).mean(2) if pool and z.dim() > 2 else z).flatten(1)
        d = a - means.to(a.device)[target]
        return gauss.form(d, precision, low_rank) / scale

    return LayerPenalty(get_layer(model, layer), fn)


def summed_penalty(parts: Sequence[tuple[Callable, float]]) -> Callable:
    """One penalty for :func:`patch_attack` from several ``(penalty, weight)``: the weighted sum,
    per image (an attack adaptive to several detectors at once). Parts that are
    :class:`LayerPenalty` of one layer share one forward pass."""
    parts = list(parts)
    if parts and all(isinstance(p, LayerPenalty) for p, _ in parts) \
            and len({p.module for p, _ in parts}) == 1:
        return LayerPenalty(parts[0][0].module,
                            lambda logits, z, t: sum(w * p.fn(logits, z, t) for p, w in parts))

    def penalty(model_: nn.Module, adv: Tensor, target: Tensor) -> Tensor:
        return sum(w * pen(model_, adv, target) for pen, w in parts)

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


def benign_views(x: Tensor, views: int, *, max_shift: int = 0, flip: bool = False,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """``views`` clean versions of every image (view 0 is the image itself; the others flipped
    left–right with probability ½ when ``flip`` and shifted by up to ``max_shift`` pixels each
    way, the edge replicated), seeded. Returns ``(x_views (N·views, C, H, W), source (N·views,))``
    in image-major order: row ``i·views + v`` is view ``v`` of image ``i``."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for i in range(len(x)):
        out.append(x[i])
        for _ in range(views - 1):
            img = x[i]
            if flip and float(torch.rand((), generator=g)) < 0.5:
                img = img.flip(-1)
            dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
            out.append(shift(img, dy, dx))
    src = torch.arange(len(x)).repeat_interleave(views)
    return (torch.stack(out) if out else x[:0].clone()), src


def _weighted_roc(clean: np.ndarray, attacked: np.ndarray, w_clean: np.ndarray,
                  w_attacked: np.ndarray) -> tuple[np.ndarray, dict]:
    """AUC and TPR at :data:`FPR_POINTS` of :func:`roc` for ``B`` weightings at once: scores
    ``clean`` (n0,) and ``attacked`` (n1,), weights (B, n0) and (B, n1) (a row of ones gives
    :func:`roc`'s values exactly). Returns ``(auc (B,), {budget: tpr (B,)})``; NaN where a
    weighting leaves no clean or no attacked weight."""
    s = np.concatenate([clean, attacked])
    order = np.argsort(s, kind="stable")
    ss = s[order]
    zc, za = np.zeros_like(w_attacked, dtype=np.float64), np.zeros_like(w_clean, dtype=np.float64)
    cw = np.concatenate([w_clean, zc], 1)[:, order].astype(np.float64)
    aw = np.concatenate([za, w_attacked], 1)[:, order].astype(np.float64)
    c0 = np.concatenate([np.zeros((len(cw), 1)), np.cumsum(cw, 1)], 1)
    a0 = np.concatenate([np.zeros((len(aw), 1)), np.cumsum(aw, 1)], 1)
    new = np.r_[True, ss[1:] != ss[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(ss)]
    gid = np.cumsum(new) - 1
    below, upto = c0[:, starts[gid]], c0[:, ends[gid]]
    wc, wa = c0[:, -1], a0[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (aw * (below + 0.5 * (upto - below))).sum(1) / (wc * wa)
        fpr = (wc[:, None] - c0[:, starts]) / wc[:, None]
        tpr = (wa[:, None] - a0[:, starts]) / wa[:, None]
    tpr_at = {}
    for budget in FPR_POINTS:
        t = np.where(fpr <= budget + 1e-12, tpr, 0.0).max(1)
        tpr_at[budget] = np.where((wc > 0) & (wa > 0), t, np.nan)
    return np.where((wc > 0) & (wa > 0), auc, np.nan), tpr_at


def image_bootstrap(clean: dict, attacked: dict, clean_source: Tensor, attacked_source: Tensor,
                    n_images: int, *, replicates: int = 1000, seed: int = 0) -> dict:
    """Every detector's AUC and TPR at :data:`FPR_POINTS` under one image-level bootstrap.

    ``clean``/``attacked``: {detector: (n0,)/(n1,) scores}; ``clean_source``/``attacked_source``:
    the held-out image (0…``n_images``−1) each score comes from (several views and attacks of one
    image are correlated, so the bootstrap resamples *images*: each replicate draws ``n_images``
    images with replacement and weights every score by its image's count). The replicates are the
    same for every detector (paired). Returns ``{detector: {"auc": (B,), "tpr_at": {budget:
    (B,)}}}`` NumPy arrays (NaN for a replicate without clean or attacked scores)."""
    rng = np.random.default_rng(int(seed))
    counts = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=replicates)
    cs = np.asarray(torch.as_tensor(clean_source).cpu(), dtype=np.int64)
    as_ = np.asarray(torch.as_tensor(attacked_source).cpu(), dtype=np.int64)
    out = {}
    for det in clean:
        c = np.asarray(torch.as_tensor(clean[det]).detach().cpu(), dtype=np.float64).ravel()
        a = np.asarray(torch.as_tensor(attacked[det]).detach().cpu(), dtype=np.float64).ravel()
        auc, tpr_at = _weighted_roc(c, a, counts[:, cs], counts[:, as_])
        out[det] = {"auc": auc, "tpr_at": tpr_at}
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values`` (NaNs left out); (NaN,
    NaN) when none is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    q = (1 - level) / 2
    return float(np.quantile(v, q)), float(np.quantile(v, 1 - q))


SATURATED = 0.995  # an AUC at or above this is "at 1": the benchmark cannot rank it


def rank_detectors(auc: dict, boot: dict, baselines: Sequence[str] = (), *,
                   level: float = 0.95) -> dict:
    """Rank detectors where the image-level bootstrap separates them, else call them ties.

    ``auc``: {detector: AUC on the images}; ``boot``: :func:`image_bootstrap`'s output (paired
    replicates); ``baselines``: the detectors that use no influence. Detector A beats B when the
    ``level`` interval of the paired difference AUC_A − AUC_B lies above 0. Returns ``{"order":
    detectors by AUC, "rank": {d: 1 + how many beat it}, "tied_with": {d: those it cannot be told
    apart from}, "top": the detectors nothing beats, "saturated": those at AUC ≥ SATURATED,
    "influence_vs_baselines": {"influence", "baseline", "difference", "low", "high", "verdict"},
    "verdict": one sentence, "level", "method"}``. A baseline at AUC 1 makes the verdict
    "saturated: cannot rank"."""
    names = sorted(auc, key=lambda d: (-auc[d], d))
    base = [d for d in names if d in set(baselines)]
    infl = [d for d in names if d not in set(baselines)]
    diff = {(a, b): interval(boot[a]["auc"] - boot[b]["auc"], level)
            for a in names for b in names if a != b}
    beats = {k: v[0] > 0 for k, v in diff.items()}
    rank = {d: 1 + sum(beats[(o, d)] for o in names if o != d) for d in names}
    tied = {d: [o for o in names if o != d and not beats[(o, d)] and not beats[(d, o)]]
            for d in names}
    top = [d for d in names if rank[d] == 1]
    saturated = [d for d in names if auc[d] >= SATURATED]
    sat_base = [d for d in saturated if d in base]
    pct = f"{round(100 * level)}%"
    if sat_base:
        verdict = (f"saturated: cannot rank — {', '.join(sat_base)} (no influence) reach AUC 1.0 "
                   "on these images")
    elif len(top) == 1:
        verdict = (f"{top[0]} ranks first: its AUC is above every other detector's ({pct} "
                   "image-level bootstrap of the paired differences)")
    else:
        verdict = (f"cannot be told apart: {', '.join(top)} (the {pct} image-level bootstrap "
                   "intervals of their paired AUC differences hold 0)")
    versus = {}
    if base and infl:
        bi, bb = infl[0], base[0]
        lo, hi = diff[(bi, bb)]
        word = ("saturated: cannot rank" if sat_base else "influence ahead" if lo > 0
                else "baseline ahead" if hi < 0 else "cannot be told apart")
        versus = {"influence": bi, "baseline": bb, "difference": auc[bi] - auc[bb], "low": lo,
                  "high": hi, "verdict": word}
    return {"order": names, "rank": rank, "tied_with": tied, "top": top, "saturated": saturated,
            "influence_vs_baselines": versus, "verdict": verdict, "level": level,
            "method": f"{pct} image-level bootstrap (held-out images resampled) of paired AUC "
                      "differences"}


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
    cls)`` is the squared Mahalanobis distance of each row to its class's mean.

    Up to :data:`DENSE_UP_TO` features the precision is the F × F pseudo-inverse of the shrunk
    covariance (``precision``). Above it (a conv layer's flattened map of a real network: F in the
    tens of thousands, where an F × F matrix takes gigabytes) the same shrunk covariance — a
    diagonal plus the rank-N sample term — is inverted exactly by the Woodbury identity and kept
    as its factors (``low_rank``; ``precision`` is None): the same distances, in O(N·F) memory."""

    def __init__(self, a: Tensor, y: Tensor, n_classes: int, shrink: float = 0.1):
        a = a.double()
        self.means = torch.stack([a[y == c].mean(0) if (y == c).any() else a.mean(0)
                                  for c in range(n_classes)])
        centred = a - self.means[y]
        self.precision, self.low_rank = None, None
        if a.shape[1] > DENSE_UP_TO:
            self.low_rank = _woodbury(centred, shrink)
            return
        cov = centred.T @ centred / max(len(a) - 1, 1)
        diag = torch.diag(torch.diag(cov))
        cov = (1 - shrink) * cov + shrink * diag \
            + 1e-6 * float(torch.diag(cov).mean()) * torch.eye(len(cov), dtype=cov.dtype)
        self.precision = torch.linalg.pinv(cov)

    def form(self, d: Tensor, precision: Tensor | None = None, low_rank=None) -> Tensor:
        """dᵀ Σ⁻¹ d per row of ``d`` (rows already centred), differentiable, in ``d``'s dtype;
        ``precision`` / ``low_rank``: this Gaussian's, cast once by the caller (default: as
        stored)."""
        precision = self.precision if precision is None else precision
        if precision is not None:
            return ((d @ precision.to(d.device)) * d).sum(1)
        dinv, cd, minv = (t.to(d.device) for t in (low_rank or self.low_rank))
        u = d @ cd.T
        return (d * d * dinv).sum(1) - ((u @ minv) * u).sum(1)

    def distance(self, a: Tensor, cls: Tensor) -> Tensor:
        """(N,) squared Mahalanobis distance of each row of ``a`` to class ``cls[i]``'s mean."""
        d = a.double() - self.means[cls]
        return self.form(d).float()


DENSE_UP_TO = 4096  # features above which the precision is kept in Woodbury factors


def _woodbury(centred: Tensor, shrink: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(D⁻¹ (F,), C D⁻¹ (N, F), (I + C D⁻¹ Cᵀ)⁻¹ (N, N))`` for the shrunk covariance
    Σ = D + CᵀC of ``centred`` (N, F): D = shrink · diag(S) + 1e-6 · mean(diag S) (as the dense
    path), C = √((1 − shrink)/(N − 1)) · centred, S the sample covariance; then
    Σ⁻¹ = D⁻¹ − D⁻¹Cᵀ (I + C D⁻¹ Cᵀ)⁻¹ C D⁻¹ (Woodbury)."""
    n = max(len(centred) - 1, 1)
    var = (centred * centred).sum(0) / n
    d = shrink * var + 1e-6 * float(var.mean())
    dinv = 1.0 / d.clamp_min(torch.finfo(d.dtype).tiny)
    c = centred * ((1 - shrink) / n) ** 0.5
    cd = c * dinv
    m = torch.eye(len(c), dtype=c.dtype) + cd @ c.T
    return dinv, cd, torch.linalg.pinv(m)


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
# Every detector, fit once

def attack_targets(y: Tensor, n_classes: int, seed: int) -> Tensor:
    """A class other than ``y`` per image (the other class when there are two), seeded."""
    g = torch.Generator().manual_seed(int(seed))
    offset = torch.randint(1, n_classes, (len(y),), generator=g)
    return (y + offset) % n_classes


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
        self.mahalanobis_scale = float(self.mahalanobis.score(clean_x).median())
        note("features of training attacks")
        fc, self.names = self.features.features(lr_clean)
        fa, _ = self.features.features(lr_attacked)
        self.w, self.b = fit_logistic(self.features.zscores(fa), self.features.zscores(fc))
        return self

    def penalty(self, against: str, *, influence_weight: float = 1.0,
                mahalanobis_weight: float = 1.0) -> Callable:
        """The adaptive attack's penalty against ``against``: ``"influence"`` (the naive
        detector's profile at ``layer`` pushed toward the target class's clean mean,
        :func:`adaptive_penalty`), ``"mahalanobis"`` (the baseline's distance at ``layer`` pulled
        toward the target class, :func:`mahalanobis_penalty`, scaled by the clean median) or
        ``"both"`` (their weighted sum). Returns a penalty for :func:`patch_attack` (weights
        included: use ``penalty_weight=1``)."""
        if self.mahalanobis is None:
            raise ValueError("call fit(...) first")
        parts = []
        if against in ("influence", "both"):
            parts.append((adaptive_penalty(self.model, self.layer,
                                           self.features.means[(self.layer, "point")]),
                          influence_weight))
        if against in ("mahalanobis", "both"):
            parts.append((mahalanobis_penalty(self.model, self.layer, self.mahalanobis.gauss,
                                              scale=self.mahalanobis_scale), mahalanobis_weight))
        if not parts:
            raise ValueError(f"adaptive attack against {against!r}: influence, mahalanobis or both")
        return summed_penalty(parts)

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

