"""Attribution methods: the representations the report compares, each one configuration of the
one influence engine (a slice, a quantity, a distribution of interest, a multiplier, then at most
a small post-processing step). :func:`attribute` computes any of them by name; the
representations stage (:mod:`core.stages.representations`) measures them, and the corrections
measure their models' Integrated Gradients with it. The table and the exact post-processing are in
:mod:`core.stages.representations`'s docstring (DESIGN §1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.engine.distributions import Distribution, GaussianDoI, LinearDoI, PointDoI
from core.engine.experts import experts as rank_experts
from core.engine.experts import interpret
from core.engine.influence import activations, influence, model_device
from core.engine.quantities import ClassQoI

__all__ = [
    "METHODS",
    "METRIC_KEYS",
    "Method",
    "NoiseDoI",
    "attribute",
    "layer_activation",
    "method_table",
    "smoothgrad_noise",
]


# ---------------------------------------------------------------------------------------------
# Distributions used by the configurations


class NoiseDoI(Distribution):
    """x + noise[n, r]: the Gaussian DoI with its draws given explicitly, shape (N, R, *x shape).

    Lets SmoothGrad use exactly the noise another implementation drew (Captum's NoiseTunnel draws
    ``torch.normal(0, σ)`` over ``x.repeat_interleave(R, 0)``: pass that tensor viewed (N, R, …)).
    """

    def __init__(self, noise: Tensor):
        if noise.dim() < 2:
            raise ValueError(f"noise must be (N, R, ...), got shape {tuple(noise.shape)}")
        self.noise = noise
        self.resolution = int(noise.shape[1])

    def points(self, z: Tensor, n: Tensor, r: Tensor) -> Tensor:
        eps = self.noise.to(z.device, z.dtype)[n.to(self.noise.device), r.to(self.noise.device)]
        return z + eps

    def __repr__(self) -> str:
        return f"NoiseDoI(resolution={self.resolution})"


class _Reindexed(Distribution):
    """A DoI seen through a map from the engine's batch index to the caller's example index.

    ``attribute`` runs one engine call per target class on a subset of the examples; seeded or
    explicit noise must still follow each example's index in the caller's batch, so the maps do not
    depend on how the examples were grouped.
    """

    def __init__(self, doi: Distribution, index: Tensor):
        self.doi, self.index = doi, index
        self.resolution, self.at = doi.resolution, doi.at
        if hasattr(doi, "baseline_at"):
            self.baseline_at = doi.baseline_at

    def points(self, z: Tensor, n: Tensor, r: Tensor) -> Tensor:
        return self.doi.points(z, self.index.to(n.device)[n], r)

    def baseline(self, z: Tensor, n: Tensor | None = None) -> Tensor | None:
        # a per-example baseline follows the caller's index too
        return self.doi.baseline(z, None if n is None else self.index.to(n.device)[n])

    def weights(self) -> Tensor | None:
        return self.doi.weights()

    def __repr__(self) -> str:
        return repr(self.doi)


def smoothgrad_noise(n: int, shape: tuple[int, ...], *, samples: int, stdev: float,
                     seed: int = 0) -> Tensor:
    """The (n, samples, *shape) noise SmoothGrad uses by default: ``GaussianDoI(samples, stdev,
    seed).noise(shape, i)`` for example i (seeded per example, independent of batching)."""
    doi = GaussianDoI(samples, stdev, seed)
    return torch.stack([doi.noise(tuple(shape), i) for i in range(n)]) * stdev


# ---------------------------------------------------------------------------------------------
# Methods


def _point(opts: dict) -> Distribution:
    return PointDoI()


def _linear(opts: dict) -> Distribution:
    return LinearDoI(int(opts["steps"]), baseline=opts.get("baseline"))


def _gaussian(opts: dict) -> Distribution:
    if opts.get("noise") is not None:
        return NoiseDoI(opts["noise"])
    return GaussianDoI(int(opts["samples"]), float(opts["stdev"]), int(opts["seed"]))


def _class_doi(opts: dict) -> Distribution:
    r = int(opts.get("path_resolution") or 0)
    return LinearDoI(r) if r > 0 else PointDoI()


@dataclass(frozen=True)
class Method:
    """One representation as an engine configuration (strings describe it for the report)."""

    name: str
    label: str
    slice: str  # "input", or what the layer is (``options["layer"]`` names it; see ``row``)
    qoi: str
    doi: str
    multiplier: str
    post: str
    description: str
    make_doi: Callable[[dict], Distribution] = field(repr=False, compare=False, default=_point)
    multiply: bool = False
    per_example: bool = True  # False: the DoI is a class-conditional set of reference images
    defaults: dict = field(default_factory=dict, compare=False)

    def options(self, given: dict) -> dict:
        unknown = set(given) - set(self.defaults) - {"noise", "reference", "batch_size"}
        if unknown:
            valid = ", ".join(sorted(set(self.defaults) | {"batch_size"})) or "none"
            raise ValueError(f"unknown option(s) {sorted(unknown)} for {self.name!r}; valid: {valid}")
        return {**self.defaults, **given}

    def row(self, options: dict | None = None) -> dict:
        """The DESIGN §1 table row, as strings (what the page shows); ``slice`` is the layer the
        ``options`` name (the one a build resolved for its model) when they name one."""
        layer = (options or {}).get("layer")
        return {"method": self.name, "label": self.label,
                "slice": str(layer) if layer and self.slice != "input" else self.slice,
                "qoi": self.qoi,
                "doi": self.doi, "multiplier": self.multiplier, "post": self.post,
                "description": self.description}


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("saliency", "Saliency", "input", "class y", "point", "—", "—",
           "The gradient of the class logit at the input (Simonyan et al. 2014), signed.",
           _point),
    Method("gradient_x_input", "Gradient × input", "input", "class y", "point", "x", "—",
           "The input gradient times the input (Shrikumar et al. 2016).", _point, multiply=True),
    Method("integrated_gradients", "Integrated Gradients", "input", "class y",
           "linear path from black, Riemann midpoints", "x − x'", "—",
           "The input gradient averaged along the straight path from a black baseline, times "
           "(x − x') (Sundararajan et al. 2017).", _linear, multiply=True,
           defaults={"steps": 32, "baseline": None}),
    Method("smoothgrad", "SmoothGrad", "input", "class y", "Gaussian around x (seeded)", "—", "—",
           "The input gradient averaged over Gaussian perturbations of the input (Smilkov et al. "
           "2017).", _gaussian, defaults={"samples": 32, "stdev": 0.15, "seed": 0}),
    Method("gradcam", "Grad-CAM", "last convolution's activation", "class y", "point", "activation z",
           "channel weights = spatial mean of influence; Σ_c w_c z_c, ReLU, bilinear upsampling",
           "Class-activation map of the last convolutional layer (Selvaraju et al. 2017).",
           _point, defaults={"layer": None}),
    Method("internal_influence", "Internal influence (experts)", "an experts layer", "class y",
           "training images of class y (optionally × linear path)", "optional (× path)",
           "top-k experts' interpretations (IG of each unit), weighted by influence",
           "Leino et al. 2018: the class-conditional distributional influence picks the layer's "
           "expert units; their interpretations on the image, weighted by influence, form the map.",
           _class_doi, per_example=False,
           defaults={"layer": None, "k": 3, "resolution": 8, "path_resolution": 0}),
]}

# the activation modules a layer's output may pass through first (Grad-CAM and P-ClArC read
# the activation after a convolution, not its pre-activation)
ACTIVATION_KINDS = ("ReLU", "PReLU", "LeakyReLU", "GELU", "SiLU", "ELU", "Hardswish", "Tanh")


def gradcam_layer(names: list[str], kinds: dict[str, str]) -> str | None:
    """Grad-CAM's layer for a model whose ``named_modules()`` names (in registration order) and
    class names are ``names`` and ``kinds``: the activation module right after the last
    convolution, else that convolution; None when the model has no convolution."""
    convs = [i for i, n in enumerate(names) if kinds.get(n, "").startswith("Conv")]
    if not convs:
        return None
    nxt = names[convs[-1] + 1] if convs[-1] + 1 < len(names) else None
    return nxt if nxt is not None and kinds.get(nxt, "") in ACTIVATION_KINDS else names[convs[-1]]


def _layer_of(model: nn.Module, meth: Method, opts: dict) -> str | None:
    """The slice's layer: None for input methods; the ``layer`` option; Grad-CAM's default
    (:func:`gradcam_layer` of the model) when unset. Raises ValueError for internal influence
    without a layer (no model-independent default: it is the case's experts layer)."""
    if meth.slice == "input":
        return None
    if opts.get("layer"):
        return str(opts["layer"])
    if meth.name == "gradcam":
        mods = list(model.named_modules())
        layer = gradcam_layer([n for n, _ in mods], {n: type(m).__name__ for n, m in mods})
        if layer is not None:
            opts["layer"] = layer
            return layer
        raise ValueError("Grad-CAM needs a convolutional layer; this model has none")
    raise ValueError(f"{meth.name!r} needs layer= (a layer name of the model, e.g. its experts "
                     "layer)")

METRIC_KEYS = ("region_mass", "wrong_reason", "rank_accuracy", "deletion_auc", "insertion_auc",
               "mprt_spearman", "sparseness")


def method_table() -> list[dict]:
    """Every method's engine configuration as strings (DESIGN §1 rows)."""
    return [m.row() for m in METHODS.values()]


# ---------------------------------------------------------------------------------------------
# Computing maps


def layer_activation(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    """The output of ``layer`` on ``x`` (eval mode, no graph): :func:`core.engine.influence.activations`."""
    return activations(model, x, layer)


def _targets(y, n: int, device) -> Tensor:
    t = torch.as_tensor(y, device=device).long().reshape(-1)
    if t.numel() == 1 and n != 1:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"y must give one target class per example ({n}), got shape {tuple(t.shape)}")
    return t


def _gradcam(model, x, chi, opts) -> Tensor:
    act = layer_activation(model, x, opts["layer"])
    if act.dim() != 4:
        raise ValueError(f"Grad-CAM needs a convolutional layer (N, C, h, w); {opts['layer']!r} "
                         f"gives {tuple(act.shape)}")
    weights = chi.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True))
    return F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear")


