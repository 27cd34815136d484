"""Right for the Right Reasons (Ross et al. 2017): fine-tune with a penalty on the input gradient
inside the region's pixel mask (double backprop); λ chosen on the validation split.
"""

from __future__ import annotations

import time

from torch import Tensor, nn

from core.engine.influence import model_device
from core.methods.corrections.common import (
    Correction,
    SharedPenalty,
    pick,
    shares_forward,
    slice_gradient,
    subset,
    tuned_fine_tune,
)

__all__ = [
    "correct_rrr",
    "rrr_penalty",
]


def rrr_penalty(model: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """Ross et al. 2017: mean over the batch of ‖mask ⊙ ∂(Σ_k log p_k)/∂x‖² (sum over pixels).

    Zero when the mask is empty; differentiable w.r.t. the parameters (double backprop).
    """
    g, _ = slice_gradient(model, x, None)
    return (mask.to(g.dtype) * g).pow(2).flatten(1).sum(1).mean()


def correct_rrr(model: nn.Module, data, *, lambdas=(0.01, 0.1, 1.0), epochs: int = 3,
                lr: float = 2e-3, batch_size: int = 128, penalty_batch: int | None = None,
                n_fit: int | None = None, seed: int = 0, progress=None, **_) -> Correction:
    """Fine-tune with the RRR penalty (exact patch masks); λ chosen on the validation split."""
    t0 = time.perf_counter()
    x, _xc, mask, y = subset(data.train, n_fit, seed)
    dev = model_device(model)
    mask_dev = mask.to(dev).float()

    def weigh(g, idx):
        return (mask_dev[idx].to(g.dtype) * g).pow(2).flatten(1).sum(1).mean()

    def make_loss(lam):
        if shares_forward(penalty_batch, batch_size):
            return SharedPenalty(float(lam), None, weigh)

        def extra(m, xb, yb, logits, idx):
            k = len(xb) if penalty_batch is None else int(penalty_batch)
            return lam * rrr_penalty(m, xb[:k], mask_dev[idx[:k]])
        return extra

    best, _hist, grid = tuned_fine_tune("RRR", model, data, make_loss, lambdas, x=x, y=y,
                                         epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                         progress=progress)
    chosen = grid[pick(grid)]["value"]
    record = {"strength": chosen, "strength_name": "λ", "grid": grid, "epochs": epochs,
              "lr": lr, "seconds": time.perf_counter() - t0, "spec": None}
    return Correction("rrr", best, record)

