"""The ``discovery`` stage (issue 20): mask-free shortcut suspects for a case's models.

Runs :func:`core.methods.discovery.discover` on every model the section names (default: all of
the case's models; the first is the model under study, the others are the controls whose suspects
are false alarms when they do not use a shortcut). It needs no region; when the case has one, each
candidate's regions are also scored against it (``region_iou``: the median IoU over the
candidate's held-out images that carry the region).

``[discovery]`` keys: those of :data:`core.methods.discovery.DEFAULTS` plus ``models`` (a list of
model names; default all) and ``layer`` (the expert layer; default ``[experts] primary_layer``,
else the last of ``[experts] layers``).

Masks on disk (``python -m core discover``) are a query on a built case:
:mod:`core.queries.discovery`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from core.methods.discovery import DEFAULTS as METHOD_DEFAULTS
from core.methods.discovery import POWER, discover, iou, public_row, rule_text
from core.methods.discovery import check_config as check_method
from core.stages.base import Stage, StageContext

STAGE = Stage("discovery", reads=("data", "models"), sections=("discovery", "experts"),
              inputs=("seeds", "roles", "device"),
              quick={"max_fit": 48, "max_heldout": 64, "max_targets": 64, "resolution": 6})

__all__ = ["DEFAULTS", "CONTRACT", "SPLITS", "check_config", "build", "layer_of", "run"]

DEFAULTS = {**METHOD_DEFAULTS, "models": None, "layer": None}
CONTRACT = ("rank", "class", "verdict", "masks", "layer", "units", "n_images", "share_of_image",
            "necessity", "sufficiency", "control_necessity", "control_sufficiency", "p_value")
SPLITS = ("train", "val", "test")


def check_config(section: dict | None, where: str = "[discovery]") -> dict:
    """``[discovery]`` over :data:`DEFAULTS`; one-line ``ValueError`` for an unknown key or a bad
    value. Returns the merged settings."""
    sec = dict(section or {})
    models = sec.pop("models", None)
    layer = sec.pop("layer", None)
    if models is not None and (not isinstance(models, list) or not models
                               or not all(isinstance(m, str) for m in models)):
        raise ValueError(f"{where}: discovery.models must be a non-empty list of model names")
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise ValueError(f"{where}: discovery.layer must be a layer name (named_modules())")
    out = check_method(sec, where)
    out.update(models=models, layer=layer)
    return out


def layer_of(experts: dict, cfg: dict) -> str | None:
    """The expert layer discovery reads: ``[discovery] layer``, else ``[experts] primary_layer``,
    else the last of ``[experts] layers`` (None when there are none)."""
    if cfg.get("layer"):
        return cfg["layer"]
    layers = list(experts.get("layers") or [])
    return experts.get("primary_layer") or (layers[-1] if layers else None)


def run(model, name: str, data, layer: str | None, cfg: dict, progress=None) -> dict:
    """:func:`discover` on ``model`` (called ``name``) with the case's train and test splits, at
    ``layer``, with the checked section ``cfg``; rows annotated with the model's name and, when
    the case has a region, its IoU. Returns discover's result."""
    method_cfg = {k: v for k, v in cfg.items() if k in METHOD_DEFAULTS}
    result = discover(model, data.train.x, data.train.y, data.test.x, data.test.y,
                      data.class_names, layer, config=method_cfg, progress=progress)
    for row in result["candidates"] + result["notes"]:
        row["model"] = name
    if data.test.mask is not None and data.train.mask is not None:
        for row in result["candidates"]:
            row["region_iou"] = _region_iou(row, data)
    return result


def _region_iou(row: dict, data) -> float | None:
    """Median IoU of a candidate's held-out regions with the case's region masks, over the images
    whose region mask is not empty; None when none is."""
    held = row["_heldout"]
    n_test = held["n_test"]
    scores = []
    for idx, m in zip(held["index"], held["masks"], strict=True):
        truth = data.test.mask[idx] if idx < n_test else data.train.mask[idx - n_test]
        truth = truth.numpy().reshape(m.shape)
        if truth.any():
            scores.append(iou(m, truth) or 0.0)
    return float(np.median(scores)) if scores else None


