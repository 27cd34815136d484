"""Counterexamples: fine-tune on the training set plus copies whose region pixels are randomised
(the region's pixel mask of every training image); the number of copies chosen on the
validation split.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from core.methods.corrections.common import (
    Correction,
    fine_tune,
    pick,
    subset,
    val_acc,
)

__all__ = [
    "correct_counterexamples",
    "counterexample_copies",
]


def counterexample_copies(x: Tensor, mask: Tensor, *, fill: str = "uniform", seed: int = 0
                          ) -> Tensor:
    """Copies of ``x`` whose patch pixels are randomised (``fill="uniform"``: U(0, 1) per pixel;
    ``"shade"``: one random decoy shade 1 − 0.1·d per image, d uniform in 0–9)."""
    g = torch.Generator().manual_seed(seed)
    if fill == "uniform":
        noise = torch.rand(x.shape, generator=g)
    elif fill == "shade":
        d = torch.randint(0, 10, (x.shape[0],), generator=g).float()
        noise = ((255 - 25 * d) / 255).view(-1, *([1] * (x.dim() - 1))).expand_as(x)
    else:
        raise ValueError(f"fill must be 'uniform' or 'shade', not {fill!r}")
    return torch.where(mask.bool(), noise.to(x), x)


def correct_counterexamples(model: nn.Module, data, *, fractions=(1.0,), fill: str = "uniform",
                            epochs: int = 3, lr: float = 2e-3, batch_size: int = 128,
                            n_fit: int | None = None, seed: int = 0, progress=None,
                            **_) -> Correction:
    """Fine-tune on the training set plus ``fraction`` × N randomised-patch copies."""
    t0 = time.perf_counter()
    x, _xc, mask, y = subset(data.train, n_fit, seed)
    grid, best_model = [], None
    for frac in fractions:
        if progress:
            progress(f"Counterexamples: fine-tuning with {frac:g} × N copies")
        t = time.perf_counter()
        k = max(1, int(round(frac * len(x))))
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
        idx = idx[torch.arange(k) % len(x)]
        xc = counterexample_copies(x[idx], mask[idx], fill=fill, seed=seed)
        m, hist = fine_tune(model, torch.cat([x, xc]), torch.cat([y, y[idx]]), epochs=epochs,
                             lr=lr, batch_size=batch_size, seed=seed)
        grid.append({"value": float(frac), "val_acc": val_acc(m, data),
                     "final_loss": float(hist["loss"][-1]) if hist["loss"] else None,
                     "seconds": time.perf_counter() - t})
        if pick(grid) == len(grid) - 1:
            best_model = m
    chosen = grid[pick(grid)]["value"]
    record = {"strength": chosen, "strength_name": "copies / N", "fill": fill, "grid": grid,
              "epochs": epochs, "lr": lr, "seconds": time.perf_counter() - t0, "spec": None}
    return Correction("counterexamples", best_model, record)

