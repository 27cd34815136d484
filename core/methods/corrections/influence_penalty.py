"""The influence penalty: fine-tune while penalising the influence of a shortcut region found
without a pixel mask (the vanilla model's distributional influence on the image border, a
location prior); λ chosen on the validation split.
"""

from __future__ import annotations

import time

import torch.nn.functional as F
from torch import Tensor, nn

from core.engine.influence import model_device
from core.methods.corrections.common import (
    Correction,
    SharedPenalty,
    border_region,
    ig_maps,
    per_class,
    pick,
    shares_forward,
    slice_gradient,
    slice_shape,
    subset,
    tuned_fine_tune,
)

__all__ = [
    "correct_influence_penalty",
    "influence_penalty",
    "shortcut_region",
]


def influence_penalty(model: nn.Module, x: Tensor, selector: Tensor, layer: str | None = None
                      ) -> Tensor:
    """Mean over the batch of ‖S ⊙ ∂(Σ_k log p_k)/∂z‖²: the squared influence (point DoI) of the
    selected slice units on the summed class log-probabilities. ``selector`` S is shaped like one
    example's slice (broadcast over the batch)."""
    g, _ = slice_gradient(model, x, layer)
    return (selector.to(g) * g).pow(2).flatten(1).sum(1).mean()


def shortcut_region(model: nn.Module, x: Tensor, y: Tensor, *, border: int = 4,
                    threshold: float = 1.0, resolution: int = 8) -> tuple[Tensor, dict]:
    """The input pixels the penalty covers, found without the mask.

    The vanilla model's distributional influence at the input (Integrated Gradients of the label's
    logit, zero baseline) is averaged over ``x`` (positive part, per pixel). Among the border
    pixels (:func:`border_region`), the region keeps those whose mean attribution exceeds
    ``threshold`` × the mean attribution of the central pixels (where the digits are): pixels the
    model leans on although digits never put ink there. ``threshold=0`` keeps the whole border.
    Returns (bool (H, W) region, info).
    """
    dev = model_device(model)
    attr = ig_maps(model, x.to(dev), y.to(dev), resolution).clamp_min(0).mean(0)  # (H, W)
    frame = border_region(tuple(attr.shape[-2:]), border).to(attr.device)
    centre = attr[~frame].mean()
    region = frame & (attr > threshold * centre) if threshold > 0 else frame
    info = {"border": border, "threshold": threshold, "n_pixels": int(region.sum()),
            "centre_mean": float(centre), "border_mean": float(attr[frame].mean()),
            "heatmap": attr.detach().cpu().float(), "region": region.cpu()}
    return region.cpu(), info


def correct_influence_penalty(model: nn.Module, data, *, lambdas=(0.01, 0.1, 1.0),
                              layer: str | None = None, border: int = 4, threshold: float = 1.0,
                              n_images: int = 500, epochs: int = 3, lr: float = 2e-3,
                              batch_size: int = 128, penalty_batch: int | None = None,
                              n_fit: int | None = None, seed: int = 0,
                              progress=None, **_) -> Correction:
    """Mask-free: fine-tune while penalising the influence of the shortcut region.

    Exactly: (1) the vanilla model's distributional influence at the input (Integrated Gradients
    of the label logit, zero baseline, ``n_images`` training images spread over the classes) is
    averaged per pixel (positive part); (2) the region R keeps the border pixels
    (:func:`border_region`, ``border`` wide) whose mean attribution exceeds ``threshold`` × the
    mean over the central pixels: pixels the model leans on where digits have no ink; (3) the
    loss is cross-entropy + λ · mean_batch ‖S ⊙ ∂(Σ_k log p_k)/∂z‖², z the slice ``layer`` (None:
    the input, S = R; a conv layer: S = R resized to its grid, every channel). No per-image mask,
    no clean twins: R is one fixed region for all images. The record keeps R, the heatmap, and —
    as an after-the-fact diagnostic only — R's precision and recall against the union of the
    training patch positions.
    """
    t0 = time.perf_counter()
    x, _xc, _mask, y = subset(data.train, n_fit, seed)
    if progress:
        progress("Influence penalty: locating the shortcut from the vanilla model's influence")
    xs, ys = per_class(x, y, n_images, seed)
    region, info = shortcut_region(model, xs, ys, border=border, threshold=threshold)
    dev = model_device(model)
    if layer is None:
        selector = region.to(dev).float()[None]  # (1, H, W)
    else:
        shape = slice_shape(model, x[:1], layer)
        if len(shape) != 3:
            raise ValueError(f"influence_penalty.layer must be a convolutional slice, not {layer!r}")
        r = F.interpolate(region[None, None].float(), size=shape[-2:], mode="nearest")[0]
        selector = r.expand(shape).to(dev)

    def weigh(g, idx):
        return (selector.to(g) * g).pow(2).flatten(1).sum(1).mean()

    def make_loss(lam):
        if shares_forward(penalty_batch, batch_size):
            return SharedPenalty(float(lam), layer, weigh)

        def extra(m, xb, yb, logits, idx):
            k = len(xb) if penalty_batch is None else int(penalty_batch)
            return lam * influence_penalty(m, xb[:k], selector, layer)
        return extra

    best, _hist, grid = tuned_fine_tune("Influence penalty", model, data, make_loss, lambdas,
                                         x=x, y=y, epochs=epochs, lr=lr, batch_size=batch_size,
                                         seed=seed, progress=progress)
    chosen = grid[pick(grid)]["value"]
    # A diagnostic only (after the fact, not used by the correction): how well the mask-free
    # region matches the places the patch can be (the union of the training masks).
    union = data.train.mask.bool().any(0)[0]
    hit = int((region & union).sum())
    record = {"strength": chosen, "strength_name": "λ", "grid": grid, "epochs": epochs, "lr": lr,
              "layer": layer, "region": info["region"], "heatmap": info["heatmap"],
              "region_precision": hit / max(int(region.sum()), 1),
              "region_recall": hit / max(int(union.sum()), 1),
              "region_pixels": info["n_pixels"], "border": border, "threshold": threshold,
              "seconds": time.perf_counter() - t0, "spec": None}
    return Correction("influence_penalty", best, record)

