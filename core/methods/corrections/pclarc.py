"""P-ClArC (Anders et al. 2022): project the concept direction out of one layer's output.

The direction is the normalised difference of the mean activation with and without the region
(region-free twins of the training images, so the method counts as using the pixel mask); a
:class:`ConceptProjection` wrapper applies ``a' = a − v (vᵀa − vᵀz̄)`` and leaves the wrapped
layer's weights untouched. The layer is chosen on the validation split; by default the
activation module that reads each experts layer (checked on a forward, not assumed from the
module order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from core.engine.devices import eval_mode
from core.engine.influence import activations, get_layer, model_device
from core.methods.attribution import ACTIVATION_KINDS
from core.methods.corrections.common import (
    Correction,
    copy_model,
    pick,
    set_submodule,
    subset,
    val_acc,
)

__all__ = [
    "ConceptProjection",
    "activation_pairs",
    "after_activation",
    "checked_activations",
    "concept_direction",
    "correct_pclarc",
    "project_out",
]


class ConceptProjection(nn.Module):
    """Wraps a layer; projects the concept direction ``v`` out of its (flattened) output.

    ``a' = (I − vvᵀ) a + vvᵀ z̄ = a − v (vᵀa − vᵀz̄)`` per example (Anders et al. 2022, P-ClArC).
    The wrapped layer is kept as ``self.layer`` with its parameters untouched; ``v`` (unit norm)
    and ``z_bar`` are buffers, so the wrapper's state dict restores it.
    """

    def __init__(self, layer: nn.Module, v: Tensor, z_bar: Tensor):
        super().__init__()
        self.layer = layer
        v = v.detach().flatten().float()
        self.register_buffer("v", v / v.norm().clamp_min(1e-12))
        self.register_buffer("z_bar", z_bar.detach().flatten().float().clone())

    def forward(self, *args, **kwargs):
        a = self.layer(*args, **kwargs)
        flat = a.flatten(1)
        coef = flat @ self.v - torch.dot(self.v, self.z_bar)
        return (flat - coef[:, None] * self.v[None]).view_as(a)


def _activations(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    """``layer``'s output for ``x`` (no grad), flattened per example, on the CPU."""
    return activations(model, x, layer).flatten(1).cpu()


def concept_direction(model: nn.Module, x_with: Tensor, x_without: Tensor, layer: str,
                      reference: str = "clean") -> tuple[Tensor, Tensor]:
    """(v, z̄): the normalised difference of mean activations with and without the artifact, and
    the mean activation of the ``reference`` set ("clean": without the artifact, as in P-ClArC;
    "all": both sets)."""
    a_with = _activations(model, x_with, layer)
    a_without = _activations(model, x_without, layer)
    v = a_with.mean(0) - a_without.mean(0)
    v = v / v.norm().clamp_min(1e-12)
    if reference == "clean":
        z_bar = a_without.mean(0)
    elif reference == "all":
        z_bar = torch.cat([a_with, a_without]).mean(0)
    else:
        raise ValueError(f"reference must be 'clean' or 'all', not {reference!r}")
    return v, z_bar


def project_out(model: nn.Module, layer: str, v: Tensor, z_bar: Tensor) -> nn.Module:
    """A copy of ``model`` whose ``layer`` is wrapped in a :class:`ConceptProjection`."""
    out = copy_model(model)
    inner = get_layer(out, layer)
    set_submodule(out, layer, ConceptProjection(inner, v.to(model_device(out)),
                                                 z_bar.to(model_device(out))))
    return out.eval()


def correct_pclarc(model: nn.Module, data, *, layers: Sequence[str],
                   reference: str = "clean", n_fit: int | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None, **_) -> Correction:
    """P-ClArC at each candidate layer; the layer with the best validation accuracy is kept."""
    t0 = time.perf_counter()
    x, xc, _m, _y = subset(data.train, n_fit, seed)
    grid, dirs = [], {}
    for layer in layers:
        if progress:
            progress(f"P-ClArC: concept direction at {layer}")
        v, z_bar = concept_direction(model, x, xc, layer, reference)
        dirs[layer] = (v, z_bar)
        m = project_out(model, layer, v, z_bar)
        grid.append({"layer": layer, "val_acc": val_acc(m, data)})
    best = grid[pick(grid)]
    v, z_bar = dirs[best["layer"]]
    corrected = project_out(model, best["layer"], v, z_bar)
    record = {"strength": best["layer"], "strength_name": "layer", "layer": best["layer"],
              "reference": reference, "grid": grid, "seconds": time.perf_counter() - t0,
              "spec": {"wrap": "projection", "layer": best["layer"], "dim": int(v.numel())}}
    return Correction("pclarc", corrected, record)


def activation_pairs(facts: dict | None, layers: list[str]) -> list[tuple[str, str]]:
    """(layer, where P-ClArC projects) per layer: the activation module listed right after the
    layer in the model's ``facts``, else the layer itself."""
    if not facts:
        return [(layer, layer) for layer in layers]
    names, kinds = facts["layers"], facts["kinds"]
    out = []
    for layer in layers:
        i = names.index(layer) if layer in names else -1
        nxt = names[i + 1] if 0 <= i < len(names) - 1 else None
        out.append((layer, nxt if nxt is not None and kinds.get(nxt) in ACTIVATION_KINDS else layer))
    return out


def after_activation(facts: dict | None, layers: list[str]) -> list[str]:
    """The activation module right after each layer (where P-ClArC projects), else the layer."""
    return list(dict.fromkeys(act for _layer, act in activation_pairs(facts, layers)))


def _feeds(model: nn.Module, layer: str, act: str, x1: Tensor) -> bool:
    """Whether module ``act`` runs once per forward, on exactly ``layer``'s output (which runs
    once too). The module listed after a layer need not be what reads it: a residual block's
    ReLU is one module called twice, once on the sum with the skip. Hooks removed on return."""
    seen: dict = {"layer": [], "act": []}
    handles = [get_layer(model, layer).register_forward_hook(
        lambda _m, _a, o: seen["layer"].append(o)),
        get_layer(model, act).register_forward_pre_hook(
        lambda _m, a: seen["act"].append(a[0] if a else None))]
    try:
        with eval_mode(model), torch.no_grad():
            model(x1.to(model_device(model)))
    except Exception:  # noqa: BLE001 — unverifiable: project at the layer itself
        return False
    finally:
        for h in handles:
            h.remove()
    return (len(seen["layer"]) == 1 and len(seen["act"]) == 1
            and seen["act"][0] is seen["layer"][0])


def checked_activations(model: nn.Module, pairs: list[tuple[str, str]], x1: Tensor
                         ) -> list[str]:
    """P-ClArC's layers: each pair's activation when :func:`_feeds` confirms it reads the layer,
    else the layer itself (deduplicated, in order)."""
    out = [act if act == layer or _feeds(model, layer, act, x1) else layer
           for layer, act in pairs]
    return list(dict.fromkeys(out))

