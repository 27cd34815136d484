"""Pure functions turning attributions into pictures the pages can show (no torch graph, no state)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def _as_map(attr) -> np.ndarray:
    """An attribution as a 2-D float array: channels summed, batch/leading ones dropped."""
    a = np.asarray(attr.detach().cpu() if hasattr(attr, "detach") else attr, dtype=np.float64)
    while a.ndim > 2:
        a = a.sum(0)
    if a.ndim != 2:
        raise ValueError(f"expected an attribution map (H, W) or (C, H, W), got shape {a.shape}")
    return a


def _as_gray(image) -> np.ndarray:
    a = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] == 3 and a.shape[0] != 3:  # a display image (H, W, 3)
        a = a.mean(-1)
    img = _as_map(a)
    lo, hi = img.min(), img.max()
    return np.zeros_like(img) if hi <= lo else (img - lo) / (hi - lo)


def heatmap(attr, *, signed: bool = True, scale: int = 1) -> np.ndarray:
    """RGB uint8 heatmap: red for positive, blue for negative (``signed``), white at zero.

    Normalised by the largest magnitude of this map. ``scale`` enlarges each pixel for display.
    """
    a = _as_map(attr)
    if not signed:
        a = np.abs(a)
    m = np.abs(a).max()
    a = a / m if m > 0 else a
    pos, neg = np.clip(a, 0, 1), np.clip(-a, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    out = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return _enlarge(out, scale)


def percentile_mask(attr, q: float = 95.0, blur: float = 1.0) -> np.ndarray:
    """Float mask in [0, 1]: pixels whose attribution is at or above its ``q``-th percentile,
    softened by a Gaussian blur of radius ``blur`` (the authors thresholded at 95 and blurred)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be a percentile in [0, 100], not {q}")
    a = _as_map(attr)
    mask = (a >= np.percentile(a, q)) & (a > 0)
    img = Image.fromarray((mask * 255).astype(np.uint8))
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    out = np.asarray(img, dtype=np.float64) / 255
    return out / out.max() if out.max() > 0 else out


def masked_image(image, attr, q: float = 95.0, blur: float = 1.0, dim: float = 0.25,
                 scale: int = 1) -> np.ndarray:
    """RGB uint8: the image shown where the expert's mask is, dimmed elsewhere, mask tinted."""
    gray = _as_gray(image)
    m = percentile_mask(attr, q, blur)
    shown = gray * (dim + (1 - dim) * m)
    rgb = np.stack([shown, shown, shown], axis=-1)
    rgb[..., 0] = np.clip(rgb[..., 0] + 0.6 * m, 0, 1)  # tint the expert's region
    out = (rgb * 255).round().astype(np.uint8)
    return _enlarge(out, scale)


def overlay(image, attr, alpha: float = 0.55, scale: int = 1) -> np.ndarray:
    """RGB uint8: the signed heatmap blended over the grey image."""
    gray = _as_gray(image)
    base = np.stack([gray] * 3, axis=-1)
    heat = heatmap(attr).astype(np.float64) / 255
    out = ((1 - alpha) * base + alpha * heat) * 255
    return _enlarge(out.round().astype(np.uint8), scale)


def grayscale(image, scale: int = 1) -> np.ndarray:
    """RGB uint8 of an image tensor/array in any range."""
    g = (_as_gray(image) * 255).round().astype(np.uint8)
    return _enlarge(np.stack([g] * 3, axis=-1), scale)


def _enlarge(rgb: np.ndarray, scale: int) -> np.ndarray:
    scale = int(scale)
    return rgb if scale <= 1 else rgb.repeat(scale, 0).repeat(scale, 1)


__all__ = ["heatmap", "percentile_mask", "masked_image", "overlay", "grayscale"]
