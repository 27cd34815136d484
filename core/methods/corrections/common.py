"""What every correction method shares: the :class:`Correction` it returns, copying and scoring a
model on the validation split, picking a grid value, the training subset, the border prior, the
gradient of the summed class log-probabilities at a slice (for the gradient penalties) and the
fine-tune with or without a penalty.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.engine.influence import activations, get_layer, model_device
from core.methods.attribution import attribute
from core.methods.metrics import region_mass as per_image_mass
from core.methods.training import evaluate, train_model

__all__ = [
    "Correction",
    "SharedPenalty",
    "border_region",
    "copy_model",
    "fine_tune",
    "ig_maps",
    "per_class",
    "pick",
    "region_mass",
    "set_submodule",
    "shares_forward",
    "slice_gradient",
    "slice_shape",
    "subset",
    "tuned_fine_tune",
    "val_acc",
]


@dataclass
class Correction:
    """A corrected model and what was done to get it."""

    method: str
    model: nn.Module
    record: dict = field(default_factory=dict)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter trainable (the original is
    untouched)."""
    m = copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def val_acc(model: nn.Module, data) -> float:
    """The model's accuracy on the validation split (what every strength is chosen on)."""
    return float(evaluate(model, data.val.x, data.val.y))


def pick(grid: list[dict]) -> int:
    """Index of the grid value with the best validation accuracy (first on ties)."""
    best = max(g["val_acc"] for g in grid)
    return next(i for i, g in enumerate(grid) if g["val_acc"] == best)


def subset(split, n_fit: int | None, seed: int = 0):
    """``(x, x_clean, mask, y)``: the first ``n_fit`` examples of a split (after a seeded
    shuffle; all when None, in order); ``x_clean`` and ``mask`` are None when the split has
    none."""
    n = split.n
    if n_fit is None or n_fit >= n:
        idx = torch.arange(n)
    else:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_fit]
    pick = (lambda t: None if t is None else t[idx])
    return split.x[idx], pick(split.x_clean), pick(split.mask), split.y[idx]


def border_region(size: int | Sequence[int] = 28, width: int = 4) -> Tensor:
    """Bool (size, size), or (H, W) for ``size=(H, W)``: the frame of ``width`` pixels around
    the image.

    MNIST digits are size-normalised into a 20×20 box and centred in the 28×28 image, so the
    4-pixel frame holds (almost) no digit ink: a prior on where an artifact may hide that needs no
    per-image annotation.
    """
    h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    r = torch.zeros(h, w, dtype=torch.bool)
    if width > 0:
        r[:width] = True
        r[-width:] = True
        r[:, :width] = True
        r[:, -width:] = True
    return r


def region_mass(attr: Tensor, region: Tensor) -> Tensor:
    """Per map: share of positive attribution inside ``region`` (region_mass with a fixed mask)."""
    a = attr if attr.dim() == 4 else attr.unsqueeze(1)
    m = region.to(a.device).expand(a.shape[0], 1, *region.shape[-2:])
    return per_image_mass(a, m)


