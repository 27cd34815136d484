"""Expert suppression: damp the experts that carry a border shortcut, found without a pixel mask.

Class experts of a layer (distributional influence) are ranked by how much of their
interpretation falls on the image border (a location prior: where the object is not); the top n
are damped by ``d``. In a plain conv / dense chain the scale is folded into the next layer's
incoming weights (exactly the unit's activation × d); anywhere else (a residual block, a nested
layer, BatchNorm after it) the layer is wrapped in a :class:`UnitScale` that multiplies those
output channels by d. (layer, n, d) is chosen on the validation split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from core.engine.distributions import PointDoI
from core.engine.experts import experts as rank_experts
from core.engine.experts import interpret
from core.engine.influence import get_layer, model_device
from core.engine.quantities import ClassQoI
from core.methods.corrections.common import (
    Correction,
    border_region,
    copy_model,
    per_class,
    pick,
    region_mass,
    set_submodule,
    subset,
    val_acc,
)

__all__ = [
    "UnitScale",
    "correct_suppression",
    "find_shortcut_units",
    "suppress",
    "suppression_spec",
]


def find_shortcut_units(model: nn.Module, x: Tensor, y: Tensor, layer: str, *,
                        candidates: int = 3, n_images: int = 50, resolution: int = 12,
                        border: int = 4, classes: Sequence[int] | None = None) -> list[dict]:
    """Rank ``layer``'s units by how much they carry a border shortcut, without the pixel mask.

    1. For every class c, the ``candidates`` top experts of ``layer`` by distributional influence
       on ``ClassQoI(c)`` over the class-c images (point DoI, spatial sum).
    2. Each candidate is interpreted (Integrated Gradients of its activation at the input, zero
       baseline) on ``n_images`` images spread over the classes; its ``border_mass`` is the mean
       share of positive attribution on the image border (:func:`border_region`).

    Returns one dict per candidate, sorted by ``border_mass`` (largest first):
    ``{"unit", "border_mass", "influence" (its best class score), "classes": [c, ...]}``.
    """
    dev = model_device(model)
    classes = sorted(torch.unique(y).tolist()) if classes is None else list(classes)
    found: dict[int, dict] = {}
    for c in classes:
        xc = x[y == c].to(dev)
        if len(xc) == 0:
            continue
        ranking = rank_experts(model, xc, layer, ClassQoI(int(c)), PointDoI(), k=candidates)
        for e in ranking.experts:
            d = found.setdefault(int(e.unit), {"unit": int(e.unit), "influence": e.score,
                                               "classes": []})
            d["classes"].append(int(c))
            d["influence"] = max(d["influence"], float(e.score))
    images, _ = per_class(x, y, n_images)
    images = images.to(dev)
    region = border_region(tuple(images.shape[-2:]), border)
    for d in found.values():
        maps = interpret(model, images, layer, d["unit"], resolution=resolution)
        mass = region_mass(maps.detach().sum(1, keepdim=True), region)
        ok = torch.isfinite(mass)
        d["border_mass"] = float(mass[ok].mean()) if ok.any() else 0.0
    return sorted(found.values(), key=lambda d: -d["border_mass"])


def _next_consumer(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """The parametrised layer that reads ``layer``'s units (DecoyCNN: conv1→conv2, conv2→fc1,
    fc1→fc2). Only ReLU / max-pool / flatten may lie between (they commute with a scale d ≥ 0)."""
    names = [n for n, _ in model.named_children()]
    if layer not in names:
        raise ValueError(f"suppression needs a top-level layer of the model, not {layer!r}; "
                         f"valid: {', '.join(names)}")
    modules = dict(model.named_children())
    for name in names[names.index(layer) + 1:]:
        m = modules[name]
        if isinstance(m, nn.Conv2d | nn.Linear):
            return name, m
        if not isinstance(m, nn.ReLU | nn.MaxPool2d | nn.Flatten | nn.Identity):
            raise ValueError(f"cannot fold a unit scale through {type(m).__name__} ({name!r})")
    raise ValueError(f"layer {layer!r} has no parametrised layer after it to fold the scale into")


class UnitScale(nn.Module):
    """Wraps a layer; multiplies the chosen units of its output by ``damping``.

    A unit is a channel (dim 1) of the output, as for the experts (a conv map's channel, a flat
    layer's neuron). The wrapped layer is kept as ``self.layer`` with its parameters untouched;
    ``units`` and ``damping`` are buffers, so the wrapper survives ``state_dict`` and deepcopy.
    The product is taken out of place, so an in-place activation after the layer (or inside it)
    does not disturb autograd. Returns the scaled output from ``forward``.
    """

    def __init__(self, layer: nn.Module, units: Sequence[int], damping: float):
        super().__init__()
        self.layer = layer
        self.register_buffer("units", torch.tensor([int(u) for u in units], dtype=torch.long))
        self.register_buffer("damping", torch.tensor(float(damping)))

    def forward(self, *args, **kwargs):
        a = self.layer(*args, **kwargs)
        if not isinstance(a, Tensor) or a.dim() < 2:
            raise ValueError(f"suppression needs a layer whose output is a (N, units, …) tensor, "
                             f"got {type(a).__name__}")
        n = a.shape[1]
        if self.units.numel() and int(self.units.max()) >= n:
            bad = [int(u) for u in self.units if int(u) >= n]
            raise ValueError(f"units {bad} out of range for a layer with {n} units")
        scale = torch.ones(n, dtype=a.dtype, device=a.device)
        scale[self.units.to(a.device)] = self.damping.to(device=a.device, dtype=a.dtype)
        return a * scale.view(1, n, *([1] * (a.dim() - 2)))


def _n_units_of(module: nn.Module) -> int | None:
    """A layer's unit count when its type says it (conv / dense / batch norm), else None."""
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        return int(module.num_features)
    return None


def _fold_plan(model: nn.Module, layer: str) -> tuple[nn.Module, int] | str:
    """(next layer, unit count) when a unit scale of ``layer`` folds exactly into the next layer's
    weights (a top-level Conv2d / Linear followed, through ReLU / max-pool / flatten only, by an
    ungrouped Conv2d reading all its channels or a Linear reading them in equal blocks); else the
    reason it does not (then the scale is applied to the layer's output, :class:`UnitScale`)."""
    src = get_layer(model, layer)
    if not isinstance(src, nn.Conv2d | nn.Linear):
        return f"{layer!r} is a {type(src).__name__}, not a Conv2d or Linear"
    n_units = _n_units_of(src)
    try:
        _, nxt = _next_consumer(model, layer)
    except ValueError as exc:
        return str(exc)
    if isinstance(nxt, nn.Conv2d):
        if nxt.groups != 1 or nxt.in_channels != n_units:
            return f"the next conv reads {nxt.in_channels} channels in {nxt.groups} group(s)"
    elif isinstance(src, nn.Conv2d):
        if nxt.in_features % n_units:
            return f"the next dense layer's {nxt.in_features} inputs are not {n_units} blocks"
    elif nxt.in_features != n_units:
        return f"the next dense layer reads {nxt.in_features} inputs, not {n_units}"
    return nxt, n_units


def _fold(nxt: nn.Module, src: nn.Module, n_units: int, units: list[int], damping: float) -> None:
    """Scale ``nxt``'s incoming weights of ``units`` by ``damping`` in place."""
    with torch.no_grad():
        w = nxt.weight
        if isinstance(nxt, nn.Conv2d):
            w[:, units] *= damping
        elif isinstance(src, nn.Conv2d):  # conv → (pool, flatten) → linear: channel blocks
            per = w.shape[1] // n_units
            for u in units:
                w[:, u * per:(u + 1) * per] *= damping
        else:
            w[:, units] *= damping


def _scaled(model: nn.Module, layer: str, units: list[int], damping: float) -> nn.Module:
    """A copy of ``model`` whose ``layer`` is wrapped in a :class:`UnitScale`."""
    out = copy_model(model)
    inner = get_layer(out, layer)
    set_submodule(out, layer, UnitScale(inner, units, damping).to(model_device(out)))
    return out.eval()


def _agree(a: nn.Module, b: nn.Module, probe: Tensor) -> bool:
    """Whether two models give the same logits on ``probe`` (to 1e-4 of their scale)."""
    with torch.no_grad():
        la = a(probe.to(model_device(a)))
        lb = b(probe.to(model_device(b)))
    if not (isinstance(la, Tensor) and isinstance(lb, Tensor)) or la.shape != lb.shape:
        return False
    tol = 1e-4 * (1.0 + float(la.abs().max())) if la.numel() else 0.0
    return bool(torch.allclose(la, lb, rtol=0.0, atol=tol))


def suppress(model: nn.Module, layer: str, units: Sequence[int], damping: float = 0.0, *,
             probe: Tensor | None = None) -> nn.Module:
    """A copy of ``model`` where ``layer``'s ``units`` act with their activation × ``damping``.

    Returns the copy; ``model`` is not mutated. Two ways, same function:

    * **folded** (a plain chain, DecoyCNN): the next layer's incoming weights of those units are
      scaled (a conv's input channels, or a dense layer's columns; for conv → dense through a
      flatten, the columns of the unit's spatial block). Because ReLU and max-pooling commute
      with a scale d ≥ 0, the network computes exactly what it would with the units' outputs
      multiplied by d; every other weight is unchanged and the copy is the same architecture.
    * **output scale** (anything else: a residual block, a nested layer, BatchNorm or a grouped
      conv after it, no next layer): ``layer`` is wrapped in a :class:`UnitScale` that multiplies
      those output channels by d (its state dict has the wrapper's ``units`` and ``damping``
      buffers; :func:`build_corrected` rebuilds it from the record's spec).

    With ``probe`` (a few inputs) the fold is checked against the output scale and dropped for it
    when they disagree (a forward that does not follow the children's order, e.g. a skip).
    """
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0 (ReLU commutes only with non-negative scales), "
                         f"got {damping}")
    units = [int(u) for u in units]
    n_units = _n_units_of(get_layer(model, layer))
    if n_units is not None:
        bad = [u for u in units if not 0 <= u < n_units]
        if bad:
            raise ValueError(f"units {bad} out of range for layer {layer!r} with {n_units} units")
    elif any(u < 0 for u in units):
        raise ValueError(f"units {[u for u in units if u < 0]} out of range for layer {layer!r}")
    plan = _fold_plan(model, layer)
    if isinstance(plan, str):
        return _scaled(model, layer, units, damping)
    out = copy_model(model)
    _fold(get_layer(out, _next_consumer(out, layer)[0]), get_layer(out, layer), plan[1], units,
          damping)
    if probe is not None and not _agree(out, _scaled(model, layer, units, damping), probe):
        return _scaled(model, layer, units, damping)
    return out


