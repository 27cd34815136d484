"""The ``experts`` stage: every model's top-k units per layer and class, interpreted on test images.

For every model, ``[experts] layers`` layer and class c (``[experts] classes``, else the first ten):
the top-k units by distributional influence on ``ClassQoI(c)`` over the class-c training images
(the same images for every model; ``PointDoI``), with bootstrap frequency and a percentile
interval; each expert is interpreted (Integrated Gradients of the unit at the input, zero
baseline) on the first ``n_images`` test images of class c. With a region, its ``region_mass`` is
the mean share of positive attribution on the region, and an expert *carries the shortcut* when
that exceeds its layer's threshold (:func:`shortcut_rule`, :func:`thresholds`); without a region
neither exists.

The functions below are also what the pipeline's on-demand views (``experts_for``: any quantity,
distribution, layer or model) rank and interpret with, so a view and the stage agree.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

import torch

from core.engine.distributions import PointDoI
from core.engine.experts import experts, experts_many, interpret
from core.engine.quantities import ClassQoI
from core.methods.metrics import region_mass
from core.methods.shortcut import classes_of, flag, rule_of, shortcut_rule, thresholds
from core.stages.base import Stage, StageContext

STAGE = Stage("experts", reads=("data", "models"), sections=("experts",),
              omit=("experts.primary_layer",), inputs=("adapter", "roles", "device"), version=3,
              delegated=False, plain_payload=False,
              quick={"bootstrap": 20, "resolution": 8})

__all__ = ["build", "class_images", "classes_of", "flag", "mass_fields", "rank_and_interpret",
           "rank_experts", "rank_many", "rule_of", "shortcut_rule", "thresholds"]


def rank_experts(model, inputs, layer: str, qoi, doi=None, *, k: int = 5, reduce: str = "sum",
                 by: str = "value", bootstrap: int = 0, confidence: float = 0.9,
                 seed: int = 0) -> dict:
    """:func:`core.engine.experts.experts` as a plain dict for the cache: ``{"experts": [{"unit",
    "score", "rank", "frequency", "ci_low", "ci_high"}], "scores": (units,) CPU tensor,
    "quantity", "distribution"}``."""
    ranking = experts(model, inputs, layer, qoi, doi, k=k, reduce=reduce, by=by,
                      bootstrap=bootstrap, confidence=confidence, seed=seed)
    return {"experts": ranking.to_records(), "scores": ranking.scores.detach().cpu(),
            "quantity": ranking.quantity, "distribution": ranking.distribution}


def class_images(data, c: int, n_images: int) -> tuple:
    """(DoI images: class-c training images, interpretation images: the first ``n_images`` test
    images of class c, their region masks or None, their test-split indices)."""
    train_x = data.train.x[data.train.y == c]
    idx = (data.test.y == c).nonzero().flatten()[:n_images]
    masks = None if data.test.mask is None else data.test.mask[idx]
    return train_x, data.test.x[idx], masks, idx


def rank_many(model, train_x, layers: list[str], qoi, doi, section: dict, device) -> dict:
    """The rankings of every layer for ``qoi``/``doi`` over ``train_x``, from one forward and one
    backward pass per chunk (:func:`core.engine.experts.experts_many`); per layer the same dict
    :func:`rank_experts` gives one layer at a time."""
    e = section
    rankings = experts_many(model, train_x.to(device), list(layers), qoi, doi,
                            k=e["k"], reduce=e["reduce"], by=e["by"],
                            bootstrap=e["bootstrap"], confidence=e["confidence"], seed=0)
    return {layer: {"experts": r.to_records(), "scores": r.scores.detach().cpu(),
                    "quantity": r.quantity, "distribution": r.distribution}
            for layer, r in rankings.items()}


def mass_fields(mass: float | None, alias: str | None) -> dict:
    """``{"region_mass": m}`` and the case's alias of it (``decoy_mass`` for DecoyMNIST)."""
    out = {"region_mass": mass}
    if alias:
        out[alias] = mass
    return out


MASS_DRAWS = 1000


def mass_interval(per_image: torch.Tensor, confidence: float = 0.95,
                  draws: int = MASS_DRAWS) -> tuple[float | None, float | None]:
    """The percentile bootstrap interval (``confidence``, ``draws`` resamples of the images with
    replacement, a fixed seed) of the mean of ``per_image`` region masses; ``(None, None)`` for
    fewer than two images. A verdict whose interval holds the threshold is undecided
    (:func:`core.methods.shortcut.flag`)."""
    n = len(per_image)
    if n < 2:
        return None, None
    gen = torch.Generator().manual_seed(0)  # its own stream: no global RNG state is touched
    means = per_image[torch.randint(n, (draws, n), generator=gen)].mean(1)
    alpha = (1.0 - float(confidence)) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=means.dtype))
    return float(lo), float(hi)