def build(ctx: StageContext) -> dict:
    """Discovery on each model of ``[discovery] models`` (default all of the case's models).

    Payload (plain JSON): ``rows`` — every candidate (ranked per model; :data:`CONTRACT` fields,
    ``model``, ``kind`` "candidate", necessity/sufficiency with intervals and p-values, controls,
    ``consistency``, ``components``, ``verdict``, ``reason``, ``rule``, ``thresholds``, and
    ``region_iou`` with a region) and a ``kind: "note"`` row per class or model that could not be
    tested (with the reason); ``report`` — ``{"rule", "layer", "subject", "models": {name:
    {"n_candidates", "n_suspected", "n_undecided" (candidates that only lacked images:
    ``reason_kind`` "power"), "top": [up to 3 rows' rank, class, verdict, region_iou, reason,
    reason_kind], "headline"}}, "false_alarms": {"models", "n_flagged"} over the models other
    than the subject, "seconds"}``."""
    t0 = time.perf_counter()
    cfg = check_config(dict(ctx.section), "config")
    layer = layer_of(dict(ctx.experts), cfg)
    names = cfg["models"] or list(ctx.model_names)
    unknown = [n for n in names if n not in ctx.model_names]
    rows, summary, gallery, rules = [], {}, {}, {}
    for i, name in enumerate(names):
        if name in unknown:
            rows.append({"kind": "note", "model": name, "class": None, "verdict": "not suspected",
                         "reason": f"could not run: {name!r} is not one of the case's models"})
            continue

        def step(done, total, message, i=i, name=name):
            ctx.progress(i * 100 + int(100 * done / max(total, 1)), 100 * len(names),
                         f"{name}: {message}")

        t1 = time.perf_counter()
        try:
            result = run(ctx.model(name), name, ctx.data, layer, cfg, step)
        except Exception as exc:  # a model the method cannot run on: a row, the stage goes on
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            rows.append({"kind": "note", "model": name, "class": None,
                         "verdict": "not suspected", "reason": f"could not run: {first}"})
            continue
        cands = [public_row(r) for r in result["candidates"]]
        for r in result["candidates"]:
            gallery[f"{name}/{r['rank']}"] = _gallery(ctx, name, r)
            rules[f"{name}/{r['rank']}"] = _plain(r["_rule"])
        rows.extend(cands)
        rows.extend(public_row(n) for n in result["notes"])
        suspected = [r for r in cands if r["verdict"] == "suspected"]
        undecided = [r for r in cands if r.get("reason_kind") == POWER]
        summary[name] = {
            "n_candidates": len(cands), "n_suspected": len(suspected),
            "n_undecided": len(undecided),
            "n_tested": result["n_tested"], "k_per_class": result["k_per_class"],
            "top": [{k: r.get(k) for k in ("rank", "class", "verdict", "region_iou", "reason",
                                           "reason_kind")}
                    for r in cands[:3]],
            "headline": _headline(suspected, undecided, result["n_tested"], result["notes"]),
            "seconds": round(time.perf_counter() - t1, 3)}
    others = [n for n in summary if n != ctx.subject]
    report = {"rule": rule_text(check_method({k: v for k, v in cfg.items()
                                              if k in METHOD_DEFAULTS})),
              "layer": layer, "subject": ctx.subject, "models": summary,
              "false_alarms": {"models": others,
                               "n_flagged": sum(1 for n in others if summary[n]["n_suspected"])},
              "seconds": round(time.perf_counter() - t0, 3)}
    return {"rows": rows, "report": report, "gallery": gallery, "rules": rules}


GALLERY = 16  # held-out images kept per candidate for the chapter's grid


def _gallery(ctx: StageContext, model_name: str, row: dict) -> dict:
    """Up to :data:`GALLERY` of a candidate's held-out images where its region is present, for
    display: ``{"split": [...], "index": [...] (row in the split), "label", "pred" (class
    indices), "image": uint8 tensor (n, H, W) or (n, H, W, 3), "mask": bool tensor (n, H, W)}``;
    the images are evenly spread over the held-out set (test images first)."""
    held = row["_heldout"]
    n_test, index, masks = held["n_test"], np.asarray(held["index"]), held["masks"]
    pick = np.unique(np.linspace(0, len(index) - 1, min(GALLERY, len(index))).round().astype(int)) \
        if len(index) else np.zeros(0, int)
    data = ctx.data
    splits, idx, x, labels, preds = [], [], [], [], []
    pred = {s: ctx.predictions(model_name, s) for s in ("test", "train")}
    for j in pick:
        pool = int(index[j])
        split = "test" if pool < n_test else "train"
        i = pool if split == "test" else pool - n_test
        sp = getattr(data, split)
        splits.append(split)
        idx.append(i)
        x.append(sp.x[i])
        labels.append(int(sp.y[i]))
        preds.append(int(pred[split][i]))
    image = data.display(torch.stack(x)) if x else np.zeros((0, *data.size), np.float32)
    return {"split": splits, "index": idx, "label": labels, "pred": preds,
            "image": torch.from_numpy((np.clip(image, 0, 1) * 255).round().astype(np.uint8)),
            "mask": torch.from_numpy(np.asarray(masks)[pick].astype(bool)) if len(pick) else
            torch.zeros((0, *data.size), dtype=torch.bool)}


def _headline(suspected: list[dict], undecided: list[dict] | None = None, n_tested: int = 1,
              notes: list[dict] | None = None) -> str:
    """One line of what discovery found on a model: the top suspect; else "no suspected
    shortcut", with the candidates that had too few images to decide (no clean bill for them);
    "nothing could be tested" with the first note's reason when no candidate was tested."""
    if not suspected and not n_tested:
        why = next((n.get("reason") for n in notes or [] if n.get("reason")), None)
        return "nothing could be tested" + (f": {why}" if why else "")
    if not suspected:
        n = len(undecided or [])
        return "no suspected shortcut" + (
            f"; {n} candidate{'s' if n != 1 else ''} with too few images to decide" if n else "")
    top = suspected[0]
    more = f" (and {len(suspected) - 1} more)" if len(suspected) > 1 else ""
    return (f"suspected shortcut for class {top['class']!r}: a region of "
            f"{top['share_of_image']:.1%} of the image{more}")


def _plain(value):
    """``value`` with NumPy and torch scalars and arrays as Python numbers and lists (what a
    ``weights_only`` load accepts and JSON writes)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # np.ndarray, np.generic, torch.Tensor
        return _plain(value.tolist())
    return value