def per_class(x: Tensor, y: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Up to ``n`` images spread over the classes (seeded)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y).tolist()
    per = max(1, n // max(len(classes), 1))
    idx = []
    for c in classes:
        where = (y == c).nonzero().flatten()
        idx.append(where[torch.randperm(len(where), generator=g)[:per]])
    idx = torch.cat(idx)
    return x[idx], y[idx]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``model`` by ``new`` (in place)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def slice_gradient(model: nn.Module, x: Tensor, layer: str | None) -> tuple[Tensor, Tensor]:
    """(∂ Σ_k log p_k / ∂z for z the slice (input when ``layer`` is None), the logits), with the
    graph kept so the gradient can be penalised (double backprop). Hooks removed on return."""
    if layer is None:
        z = x.detach().requires_grad_(True)
        logits = model(z)
    else:
        box: dict = {}

        def hook(_m, _a, o):
            box["z"] = o
            return None

        handle = get_layer(model, layer).register_forward_hook(hook)
        try:
            logits = model(x)
        finally:
            handle.remove()
        z = box["z"]
    logp = F.log_softmax(logits, dim=1)
    (g,) = torch.autograd.grad(logp.sum(), z, create_graph=True)
    return g, logits


def slice_shape(model: nn.Module, x1: Tensor, layer: str) -> tuple[int, ...]:
    """The shape of one example's activation at ``layer`` (from the example batch ``x1``)."""
    return tuple(activations(model, x1, layer).shape[1:])


def ig_maps(model: nn.Module, x: Tensor, y: Tensor, resolution: int) -> Tensor:
    """Integrated Gradients (zero baseline) of each image's label logit, channel-summed: (N, H, W)."""
    return attribute(model, x, y, "integrated_gradients", steps=resolution).sum(1).detach()


@dataclass(frozen=True)
class SharedPenalty:
    """A gradient penalty λ · weigh(∂Σ_k log p_k/∂z, idx) over the whole batch, z the slice
    ``layer`` (None: the input), as a ``forward`` for :func:`~core.methods.training.train_model`:
    called with ``(model, xb, yb, idx)`` it returns ``(logits, λ · weigh(g, idx))`` from one
    forward (the input, or the hooked slice, kept for the double backward), where an
    ``extra_loss`` would run the batch through the model a second time. The same loss, so the
    same gradients up to float rounding."""

    lam: float
    layer: str | None
    weigh: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, model: nn.Module, xb: Tensor, yb: Tensor, idx: Tensor
                 ) -> tuple[Tensor, Tensor]:
        g, logits = slice_gradient(model, xb, self.layer)
        return logits, self.lam * self.weigh(g, idx)


def fine_tune(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float,
              batch_size: int, seed: int, extra_loss=None, progress=None
              ) -> tuple[nn.Module, dict]:
    """A fine-tuned copy of ``model`` and its training history (:func:`train_model`'s).
    ``extra_loss``: None (plain cross-entropy), a :class:`SharedPenalty` (one forward per step
    serves both losses; Adam's update vectorised, the same arithmetic), or an ``extra_loss``
    function of ``train_model``. ``model`` is not changed; the copy ends in eval mode."""
    m = copy_model(model)
    shared = isinstance(extra_loss, SharedPenalty)
    hist = train_model(m, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                       device=model_device(model), extra_loss=None if shared else extra_loss,
                       forward=extra_loss if shared else None, foreach=True if shared else None,
                       progress=progress)
    return m.eval(), hist


def shares_forward(penalty_batch: int | None, batch_size: int) -> bool:
    """Whether the penalty covers the whole batch (then one forward serves both losses)."""
    return penalty_batch is None or int(penalty_batch) >= int(batch_size)


def tuned_fine_tune(label: str, model: nn.Module, data, make_loss, values: Sequence[float], *,
                    x: Tensor, y: Tensor, epochs: int, lr: float, batch_size: int, seed: int,
                    progress=None) -> tuple[nn.Module, dict, list[dict]]:
    """Fine-tune once per grid value (``make_loss(value)`` gives :func:`fine_tune`'s
    ``extra_loss``); returns the model with the best validation accuracy (first on ties), its
    history, and the grid ``[{"value", "val_acc", "final_loss", "seconds"}]``. ``label`` names
    the method in progress messages."""
    grid, best_model, best_hist = [], None, None
    for value in values:
        if progress:
            progress(f"{label}: fine-tuning with strength {value:g}")
        t = time.perf_counter()
        m, hist = fine_tune(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                            extra_loss=make_loss(value))
        acc = val_acc(m, data)
        grid.append({"value": float(value), "val_acc": acc,
                     "final_loss": float(hist["loss"][-1]) if hist["loss"] else None,
                     "seconds": time.perf_counter() - t})
        if pick(grid) == len(grid) - 1:
            best_model, best_hist = m, hist
    return best_model, best_hist, grid