def rank_and_interpret(model, layer: str, qoi, doi, train_x, images, masks, idx, *,
                       section: dict, device, display: Callable, alias: str | None = None,
                       cls: int, progress: Callable[[int, int, str], None] | None = None,
                       ranking: dict | None = None) -> dict:
    """Top-k experts of ``layer`` for ``qoi``/``doi`` over ``train_x`` (or the given ``ranking``),
    each interpreted on ``images`` (test-split indices ``idx``, region ``masks`` or None); tensors
    (CPU) and plain values only. With masks the rows carry ``region_mass`` (and ``alias``); the
    ``shortcut`` flags are set by the caller (:func:`flag`). ``display`` maps images to [0, 1]
    arrays for the pages; ``progress(done, total, message)`` over 1 + k steps."""
    e = section
    steps = 1 + int(e["k"])
    if ranking is None:
        if progress:
            progress(0, steps, f"ranking the units of {layer}")
        ranking = rank_experts(model, train_x.to(device), layer, qoi, doi, k=e["k"],
                               reduce=e["reduce"], by=e["by"], bootstrap=e["bootstrap"],
                               confidence=e["confidence"], seed=0)
    maps = []
    for i, ex in enumerate(ranking["experts"]):
        if progress:
            progress(1 + i, steps, f"interpreting expert {ex['unit']} on {len(images)} images")
        if not len(images):  # e.g. no test image is predicted as the class
            maps.append(torch.zeros(0, *images.shape[2:]))
            continue
        a = interpret(model, images.to(device), layer, ex["unit"], reduce=e["reduce"],
                      resolution=e["resolution"])
        maps.append(a.detach().cpu().sum(1).float())  # summed over channels
    maps = torch.stack(maps) if maps else torch.zeros(0, images.shape[0], *images.shape[2:])
    rows = []
    for i, ex in enumerate(ranking["experts"]):
        mass, interval = None, {}
        if masks is not None and len(images):
            dm = region_mass(maps[i], masks[:, 0]).double()
            ok = torch.isfinite(dm)
            mass = float(dm[ok].mean()) if ok.any() else None
            if mass is not None:
                lo, hi = mass_interval(dm[ok], e.get("confidence", 0.95))
                interval = {"mass_low": lo, "mass_high": hi}
        rows.append({**ex, **mass_fields(mass, alias), **interval})
    shown = torch.from_numpy(display(images)).float()  # [0, 1], for the pages
    return {"rows": rows, "scores": ranking["scores"].float().clone(),
            "images": shown,
            "masks": None if masks is None else masks[:, 0].clone(),
            "indices": idx.clone(), "maps": maps.clone(), "class": int(cls),
            "quantity": ranking["quantity"], "distribution": ranking["distribution"]}


def _expert_checks(ctx: StageContext, results: dict) -> dict | None:
    """A case's own checks of every expert (``CaseData.extra["expert_checks"]``, a
    ``module:function`` of core taking ``(ctx, results)`` and returning plain JSON), e.g. the
    faces case's landmark mass; None when the case has none."""
    spec = (ctx.data.extra or {}).get("expert_checks")
    if not spec:
        return None
    module, _, fn = str(spec).partition(":")
    if not module.startswith("core."):
        raise ValueError(f"expert_checks must name a core module, got {spec!r}")
    return getattr(importlib.import_module(module), fn)(ctx, results)


def build(ctx: StageContext) -> dict:
    """Rank and interpret the experts of every model, layer and class (module docstring).

    Payload: ``rows`` [{"model", "class", "layer", "unit", "rank", "influence", "frequency",
    "ci_low", "ci_high", "region_mass" (+ alias), "mass_low", "mass_high" (its bootstrap interval
    over the images), "threshold", "shortcut", "verdict"}], ``results``
    {"<model>/<layer>/<class>": :func:`rank_and_interpret`'s dict, flagged}, ``layers``,
    ``checks`` (the case's own, or None), ``classes``, ``models``, ``chance``, ``thresholds``
    (per layer, None without a region), ``shortcut_rule``, ``seconds``."""
    e, data = ctx.experts, ctx.data
    t0 = time.perf_counter()
    classes = classes_of(e, len(data.class_names))
    models = {name: ctx.model(name) for name in ctx.model_names}
    alias = (data.extra or {}).get("region_alias")
    total = len(models) * len(e["layers"]) * len(classes)
    done = 0
    ctx.progress(0, total, "ranking experts")
    results, rows = {}, []
    images = {c: class_images(data, c, e["n_images"]) for c in classes}
    for c in classes:
        if len(images[c][0]) == 0:
            raise ValueError(f"class {c} has no training image")
    for mname, model in models.items():
        # every layer's ranking of a class from one pass (the engine's many-layer slice)
        ranked = {c: rank_many(model, images[c][0], e["layers"], ClassQoI(c), PointDoI(), e,
                               ctx.device) for c in classes}
        for layer in e["layers"]:
            for c in classes:
                r = rank_and_interpret(model, layer, ClassQoI(c), PointDoI(), *images[c],
                                       section=e, device=ctx.device, display=data.display,
                                       alias=alias, cls=c, ranking=ranked[c][layer])
                results[f"{mname}/{layer}/{c}"] = r
                for row in r["rows"]:
                    rows.append({"model": mname, "class": int(c), "layer": layer,
                                 "unit": row["unit"], "rank": row["rank"],
                                 "influence": row["score"], "frequency": row["frequency"],
                                 "ci_low": row["ci_low"], "ci_high": row["ci_high"],
                                 **{k: v for k, v in row.items()
                                    if k.endswith("_mass") or k in ("mass_low", "mass_high")}})
                done += 1
                ctx.progress(done, total, f"{mname} {layer} class {c}")
    th = thresholds(rows, e, data.chance, ctx.reference)
    rows = [flag(r, (th or {}).get(r["layer"])) for r in rows]
    for name, r in results.items():
        layer = name.split("/")[1]
        r["threshold"] = (th or {}).get(layer)
        r["rows"] = [flag(x, (th or {}).get(layer)) for x in r["rows"]]
    return {"rows": rows, "results": results, "layers": list(e["layers"]),
            "checks": _expert_checks(ctx, results), "classes": classes,
            "models": list(ctx.model_names), "chance": data.chance, "thresholds": th,
            "shortcut_rule": rule_of(e, data.chance, data.region_name, ctx.reference),
            "seconds": time.perf_counter() - t0}