def suppression_spec(corrected: nn.Module, layer: str, units: Sequence[int], damping: float
                      ) -> dict | None:
    """How :func:`suppress` built ``corrected``, for :func:`build_corrected`: None when folded
    into the weights (the same architecture), else ``{"wrap": "scale", "layer", "units",
    "damping"}``."""
    if isinstance(get_layer(corrected, layer), UnitScale):
        return {"wrap": "scale", "layer": layer, "units": [int(u) for u in units],
                "damping": float(damping)}
    return None


def correct_suppression(model: nn.Module, data, *, layers: Sequence[str],
                        n_units=(1, 2, 4), damping=(0.0,), candidates: int = 3,
                        n_images: int = 50, resolution: int = 12, border: int = 4,
                        n_fit: int | None = None, seed: int = 0,
                        progress: Callable[[str], None] | None = None, **_) -> Correction:
    """Find border-shortcut experts per layer (mask-free), damp the top n, pick (layer, n, d) on
    the validation split. Returns the :class:`Correction`; its record's ``spec`` is None when the
    damping was folded into the next layer's weights, else the :class:`UnitScale` wrapper's
    (``applied`` says "output scale" then)."""
    t0 = time.perf_counter()
    x, _xc, _m, y = subset(data.train, n_fit, seed)
    probe = x[:16]  # checks a fold against the output scale (a forward the children don't tell)
    grid, ranked = [], {}
    for layer in layers:
        if progress:
            progress(f"suppression: finding the shortcut experts of {layer}")
        ranked[layer] = find_shortcut_units(model, x, y, layer, candidates=candidates,
                                            n_images=n_images, resolution=resolution,
                                            border=border)
        for n in n_units:
            units = [d["unit"] for d in ranked[layer][:n]]
            if len(units) < n:
                continue
            for d in damping:
                m = suppress(model, layer, units, d, probe=probe)
                grid.append({"layer": layer, "n_units": n, "damping": float(d), "units": units,
                             "val_acc": val_acc(m, data)})
    if not grid:
        raise ValueError("suppression: no candidate experts found")
    best = grid[pick(grid)]
    corrected = suppress(model, best["layer"], best["units"], best["damping"], probe=probe)
    spec = suppression_spec(corrected, best["layer"], best["units"], best["damping"])
    record = {"strength": best["damping"], "strength_name": "damping", "layer": best["layer"],
              "units": best["units"], "n_units": best["n_units"], "grid": grid,
              "candidates": {k: [{kk: (vv if not isinstance(vv, float) else round(vv, 6))
                                  for kk, vv in d.items()} for d in v] for k, v in ranked.items()},
              "seconds": time.perf_counter() - t0, "spec": spec}
    if spec is not None:
        record["applied"] = "output scale"
    return Correction("suppression", corrected, record)

