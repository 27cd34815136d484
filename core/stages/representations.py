"""The representations the report compares, each one a configuration of the one influence engine.

Every method below is a row of DESIGN §1: a slice, a quantity (the logit of the example's target
class, ``ClassQoI(y)``), a distribution of interest and a multiplier, then at most a small
post-processing step. None re-implements a gradient: each calls :func:`core.engine.influence.influence`
(directly, or through :func:`core.engine.experts.experts` / :func:`core.engine.experts.interpret`).

==========================  =========  ==================================  ================  =========
method                      slice      DoI (per example x)                 multiplier        post
==========================  =========  ==================================  ================  =========
``saliency``                input      point                               —                 —
``gradient_x_input``        input      point                               x                 —
``integrated_gradients``    input      linear from a baseline (midpoints)  x − x'            —
``smoothgrad``              input      Gaussian around x (seeded)          —                 —
``gradcam``                 last conv  point                               —                 Grad-CAM
``internal_influence``      experts    the training images of class y      —                 experts
==========================  =========  ==================================  ================  =========

Exactly what the two post-processed methods compute (y the example's target class):

- **Grad-CAM** (Selvaraju et al. 2017): χ = influence at the output of ``layer`` (default: the
  activation module right after the model's last convolution, A —
  :func:`core.methods.attribution.gradcam_layer`; ``relu2`` on DecoyMNIST's net) of
  ``ClassQoI(y)`` over the point DoI, per example, shape (C, h, w). Channel weights w_c = mean
  over (h, w) of χ_c; the map is
  ReLU(Σ_c w_c A_c), upsampled to the input's H × W by bilinear interpolation
  (``F.interpolate(..., mode="bilinear")``, align_corners False: Captum's
  ``LayerAttribution.interpolate(..., "bilinear")``). Equal to Captum
  ``LayerGradCam(model, layer).attribute(x, target=y, relu_attributions=True)`` then that
  interpolation.
- **Internal influence** (Leino et al. 2018): for each target class c, the class-conditional
  distributional influence χ_c = E_{x ∼ P_c}[∂y_c/∂z] at ``layer`` (in the case study: the
  case's headline experts layer, ``experts.primary_layer``; no model-free default), where P_c is
  the empirical distribution of the *reference* images of class c (in the case study: the first
  ``n_reference`` training images of c, with whatever shortcut they carry; without references, the explained
  images of class c themselves); with ``path_resolution = R > 0`` each reference image is
  replaced by its linear path from black (R midpoints) and χ is multiplied by (z − z')
  ("class images × path", attribution space). A unit's score s_u is the sum of its channel's
  spatial map (a neuron's own value for a dense layer); the experts are the ``k`` units with the
  largest s_u
  (:func:`core.engine.experts.experts`, ``by="value"``). Each expert u is interpreted on the explained
  image x by :func:`core.engine.experts.interpret`: Integrated Gradients of the unit's summed activation
  (``UnitQoI(layer, u, "sum")``, linear DoI from black with ``resolution`` midpoints, × x). The map
  is the influence-weighted mean of the k interpretations, Σ_u max(s_u, 0)·I_u(x) / Σ_u max(s_u, 0)
  (the plain mean when no expert has a positive score). IG being linear in the quantity, this is
  also IG of the influence-weighted sum of the experts' activations.

  Why DecoyMNIST's headline layer is ``fc1`` (measured once on the full case, 100 decoy test
  images, k = 3, the labels as targets): the dense layer's experts separate the models — decoy
  mass 0.17 on vanilla vs 0.03 on clean, deletion AUC 0.05 — while ``conv2``'s pre-ReLU experts
  gave maps mostly negative on
  the digit (decoy mass 0.17 vs 0.13, deletion AUC 0.46) and ``relu2``'s did not separate the
  models (0.07 vs 0.07). Any named layer can be chosen with ``layer=``.

``attribute(model, x, y, method, **options) -> (N, C, H, W)`` computes any of them; examples are
grouped by target class so each engine call has one ``ClassQoI``. ``build`` computes every
method's maps and metrics for the case study's models (see its docstring for the payload).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from core.engine.influence import eval_mode, model_device
from core.methods import metrics as M
from core.methods.attribution import (
    METHODS,
    METRIC_KEYS,
    Method,
    NoiseDoI,
    attribute,
    gradcam_layer,
    layer_activation,
    method_table,
    smoothgrad_noise,
)
from core.stages.base import Stage, StageContext

STAGE = Stage("representations", reads=("data", "models", "experts"),
              sections=("representations", "experts"), inputs=("seeds", "roles", "device"),
              plain_payload=False,
              quick={"n_images": 16, "n_mprt": 4, "n_reference": 16, "n_steps": 12,
                     "mprt_points": 3,
                     "options": {"integrated_gradients": {"steps": 16},
                                 "smoothgrad": {"samples": 16},
                                 "internal_influence": {"resolution": 4}}})

__all__ = [
    "METHODS",
    "METRIC_KEYS",
    "Method",
    "NoiseDoI",
    "attribute",
    "build",
    "layer_activation",
    "method_table",
    "smoothgrad_noise",
]


# ---------------------------------------------------------------------------------------------
# The case-study stage


DEFAULTS = {
    "n_images": 100,  # headline evaluation images (DecoyMNIST: the decoy test) every metric averages
    "n_display": 8,  # of those, the first ones whose maps the page shows
    "n_mprt": 24,  # of those, the first ones the randomisation test uses (its cost × layers + 1)
    "n_reference": 50,  # training images per class: internal influence's class-conditional DoI
    "target": "label",  # explain the true class ("label") or the model's prediction ("prediction")
    "methods": list(METHODS),
    "models": None,  # None: the case's model under study and its reference
    # also every corrected model the corrections stage already holds (its models are not part of
    # this stage's cache key, so a rebuilt corrections stage needs a forced rebuild here)
    "corrections": False,
    "seed": 0,
    "step": None,  # pixels per deletion/insertion step (None: the image width, one row's worth)
    # points on each deletion/insertion curve past the first (None: as ``step`` gives); sets
    # step = ceil(H·W / n_steps) when ``step`` is not set (``step`` wins when both are)
    "n_steps": None,
    # images explained after each of these many cut points of MPRT's cascade (None: after every
    # layer); the layers are re-initialised in the same order either way, so the last point
    # (``mprt_spearman``) is the same
    "mprt_points": None,
    "batch_size": 1024,  # (input, DoI point) pairs per engine chunk
    "options": {},  # per-method option overrides, e.g. {"integrated_gradients": {"steps": 64}}
}


def check_config(section: dict, where: str = "config") -> dict:
    """``[representations]`` over :data:`DEFAULTS`; one-line ``ValueError`` for an unknown key,
    method or option, or a value out of bounds. Returns the merged settings."""
    sec = dict(section or {})
    unknown_keys = sorted(set(sec) - set(DEFAULTS))
    if unknown_keys:
        raise ValueError(f"{where}: unknown key(s) {unknown_keys} in [representations]; valid: "
                         f"{', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **sec}
    if not isinstance(out["options"], dict):
        raise ValueError(f"{where}: representations.options must be a table of method tables")
    bad = sorted(set(out["options"]) - set(METHODS))
    if bad:
        raise ValueError(f"{where}: representations.options names unknown method(s) {bad}")
    for meth, opts in out["options"].items():
        if not isinstance(opts, dict):
            raise ValueError(f"{where}: representations.options.{meth} must be a table")
        METHODS[meth].options(opts)  # unknown options raise
    if out["target"] not in ("label", "prediction"):
        raise ValueError(f"{where}: representations.target must be 'label' or 'prediction', "
                         f"not {out['target']!r}")
    if not isinstance(out["methods"], list) or not out["methods"]:
        raise ValueError(f"{where}: representations.methods must be a non-empty list")
    unknown = [m for m in out["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"{where}: representations.methods has unknown method(s) {unknown}; "
                         f"valid: {', '.join(METHODS)}")
    bounds = {"n_images": (1, 10000), "n_display": (0, 64), "n_mprt": (1, 1000),
              "n_reference": (1, 10000), "batch_size": (1, 1 << 20)}
    for key, (lo, hi) in bounds.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{where}: representations.{key} must be an integer in {lo}–{hi}, "
                             f"got {v!r}")
    for key, hi in (("step", 1 << 20), ("n_steps", 10000), ("mprt_points", 10000)):
        v = out[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi):
            raise ValueError(f"{where}: representations.{key} must be an integer in 1–{hi} "
                             f"(or unset), got {v!r}")
    if out["models"] is not None and (not isinstance(out["models"], list) or not all(
            isinstance(m, str) for m in out["models"])):
        raise ValueError(f"{where}: representations.models must be a list of model names")
    return out


def curve_step(cfg: dict, hw: tuple[int, int]) -> int:
    """Pixels per deletion/insertion step for images of size ``hw`` under the settings ``cfg``:
    ``step`` when set, else ceil(H·W / ``n_steps``) when that is set, else the image width (one
    row's worth, H steps per curve)."""
    if cfg.get("step"):
        return int(cfg["step"])
    if cfg.get("n_steps"):
        return max(1, -(-hw[0] * hw[1] // int(cfg["n_steps"])))
    return int(hw[1])


def _case_layers(ctx: StageContext) -> dict:
    """Defaults that depend on the case's model: Grad-CAM at the activation after the last
    convolution (the last convolution itself when no activation follows it); internal influence
    at the case's headline experts layer (``experts.primary_layer``, else the last of
    ``experts.layers``)."""
    out = {}
    facts = ctx.model_facts()
    layer = gradcam_layer(facts["layers"], facts["kinds"]) if facts else None
    if layer is not None:
        out["gradcam"] = {"layer": layer}
    e = ctx.experts
    if e.get("layers"):
        out["internal_influence"] = {"layer": e.get("primary_layer") or e["layers"][-1]}
    return out


def _corrected_models(ctx: StageContext) -> list[str]:
    """The corrected models of the corrections artifact, when the context holds it (a script's
    context may; the pipeline builds this stage before the corrections, so its key never
    depends on them)."""
    if "corrections" not in ctx.reads:
        return []
    payload = ctx.artifact("corrections")
    if not isinstance(payload, dict):
        return []
    return [str(k) for k in (payload.get("models") or {})]


def _nanmean(t: Tensor) -> float | None:
    t = t.double()
    ok = torch.isfinite(t)
    return float(t[ok].mean()) if ok.any() else None


def metrics_info(region: str | None = None, chance: float | None = None,
                 step: int | None = None, alias: str | None = None) -> dict:
    """For every row metric: label, direction (↑/↓), description and implementation. The
    descriptions name the case's region, its chance level (the region mass of a uniform map) and
    the pixels per deletion/insertion ``step``; ``region_mass`` is labelled with the region's
    name, and the case's ``alias`` of it (``decoy_mass`` for DecoyMNIST) gets the same entry,
    labelled from the alias."""
    impl = {
        "region_mass": "core.methods.metrics (batched torch); equals Quantus RelevanceMassAccuracy on "
                      "non-negative maps (tested)",
        "wrong_reason": "core.methods.metrics (own; Schramowski et al. 2020; no Quantus counterpart)",
        "rank_accuracy": "core.methods.metrics; equals Quantus RelevanceRankAccuracy (tested)",
        "deletion_auc": "core.methods.metrics; its curve equals Quantus PixelFlipping (tested)",
        "insertion_auc": "core.methods.metrics (own, RISE insertion; no Quantus counterpart)",
        "mprt_spearman": "core.methods.metrics; equals Quantus MPRT top-down (tested)",
        "sparseness": "core.methods.metrics; equals Quantus Sparseness (tested)",
    }
    out = {}
    for key in METRIC_KEYS:
        info = M.METRICS[key]
        out[key] = {"label": info.label, "higher_is_better": bool(info.higher_is_better),
                    "arrow": "↑" if info.higher_is_better else "↓",
                    "description": info.describe(region, chance, step),
                    "implementation": impl[key]}
    out["region_mass"]["label"] = f"{region or 'region'} mass"
    if alias:  # the case's own name of the region mass, e.g. DecoyMNIST's "Decoy mass"
        out[alias] = {**out["region_mass"],
                      "label": alias.replace("_", " ").capitalize()}
    return out


def _options_of(cfg: dict, defaults: dict) -> dict:
    """Every method's options: the case's per-method layer defaults under the section's
    ``options`` (the section wins key by key; a method only the defaults name keeps a copy)."""
    options = {m: {**defaults.get(m, {}), **o} for m, o in cfg["options"].items()}
    for m, o in defaults.items():
        options.setdefault(m, dict(o))
    return options


def _class_reference(train, per_class: int) -> tuple[Tensor, Tensor]:
    """Internal influence's class-conditional distribution: ``(x, y)`` of the first
    ``per_class`` training images of every class, in class order then split order."""
    keep = torch.cat([(train.y == c).nonzero().flatten()[:per_class]
                      for c in torch.unique(train.y).tolist()])
    return train.x[keep].float(), train.y[keep].long()


def _model_names(ctx: StageContext, cfg: dict) -> list[str]:
    """The models to explain, each once in order: ``models`` (default the model under study and
    its reference), then with ``corrections = true`` the corrected models the context holds."""
    extra = _corrected_models(ctx) if cfg["corrections"] else []
    base = cfg["models"] if cfg["models"] is not None else [ctx.subject, ctx.reference]
    return list(dict.fromkeys([m for m in base if m] + extra))


class _Explained:
    """One representations build: the fixed test images and settings, and per model what each
    method gives (rows, maps, curves, MPRT curves, predictions, internal-influence experts,
    seconds), with the progress count."""

    def __init__(self, ctx: StageContext, cfg: dict, total: int, **fixed):
        self.ctx, self.cfg, self.total, self.done = ctx, cfg, total, 0
        self.__dict__.update(fixed)
        self.rows: list[dict] = []
        self.maps: dict = {}
        self.deletion: dict = {}
        self.insertion: dict = {}
        self.mprt_curves: dict = {}
        self.preds: dict = {}
        self.expert_info: dict = {}
        self.seconds: dict = {}
        self.layers: list[str] = []  # MPRT's layers (the last method's)
        self.fraction: list[float] = []  # pixels removed per deletion step (the last method's)

    def report(self, msg: str) -> None:
        self.ctx.progress(self.done, self.total, msg)

    def model(self, name: str, methods: list[str]) -> None:
        """Every method's maps and metrics for model ``name``, and its predictions and time."""
        t_model = time.perf_counter()
        model = self.ctx.model(name)
        dev = model_device(model)
        x = self.x_all.to(dev)
        with torch.no_grad(), eval_mode(model):
            pred = model(x).argmax(1).cpu()
        self.preds[name] = pred[:self.n_display].clone()
        y = (self.labels if self.cfg["target"] == "label" else pred).to(dev)
        self.maps[name], self.deletion[name], self.insertion[name] = {}, {}, {}
        self.mprt_curves[name] = {}
        for meth in methods:
            self.report(f"{name}: {METHODS[meth].label}")
            self.method(name, model, dev, x, y, meth)
            self.done += 1
            self.report(f"{name}: {METHODS[meth].label} done")
        self.seconds[name] = time.perf_counter() - t_model

    def method(self, name: str, model: nn.Module, dev, x: Tensor, y: Tensor, meth: str) -> None:
        """Method ``meth``'s maps of ``x`` (for targets ``y``, both on ``dev``) and its row: the
        mean over images (NaNs skipped) of the localisation metrics (with a region),
        deletion/insertion AUC, MPRT's last-layer Spearman similarity and sparseness; the curves
        and displayed maps beside."""
        cfg, mask, step, n_mprt = self.cfg, self.mask, self.step, self.n_mprt
        opts = {"batch_size": int(cfg["batch_size"]), **self.options.get(meth, {})}
        ref = self.reference if meth == "internal_influence" else None
        attr, info = attribute(model, x, y, meth, reference=ref, return_info=True, **opts)
        if meth == "internal_influence":
            self.expert_info[name] = info["classes"]
        attr = attr.detach()
        row = {"method": meth, "label": METHODS[meth].label, "model": name}
        if mask is not None:  # localisation metrics exist only where the case has a region
            mask_dev = mask.to(dev)
            row["region_mass"] = _nanmean(M.region_mass(attr, mask_dev))
            if self.alias:
                row[self.alias] = row["region_mass"]
            row["wrong_reason"] = _nanmean(M.wrong_reason(attr, mask_dev))
            row["rank_accuracy"] = _nanmean(M.rank_accuracy(attr, mask_dev))
        di = M.deletion_insertion(model, x, y, attr, step=step)
        row["deletion_auc"] = _nanmean(di["deletion_auc"])
        row["insertion_auc"] = _nanmean(di["insertion_auc"])
        self.deletion[name][meth] = di["deletion_curve"].double().mean(0).tolist()
        self.insertion[name][meth] = di["insertion_curve"].double().mean(0).tolist()
        steps = di["deletion_curve"].shape[1] - 1
        hw = x.shape[-2] * x.shape[-1]
        self.fraction = [min(s * step, hw) / hw for s in range(steps + 1)]

        def explain(m, xx, yy, meth=meth, opts=opts, ref=ref):
            return attribute(m, xx, yy, meth, reference=ref, **opts)

        # the unrandomised maps of these images are attr[:n_mprt]: not computed again
        # only the layers that feed the explained logit (a detector's other heads do not)
        res = M.mprt(model, x[:n_mprt], y[:n_mprt], explain, seed=int(cfg["seed"]),
                     layers=M.feeding_layers(model, x[:n_mprt], y[:n_mprt]),
                     reference=attr[:n_mprt], points=cfg["mprt_points"])
        self.layers = list(res["layers"])
        row["mprt_spearman"] = _nanmean(res["last"])
        self.mprt_curves[name][meth] = [_nanmean(s) for s in res["scores"]]
        row["sparseness"] = _nanmean(M.sparseness(attr))
        self.rows.append(row)
        self.maps[name][meth] = attr[:self.n_display].sum(1).float().cpu().clone()


def _config_out(cfg: dict, options: dict, names: list[str], step: int, n: int, n_display: int,
                n_mprt: int) -> dict:
    """The settings used, as plain JSON: the section with only the scalar options, the models
    explained and the resolved step and image counts."""
    cfg_out = {k: v for k, v in cfg.items() if k != "options"}
    cfg_out["options"] = {k: {kk: vv for kk, vv in v.items() if isinstance(vv, int | float | str)}
                          for k, v in options.items()}
    cfg_out["models"], cfg_out["step"] = names, step
    cfg_out["n_images"], cfg_out["n_display"], cfg_out["n_mprt"] = n, n_display, n_mprt
    return cfg_out


def build(ctx: StageContext) -> dict:
    """Every method's maps and metrics on a fixed set of test images, for each model.

    Reads its section (keys of :data:`DEFAULTS`; missing keys take the defaults). The images are
    the first ``n_images`` of the case's test split; the target of each is its label
    (``target="label"``) or the model's prediction. For each model (the model under study and its
    reference by default, and with ``corrections = true`` the corrected models of a corrections
    artifact the context holds) and each method: the maps, then the mean over images of each
    metric (NaNs skipped).
    The localisation metrics (``region_mass`` — with the case's alias, ``decoy_mass`` for
    DecoyMNIST — ``wrong_reason``, ``rank_accuracy``) exist only when the case has a region.
    ``mprt_spearman`` is the Spearman similarity after *every* layer is re-initialised
    (cascading, top layer first; the last point of the curve), on the first ``n_mprt`` images;
    the whole curve over layers is kept.

    Payload (only dicts, lists, str, numbers and tensors):
    ``rows``: [{"method", "label", "model", <metrics>: float | None}];
    ``maps``: {model: {method: (n_display, H, W) float tensor}};
    ``images``: {"x": (n_display, H, W[, 3]) in [0, 1] for display, "mask": (n_display, H, W)
    bool or None, "y": (n_display,),
    "pred": {model: (n_display,)}, "index": test-split indices};
    ``curves``: {"fraction": [S + 1], "deletion"/"insertion": {model: {method: [S + 1] means}}};
    ``mprt``: {"layers": [names], "row": "last", "n_images": int,
    "curves": {model: {method: [mean per layer]}}};
    ``metrics_info``: :func:`metrics_info`; ``methods``: :func:`method_table`;
    ``config``: the settings used; ``seconds``: {model: wall s, "total": wall s, "cpu": CPU s};
    ``experts``: {model: [{"class", "units", "scores", "weights"}]} (internal influence).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cfg = check_config(dict(ctx.section), "config")
    data = ctx.data
    test = data.test
    has_region = test.mask is not None
    options = _options_of(cfg, _case_layers(ctx))
    step = curve_step(cfg, tuple(test.x.shape[-2:]))
    n = min(int(cfg["n_images"]), test.n)
    n_display = min(int(cfg["n_display"]), n)
    n_mprt = min(int(cfg["n_mprt"]), n)
    x_all = test.x[:n].float()
    mask = test.mask[:n].bool() if has_region else None
    labels = test.y[:n].long()
    # internal influence's class-conditional DoI: the first n_reference training images per class
    reference = _class_reference(data.train, int(cfg["n_reference"]))
    names = _model_names(ctx, cfg)
    methods = list(cfg["methods"])
    run = _Explained(ctx, cfg, len(names) * len(methods), x_all=x_all, mask=mask, labels=labels,
                     reference=reference, alias=(data.extra or {}).get("region_alias"),
                     options=options, step=step, n_display=n_display, n_mprt=n_mprt)
    run.report("starting")
    for name in names:
        run.model(name, methods)
    seconds = run.seconds
    seconds["total"] = time.perf_counter() - t_start
    seconds["cpu"] = time.process_time() - cpu_start  # this process's CPU time, all threads
    return {
        "rows": run.rows,
        "maps": run.maps,
        "images": {"x": torch.from_numpy(data.display(x_all[:n_display])).float(),
                   "mask": mask[:n_display, 0].clone() if has_region else None,
                   "y": labels[:n_display].clone(), "pred": run.preds,
                   "index": list(range(n_display))},
        "curves": {"fraction": run.fraction, "deletion": run.deletion, "insertion": run.insertion},
        "mprt": {"layers": run.layers, "row": "last", "n_images": n_mprt, "curves": run.mprt_curves},
        "metrics_info": metrics_info(data.region_name if has_region else None,
                                     data.chance if has_region else None, step,
                                     alias=(data.extra or {}).get("region_alias") if has_region else None),
        "methods": [METHODS[m].row(options.get(m)) for m in methods],
        "experts": run.expert_info,
        "config": _config_out(cfg, options, names, step, n, n_display, n_mprt),
        "chance": data.chance if has_region else None,
        "region": data.region_name if has_region else None,
        "seconds": seconds,
    }


