"""The ``discovery`` stage (issue 20): mask-free shortcut suspects for a case's models.

Runs :func:`core.methods.discovery.discover` on every model the section names (default: all of
the case's models; the first is the model under study, the others are the controls whose suspects
are false alarms when they do not use a shortcut). It needs no region; when the case has one, each
candidate's regions are also scored against it (``region_iou``: the median IoU over the
candidate's held-out images that carry the region).

``[discovery]`` keys: those of :data:`core.methods.discovery.DEFAULTS` plus ``models`` (a list of
model names; default all) and ``layer`` (the expert layer; default ``[experts] primary_layer``,
else the last of ``[experts] layers``).

Also here: :func:`image_relpaths` (each image's path relative to the data root, the masks'
convention) and :func:`discover_to_folder`, what ``python -m core discover`` runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from core.methods.discovery import DEFAULTS as METHOD_DEFAULTS
from core.methods.discovery import check_config as check_method
from core.methods.discovery import discover, iou, public_row, region_masks, rule_text, write_masks

__all__ = ["DEFAULTS", "CONTRACT", "check_config", "build_stage", "run", "image_relpaths",
           "discover_to_folder"]

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


def _section(study) -> dict:
    cfg = getattr(study, "config", None)
    sec = getattr(cfg, "discovery", None) if cfg is not None else None
    return check_config(sec or {}, "config")


def _layer(study, cfg: dict) -> str | None:
    if cfg.get("layer"):
        return cfg["layer"]
    e = study.config.experts
    layers = list(e.get("layers") or [])
    return e.get("primary_layer") or (layers[-1] if layers else None)


def run(study, model_name: str | None = None, cfg: dict | None = None, progress=None) -> dict:
    """:func:`discover` on one of the study's models (default the subject) with the case's train
    and test splits; rows annotated with the model and, when the case has a region, its IoU."""
    cfg = _section(study) if cfg is None else cfg
    name = model_name or study.subject
    data = study.data()
    model = study.model(name)
    method_cfg = {k: v for k, v in cfg.items() if k in METHOD_DEFAULTS}
    result = discover(model, data.train.x, data.train.y, data.test.x, data.test.y,
                      data.class_names, _layer(study, cfg), config=method_cfg, progress=progress)
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


def build_stage(study, progress=None) -> dict:
    """Discovery on each model of ``[discovery] models`` (default all of the case's models).

    Payload (plain JSON): ``rows`` — every candidate (ranked per model; :data:`CONTRACT` fields,
    ``model``, ``kind`` "candidate", necessity/sufficiency with intervals and p-values, controls,
    ``consistency``, ``components``, ``verdict``, ``reason``, ``rule``, ``thresholds``, and
    ``region_iou`` with a region) and a ``kind: "note"`` row per class or model that could not be
    tested (with the reason); ``report`` — ``{"rule", "layer", "subject", "models": {name:
    {"n_candidates", "n_suspected", "top": [up to 3 rows' rank, class, verdict, region_iou],
    "headline"}}, "false_alarms": {"models", "n_flagged"} over the models other than the subject,
    "seconds"}``."""
    t0 = time.perf_counter()
    cfg = _section(study)
    names = cfg["models"] or list(study.model_names)
    unknown = [n for n in names if n not in study.model_names]
    rows, summary, gallery, rules = [], {}, {}, {}
    for i, name in enumerate(names):
        if name in unknown:
            rows.append({"kind": "note", "model": name, "class": None, "verdict": "not suspected",
                         "reason": f"could not run: {name!r} is not one of the case's models"})
            continue

        def step(done, total, message, i=i, name=name):
            if progress is not None:
                progress("discovery", i * 100 + int(100 * done / max(total, 1)), 100 * len(names),
                         f"{name}: {message}")

        t1 = time.perf_counter()
        try:
            result = run(study, name, cfg, step)
        except Exception as exc:  # a model the method cannot run on: a row, the stage goes on
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            rows.append({"kind": "note", "model": name, "class": None,
                         "verdict": "not suspected", "reason": f"could not run: {first}"})
            continue
        cands = [public_row(r) for r in result["candidates"]]
        for r in result["candidates"]:
            gallery[f"{name}/{r['rank']}"] = _gallery(study, name, r)
            rules[f"{name}/{r['rank']}"] = _plain(r["_rule"])
        rows.extend(cands)
        rows.extend(public_row(n) for n in result["notes"])
        suspected = [r for r in cands if r["verdict"] == "suspected"]
        summary[name] = {
            "n_candidates": len(cands), "n_suspected": len(suspected),
            "n_tested": result["n_tested"], "k_per_class": result["k_per_class"],
            "top": [{k: r.get(k) for k in ("rank", "class", "verdict", "region_iou", "reason")}
                    for r in cands[:3]],
            "headline": _headline(suspected),
            "seconds": round(time.perf_counter() - t1, 3)}
    others = [n for n in summary if n != study.subject]
    report = {"rule": rule_text(check_method({k: v for k, v in cfg.items()
                                              if k in METHOD_DEFAULTS})),
              "layer": _layer(study, cfg), "subject": study.subject, "models": summary,
              "false_alarms": {"models": others,
                               "n_flagged": sum(1 for n in others if summary[n]["n_suspected"])},
              "seconds": round(time.perf_counter() - t0, 3)}
    return {"rows": rows, "report": report, "gallery": gallery, "rules": rules}


GALLERY = 16  # held-out images kept per candidate for the chapter's grid


def _gallery(study, model_name: str, row: dict) -> dict:
    """Up to :data:`GALLERY` of a candidate's held-out images where its region is present, for
    display: ``{"split": [...], "index": [...] (row in the split), "label", "pred" (class
    indices), "image": uint8 tensor (n, H, W) or (n, H, W, 3), "mask": bool tensor (n, H, W)}``;
    the images are evenly spread over the held-out set (test images first)."""
    import torch

    held = row["_heldout"]
    n_test, index, masks = held["n_test"], np.asarray(held["index"]), held["masks"]
    pick = np.unique(np.linspace(0, len(index) - 1, min(GALLERY, len(index))).round().astype(int)) \
        if len(index) else np.zeros(0, int)
    data = study.data()
    splits, idx, x, labels, preds = [], [], [], [], []
    pred = {s: study.predictions(model_name, s) for s in ("test", "train")}
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


def _headline(suspected: list[dict]) -> str:
    if not suspected:
        return "no suspected shortcut"
    top = suspected[0]
    more = f" (and {len(suspected) - 1} more)" if len(suspected) > 1 else ""
    return (f"suspected shortcut for class {top['class']!r}: a region of "
            f"{top['share_of_image']:.1%} of the image{more}")


# ----------------------------------------------------------------------------------- masks on disk

def image_relpaths(study) -> dict[str, list[str]]:
    """Each image's path relative to the data root, per split (``train``, ``val``, ``test``), in
    the split's row order: a folder source's own files (``test/cat/17.png`` with split folders,
    ``cat/17.png`` without); any other source ``<split>/<index>.png`` (index: the row in the
    split)."""
    data = study.data()
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if study.config.dataset.get("source") == "folder":
        try:
            return _folder_relpaths(study)
        except Exception:  # the listing could not be reproduced: fall back to indices
            pass
    return {s: [f"{s}/{i}.png" for i in range(sp.n)] for s, sp in splits.items()}


def _folder_relpaths(study) -> dict[str, list[str]]:
    """Reproduce the folder adapter's listing and split on the file indices (its own functions,
    run on an index tensor instead of the images), so row i of a split is file ``files[idx[i]]``."""
    import torch

    from core import sources

    dataset = sources.check_dataset({**study.config.dataset, "source": "folder"}, "[dataset]")
    listing = sources._list_folder(dataset, Path(study.config.base_dir))
    root, files = listing["root"], listing["files"]
    n = len(files)
    index = torch.arange(n)
    y = torch.tensor([label for _, label, _ in files], dtype=torch.int64)
    tags = None
    if listing["layout"] == "split":
        tags = np.asarray([sources.SPLIT_NAMES.index(part) for part, _, _ in files], dtype=np.int64)
    train, val, test = sources._make_splits(index, y, None, tags, dataset["split"],
                                            listing["classes"])
    rel = [Path(p).relative_to(root).as_posix() for _, _, p in files]
    out = {name: [rel[int(i)] for i in split.x] for name, split in
           (("train", train), ("val", val), ("test", test))}
    data = study.data()
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        if len(out[name]) != split.n:
            raise ValueError("the folder listing does not match the data")
    return out


def discover_to_folder(study, out_dir: str | Path, model_name: str | None = None, top: int = 3,
                       progress=None) -> list[dict]:
    """Discovery on one model, written to ``out_dir``: ``candidates.json`` (the ranked list, every
    :data:`CONTRACT` field) and, for the top ``top`` candidates, ``<masks>/<relative path>.png``
    masks (255 = region) for every image of every split where the candidate is present; a
    missing file means no region on that image. Returns the list written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = model_name or study.subject
    candidates = _cached_candidates(study, name)
    if candidates is None:
        candidates = run(study, name, None, progress)["candidates"]
    data = study.data()
    model = study.model(name)
    rel = image_relpaths(study)
    rows = []
    for row in candidates[:max(0, int(top))]:
        folder = out_dir / row["masks"]
        written = 0
        for split in SPLITS:
            x = getattr(data, split).x
            if len(x) == 0:
                continue
            masks, present = region_masks(model, x, row)
            written += write_masks(folder, masks, present, rel[split])
        pub = public_row(row)
        pub["n_mask_files"] = written
        rows.append(pub)
    (out_dir / "candidates.json").write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")
    return rows


def _cached_candidates(study, name: str) -> list[dict] | None:
    """The built stage's ranked candidates of model ``name`` with the rules their masks need, or
    None when the stage is not built for it (or its entry predates the stored rules)."""
    if not study.is_built("discovery"):
        return None
    payload = study.artifact("discovery") or {}
    rules = payload.get("rules") or {}
    if name not in ((payload.get("report") or {}).get("models") or {}):
        return None
    out = []
    for r in payload.get("rows") or []:
        if r.get("model") != name or r.get("kind") != "candidate":
            continue
        rule = rules.get(f"{name}/{r.get('rank')}")
        if rule is None:
            return None
        out.append({**r, "_rule": rule})
    return out


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
