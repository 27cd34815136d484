"""The control: the same fine-tuning with no penalty (what the extra epochs alone do; not a
correction).
"""

from __future__ import annotations

import time

from torch import nn

from core.methods.corrections.common import (
    Correction,
    fine_tune,
    subset,
    val_acc,
)

__all__ = [
    "correct_finetune",
]


def correct_finetune(model: nn.Module, data, *, epochs: int = 3, lr: float = 2e-3,
                     batch_size: int = 128, n_fit: int | None = None, seed: int = 0,
                     progress=None, **_) -> Correction:
    """The control: the same fine-tuning on the decoy training set with no penalty at all."""
    t0 = time.perf_counter()
    x, _xc, _mask, y = subset(data.train, n_fit, seed)
    if progress:
        progress("Control: fine-tuning without any penalty")
    m, hist = fine_tune(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    grid = [{"value": 0.0, "val_acc": val_acc(m, data),
             "final_loss": float(hist["loss"][-1]) if hist["loss"] else None,
             "seconds": time.perf_counter() - t0}]
    record = {"strength": 0.0, "strength_name": "λ", "grid": grid, "epochs": epochs, "lr": lr,
              "control": True, "seconds": time.perf_counter() - t0, "spec": None}
    return Correction("finetune", m, record)

