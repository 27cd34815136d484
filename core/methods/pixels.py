"""Pixel operations on image tensors that both the cases (their augmentations) and the methods
(detection's benign views) use; this module imports torch only, so that a case's data code
depends on nothing else of ``core.methods``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["shift"]


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """A (C, H, W) image moved by (dy, dx) pixels (down and right for positive values), the
    uncovered border filled by replicating the edge; the same tensor when both are 0."""
    if dy == 0 and dx == 0:
        return x
    p = max(abs(dy), abs(dx))
    padded = F.pad(x[None], (p, p, p, p), mode="replicate")[0]
    h, w = x.shape[-2:]
    return padded[:, p - dy:p - dy + h, p - dx:p - dx + w]