def _internal(model, x, c: int, ref: Tensor, opts: dict, batch_size) -> tuple[Tensor, dict]:
    layer = opts["layer"]
    doi = _class_doi(opts)
    ranking = rank_experts(model, ref, layer, ClassQoI(c), doi, k=int(opts["k"]), reduce="sum",
                           multiply=int(opts.get("path_resolution") or 0) > 0,
                           batch_size=batch_size)
    units = ranking.units
    scores = torch.tensor([e.score for e in ranking.experts], dtype=x.dtype)
    weights = scores.clamp(min=0)
    if weights.sum() <= 0:
        weights = torch.ones_like(scores)
    weights = weights / weights.sum()
    out = torch.zeros_like(x)
    for u, w in zip(units, weights.tolist(), strict=True):
        out += w * interpret(model, x, layer, u, reduce="sum", resolution=int(opts["resolution"]),
                             batch_size=batch_size)
    return out, {"class": c, "units": units, "scores": scores.tolist(),
                 "weights": weights.tolist()}


def attribute(model: nn.Module, x: Tensor, y, method: str | Method, *, reference=None,
              return_info: bool = False, **options) -> Tensor:
    """The ``method``'s attribution maps of the target classes ``y`` on ``x``: (N, C, H, W).

    Args:
        model: a classifier (evaluated in eval mode by the engine, mode restored).
        x: (N, C, H, W) inputs. y: target class per example (int or (N,) ints).
        method: a key of :data:`METHODS` (or a :class:`Method`).
        reference: for ``internal_influence``, ``(x_ref, y_ref)``: the images whose class-c subset
            is the distribution of interest for target class c. Default: the explained images.
        options: the method's options (``METHODS[name].defaults``): ``steps``/``baseline`` (IG),
            ``samples``/``stdev``/``seed`` or explicit ``noise`` (N, samples, C, H, W)
            (SmoothGrad), ``layer`` (Grad-CAM, internal influence), ``k``/``resolution``/
            ``path_resolution`` (internal influence), ``batch_size`` (engine chunking).
        return_info: also return a dict (internal influence: each class's experts and weights).
    """
    meth = METHODS[method] if isinstance(method, str) else method
    if not isinstance(meth, Method):
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    opts = meth.options(options)
    batch_size = opts.pop("batch_size", None)
    dev = model_device(model)
    x = x.detach().to(dev).float()
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    y = _targets(y, len(x), dev)
    noise = opts.get("noise")
    if noise is not None and (noise.dim() < 2 or noise.shape[0] != len(x)):
        raise ValueError(f"noise must be (N={len(x)}, samples, ...), got {tuple(noise.shape)}")
    if meth.make_doi is _gaussian and noise is None:
        # the seeded GaussianDoI's draws, made once per example (same values as GaussianDoI's own
        # per-chunk draws, without redrawing every example's noise in each chunk)
        opts["noise"] = smoothgrad_noise(len(x), tuple(x.shape[1:]), samples=int(opts["samples"]),
                                         stdev=float(opts["stdev"]), seed=int(opts["seed"])).to(dev)
    layer = _layer_of(model, meth, opts)
    out = torch.zeros_like(x)
    info: dict = {"classes": []}
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        xc = x[idx]
        if meth.per_example:
            doi = _Reindexed(meth.make_doi(opts), idx)
            chi = influence(model, xc, layer, ClassQoI(c), doi, per_input=True,
                            multiply=meth.multiply, batch_size=batch_size)
            maps = _gradcam(model, xc, chi, opts) if meth.name == "gradcam" else chi
        else:
            if reference is None:
                ref = xc
            else:
                rx, ry = reference
                ry = torch.as_tensor(ry).reshape(-1)
                ref = rx[(ry == c).nonzero().flatten().to(rx.device)].to(dev).float()
                if len(ref) == 0:
                    raise ValueError(f"no reference images of class {c} for {meth.name!r}")
            maps, cls_info = _internal(model, xc, c, ref, opts, batch_size)
            info["classes"].append(cls_info)
        out[idx] = maps.to(out.dtype)
    return (out, info) if return_info else out
